"""merge=True: every layer is shown to merge before the model is touched; merges wherever raw PEFT's
merge_and_unload does, bitsandbytes bases included, with PEFT's warnings (issue 9)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama_as
from peft import LoraConfig, PeftModel
from torch import nn

from safe_lora import AdapterMergeError, SafeLoraWarning, load_for_inference

IDS = torch.tensor([[1, 5, 9, 3, 2]])


class BiasThenNoBias(nn.Module):
    """fc1 has a bias, fc2 has none: LoRA with lora_bias=True merges fc1, then fails on fc2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 4, bias=True)
        self.fc2 = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))  # type: ignore[no-any-return]


@pytest.fixture
def half_mergeable(tmp_path: Path) -> Path:
    config = LoraConfig(target_modules=["fc1", "fc2"], r=2, lora_bias=True, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "merging LoRA weights won't be possible"
        return save_adapter(BiasThenNoBias(), config, tmp_path / "a")


def test_raw_peft_leaves_a_half_merged_model(half_mergeable: Path) -> None:
    """The trap: merge_and_unload merges fc1 in place, then raises on fc2."""
    base = BiasThenNoBias()
    weight = base.fc1.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = PeftModel.from_pretrained(base, str(half_mergeable))
    with pytest.raises(RuntimeError, match="Impossible to merge"):
        raw.merge_and_unload()
    assert not torch.equal(base.fc1.weight, weight)


def test_a_layer_that_cannot_merge_is_named_and_nothing_is_merged(half_mergeable: Path) -> None:
    base = BiasThenNoBias()
    before = snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterMergeError, match=r"layer 'base_model\.model\.fc2'.*merge=False") as info:
            load_for_inference(base, half_mergeable, merge=True)
    assert info.value.peft_type == "LORA"
    assert_unchanged(base, before)


def test_alora_cannot_merge_and_leaves_the_model(tmp_path: Path, llama_folder: Path) -> None:
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=2, alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM"
    )
    path = save_adapter(tiny_llama_as("fp32", llama_folder), config, tmp_path / "alora")
    model = tiny_llama_as("fp32", llama_folder)
    before = snapshot(model)
    with pytest.raises(AdapterMergeError, match="aLoRA does not support merging"):
        load_for_inference(model, path, merge=True)
    assert_unchanged(model, before)


def _messages(caught: list[warnings.WarningMessage]) -> Counter[str]:
    return Counter(str(w.message) for w in caught if not issubclass(w.category, SafeLoraWarning))


@pytest.mark.bnb
@pytest.mark.parametrize("kind", ["bnb4-fp32", "bnb4-bf16", "bnb8"])
def test_merges_bitsandbytes_bases_like_peft_with_its_rounding_warning(
    kind: str, tmp_path: Path, llama_folder: Path
) -> None:
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    path = save_adapter(tiny_llama_as(kind, llama_folder), config, tmp_path / kind)
    with warnings.catch_warnings(record=True) as raw_caught:
        warnings.simplefilter("always")
        raw = PeftModel.from_pretrained(tiny_llama_as(kind, llama_folder), str(path)).merge_and_unload()
    with warnings.catch_warnings(record=True) as ours_caught:
        warnings.simplefilter("always")
        merged = load_for_inference(tiny_llama_as(kind, llama_folder), path, merge=True)
    ours, theirs = _messages(ours_caught), _messages(raw_caught)
    rounding = [m for m in theirs if "may get different generations due to rounding errors" in m]
    assert rounding  # raw PEFT warns, once per merged layer
    assert {m: ours[m] for m in rounding} == {m: theirs[m] for m in rounding}  # same, not doubled
    assert type(merged) is type(raw)
    state, expected = merged.state_dict(), raw.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        assert torch.equal(merged(IDS).logits, raw(IDS).logits)
