"""_checks: the NaN/inf verdict is exact whatever the dtype, also when a sum overflows; a config that
makes PEFT read outside the adapter is refused unread."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama

from safe_lora import inspect_adapter, load_for_inference
from safe_lora._checks import nonfinite_keys
from safe_lora.errors import AdapterConfigError


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


# A config field that makes PEFT read something outside the adapter while it injects: refused before
# PEFT runs, so nothing is opened, downloaded or instantiated.
EXTERNAL = [
    (
        peft.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2, task_type="CAUSAL_LM"),
        {"prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": "{decoy}"},
        "prompt_tuning_init_state_dict_path",
    ),
    (
        peft.ShadowConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        {"shadow_model": "{decoy}"},
        "shadow_model",
    ),
]


@pytest.mark.parametrize(("config", "fields", "named"), EXTERNAL, ids=["multitask-source", "shadow-model"])
def test_a_config_that_reads_outside_the_adapter_is_refused_unread(
    tmp_path: Path, config: peft.PeftConfig, fields: dict[str, str], named: str
) -> None:
    base = tiny_llama()
    folder = save_adapter(base, config, tmp_path / "adapter")
    decoy = tmp_path / "decoy"  # what the field names: a folder PEFT would open
    decoy.mkdir()
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw.update({k: v.format(decoy=decoy) for k, v in fields.items()})
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    opened: list[str] = []

    def watch(event: str, args: tuple[object, ...]) -> None:
        if event in ("open", "os.listdir", "os.scandir") and str(args[0]).startswith(str(decoy)):
            opened.append(str(args[0]))

    sys.addaudithook(watch)  # hooks cannot be removed: `decoy` is unique to this test
    before = snapshot(base)
    with pytest.raises(AdapterConfigError, match="outside the adapter") as refused:
        load_for_inference(base, folder)
    assert refused.value.fields == [named]
    assert_unchanged(base, before)
    report = inspect_adapter(folder, base_model=base)
    assert not report.loads_safely
    assert [f.code for f in report.findings if f.severity == "error"] == ["config-external"]
    assert opened == []
