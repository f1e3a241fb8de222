"""_checks: the NaN/inf verdict is exact whatever the dtype, also when a sum overflows."""

from __future__ import annotations

import pytest
import torch

from safe_lora._checks import nonfinite_keys


def _tensor(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize(
    ("values", "dtype", "bad"),
    [
        ([0.5, -1.0], torch.float32, False),
        ([60000.0, 60000.0], torch.float16, False),  # finite, but the fp16 sum overflows: exact scan
        ([3e38, 3e38], torch.float32, False),  # the same in fp32
        ([1.0, float("nan")], torch.bfloat16, True),
        ([float("inf"), 1.0], torch.float32, True),
        ([float("-inf"), float("inf")], torch.float64, True),
        ([0.5, 1.0], torch.float8_e4m3fn, False),  # torch cannot sum float8: widened first
    ],
)
def test_nonfinite_keys_is_exact(values: list[float], dtype: torch.dtype, bad: bool) -> None:
    tensors = [("ok", torch.ones(3)), ("k", _tensor(values, dtype)), ("ints", torch.arange(3))]
    assert nonfinite_keys(tensors) == (["k"] if bad else [])
