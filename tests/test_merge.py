"""merge=True: every layer is shown to merge before the model is touched; merges wherever raw PEFT's
merge_and_unload does, bitsandbytes bases included, with PEFT's warnings (issue 9); a weight shared
between modules is untied first, or the merge refused ("After loading", item 3)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama, tiny_llama_as
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


# --------------------------------------------------------------------------------------------------
# Weights shared between modules: tied embeddings ("After loading", item 3)
# --------------------------------------------------------------------------------------------------

TIED_IDS = torch.tensor([[1, 5, 9, 3, 2, 7, 11, 60]])
TIED_TARGETS = {
    "q_proj+lm_head": ["q_proj", "lm_head"],  # the merge writes lm_head's delta into the embeddings
    "embed_tokens": ["embed_tokens"],  # ... or the embeddings' delta into lm_head
    "embed_tokens+lm_head": ["embed_tokens", "lm_head"],  # ... or both deltas into one tensor
}


def tied_llama() -> Any:
    return tiny_llama(tie_word_embeddings=True)


def untied_copy() -> Any:
    """The same base, lm_head holding its own copy of the weight: what PEFT advises to merge into."""
    model = tied_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def tied_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TIED_IDS).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tied_adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "a tied layer is part of the adapter"
        for name, targets in TIED_TARGETS.items():
            config = LoraConfig(target_modules=targets, r=2, init_lora_weights=False, task_type="CAUSAL_LM")
            found[name] = save_adapter(tied_llama(), config, root / name, train_steps=1)
    return found


def test_raw_peft_merges_into_the_tied_embeddings(tied_adapters: dict[str, Path]) -> None:
    """The trap: merge_and_unload writes lm_head's delta into the weight embed_tokens shares."""
    path = tied_adapters["q_proj+lm_head"]
    unmerged = tied_logits(load_for_inference(tied_llama(), path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = PeftModel.from_pretrained(tied_llama(), str(path)).merge_and_unload()
    assert raw.lm_head.weight is raw.model.embed_tokens.weight
    assert not torch.equal(raw.model.embed_tokens.weight, tied_llama().model.embed_tokens.weight)
    assert (tied_logits(raw) - unmerged).abs().max() > 1.0  # logits off by whole units, silently


@pytest.mark.parametrize("targets", list(TIED_TARGETS))
def test_a_tied_weight_is_untied_then_merged(
    tied_adapters: dict[str, Path], targets: str, tmp_path: Path
) -> None:
    from transformers import LlamaForCausalLM

    path = tied_adapters[targets]
    unmerged = tied_logits(load_for_inference(tied_llama(), path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = load_for_inference(tied_llama(), path, merge=True)
        # PEFT's own merge of the same adapter into the untied copy of the base: the reference.
        reference = PeftModel.from_pretrained(untied_copy(), str(path)).merge_and_unload()

    assert type(merged) is LlamaForCausalLM
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False
    assert "lm_head.weight" not in merged.all_tied_weights_keys
    state, expected = merged.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    logits = tied_logits(merged)
    assert torch.equal(logits, tied_logits(reference))
    # Against the unmerged model: only the rounding of (W + s·BA)x against Wx + s·B(Ax) in fp32, the
    # same as any merge (a raw merge through the tie is off by > 1).
    torch.testing.assert_close(logits, unmerged, rtol=0, atol=1e-5)
    if targets == "q_proj+lm_head":  # the embeddings are not merged into: they are the base's
        assert torch.equal(merged.model.embed_tokens.weight, tied_llama().model.embed_tokens.weight)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert torch.equal(tied_logits(reloaded), logits)


def test_a_tie_the_config_cannot_undo_is_refused_before_anything_is_merged(tmp_path: Path) -> None:
    """T5 ties lm_head, both embed_tokens and shared, and its config forces the tie on at load."""
    from transformers import T5Config, T5ForConditionalGeneration

    def t5() -> Any:
        torch.manual_seed(0)
        config = T5Config(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
        )
        return T5ForConditionalGeneration(config).eval()

    config = LoraConfig(
        target_modules=["q", "lm_head"], r=2, init_lora_weights=False, task_type="SEQ_2_SEQ_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_adapter(t5(), config, tmp_path / "t5", train_steps=1)
    base = t5()
    before = snapshot(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared = r"'base_model\.model\.lm_head' is shared by.*merge=False"
        with pytest.raises(AdapterMergeError, match=shared) as info:
            load_for_inference(base, path, merge=True)
    assert info.value.layer == "base_model.model.lm_head"
    assert info.value.tied_modules == ["decoder.embed_tokens", "encoder.embed_tokens", "lm_head", "shared"]
    assert info.value.peft_type == "LORA"
    assert_unchanged(base, before)
    assert base.lm_head.weight is base.shared.weight


class SharedWeights(nn.Module):
    """Two layers over one weight, no transformers config: a tie only the storage shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 4, bias=False)
        self.fc2 = nn.Linear(4, 4, bias=False)
        self.fc2.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return]


def test_a_tie_of_any_two_modules_is_found_by_storage(tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["fc2"], r=2, init_lora_weights=False)
    path = save_adapter(SharedWeights(), config, tmp_path / "shared", train_steps=1)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = load_for_inference(SharedWeights(), path)(x)
        raw = PeftModel.from_pretrained(SharedWeights(), str(path)).merge_and_unload()(x)
        merged_model = load_for_inference(SharedWeights(), path, merge=True)
        merged = merged_model(x)
    assert not torch.allclose(raw, unmerged, atol=1e-3)  # fc1 got fc2's delta too
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-6)
    assert merged_model.fc1.weight is not merged_model.fc2.weight
    assert torch.equal(merged_model.fc1.weight, SharedWeights().fc1.weight)


def test_a_layer_that_cannot_merge_is_named_as_an_attribute(half_mergeable: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterMergeError) as info:
            load_for_inference(BiasThenNoBias(), half_mergeable, merge=True)
    assert info.value.layer == "base_model.model.fc2"
    assert info.value.tied_modules == []


def test_replicated_layers_are_merged_apart(tmp_path: Path) -> None:
    """layer_replication: the replicas share their base weights, and PEFT merges every replica's
    delta into all of them."""
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"],
        r=2,
        init_lora_weights=False,
        layer_replication=[[0, 2], [1, 2]],
        task_type="CAUSAL_LM",
    )
    path = save_adapter(tiny_llama(), config, tmp_path / "replicated", train_steps=1)
    unmerged = tied_logits(load_for_inference(tiny_llama(), path))
    raw = tied_logits(PeftModel.from_pretrained(tiny_llama(), str(path)).merge_and_unload())
    merged = tied_logits(load_for_inference(tiny_llama(), path, merge=True))
    assert (raw - unmerged).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
