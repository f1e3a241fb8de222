"""Stand-ins on the meta device (``safe_lora/_meta.py``): what PEFT's injection sees of a model."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from safe_lora._meta import on_meta


def _outcome(call: Any) -> tuple[str, str]:
    """What a call did: returned, raised (type and message) or warned (message)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call()
        except Exception as exc:
            return type(exc).__name__, str(exc)
    return ("warned", str(caught[0].message)) if caught else ("returned", "")


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((16, 8), {"a": math.sqrt(5)}),  # nn.Linear's init and PEFT's reset_lora_parameters
        ((4, 3, 3, 3), {}),
        ((16, 8), {"mode": "fan_out", "nonlinearity": "relu"}),
        ((8,), {}),  # no fan: raises
        ((0, 8), {}),  # nothing to fill: warns
        ((16, 8), {"mode": "fan_sideways"}),
        ((16, 8), {"nonlinearity": "swish"}),
        ((16, 8), {"nonlinearity": "leaky_relu", "a": "steep"}),
    ],
)
def test_kaiming_init_of_a_meta_tensor_answers_as_torch_does(
    shape: tuple[int, ...], kwargs: dict[str, Any]
) -> None:
    # on_meta returns a meta tensor unfilled from kaiming_uniform_ (PEFT calls it twice per LoRA layer,
    # and a meta fill costs a Python decomposition); what torch would raise or warn must still come.
    plain = torch.empty(shape, device="meta")
    mine = torch.empty(shape, device="meta")
    want = _outcome(lambda: nn.init.kaiming_uniform_(plain, **kwargs))
    with on_meta():
        got = _outcome(lambda: nn.init.kaiming_uniform_(mine, **kwargs))
        assert nn.init.kaiming_uniform_(torch.empty(2, 2), a=1.0).device.type == "meta"
    assert got == want


def test_kaiming_init_of_a_real_tensor_fills_it_and_advances_the_rng() -> None:
    # Only meta tensors are left unfilled: a real tensor inside on_meta is torch's as ever.
    torch.manual_seed(0)
    want = nn.init.kaiming_uniform_(torch.empty(4, 4), a=math.sqrt(5))
    torch.manual_seed(0)
    real = torch.empty(4, 4, device="cpu")
    with on_meta():
        got = nn.init.kaiming_uniform_(real, a=math.sqrt(5))
    assert got is real
    assert torch.equal(real, want)
