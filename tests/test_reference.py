"""load_adapter(..., trainable=False): a frozen reference adapter in a training model (DPO, KTO),
loaded as for inference, nothing else disturbed ("After loading", item 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, llama_lora, save_adapter, snapshot, tiny_llama
from peft import PeftModel
from torch import nn

from safe_lora import (
    deterministic_lora,
    load_adapter,
    load_for_inference,
    load_for_training,
    use_adapter,
)

IDS = torch.tensor([[1, 5, 9, 3, 2, 7]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference")
    return {
        "policy": save_adapter(tiny_llama(), llama_lora(), root / "policy", seed=1),
        # The reference targets other modules and has another rank: nothing is shared by accident.
        "ref": save_adapter(
            tiny_llama(), llama_lora(target_modules=["q_proj", "o_proj"], r=4), root / "ref", seed=2
        ),
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()  # type: ignore[no-any-return]


def params_of(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f".{adapter}." in n}


def test_raw_peft_frozen_load_puts_the_training_model_in_eval(folders: dict[str, Path]) -> None:
    """The trap: PeftModel.load_adapter(..., is_trainable=False) calls model.eval() -- the policy's
    dropout silently stops for the rest of training."""
    raw = PeftModel.from_pretrained(tiny_llama(), str(folders["policy"]), is_trainable=True).train()
    raw.load_adapter(str(folders["ref"]), "ref", is_trainable=False)
    assert not any(m.training for m in raw.modules())


def test_a_frozen_reference_in_a_training_model(folders: dict[str, Path]) -> None:
    model = load_for_training(tiny_llama(), folders["policy"])
    policy = params_of(model, "default")
    assert policy
    assert all(p.requires_grad for p in policy.values())
    grads = {id(p): p.requires_grad for p in model.parameters()}
    modes = {id(m): m.training for m in model.modules()}

    returned = load_adapter(model, folders["ref"], adapter_name="ref", trainable=False)

    assert returned is model
    assert model.active_adapters == ["default"]
    assert {k: p.requires_grad for k, p in ((id(p), p) for p in model.parameters()) if k in grads} == grads
    assert {k: m.training for k, m in ((id(m), m) for m in model.modules()) if k in modes} == modes
    assert all(m.training for m in model.modules())  # new modules follow their parent: no mixed tree
    ref = params_of(model, "ref")
    assert len(ref) == 8
    assert not any(p.requires_grad for p in ref.values())
    assert model.peft_config["ref"].inference_mode
    assert model.peft_config["ref"].lora_dropout == 0.0  # "auto" means 0 for a frozen adapter
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, nn.ModuleDict) and "ref" in dropout:
            assert isinstance(dropout["ref"], nn.Identity)
    assert model.peft_config["default"].lora_dropout == pytest.approx(0.1)  # the policy's rate kept


def test_a_training_step_updates_only_the_trainable_adapter(folders: dict[str, Path]) -> None:
    model = load_for_training(tiny_llama(), folders["policy"])
    load_adapter(model, folders["ref"], adapter_name="ref", trainable=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    with use_adapter(model, "ref"):
        reference = model(input_ids=IDS).logits  # no torch.no_grad(): nothing to train through
    assert not reference.requires_grad
    policy = model(input_ids=IDS).logits
    (policy - reference).pow(2).mean().backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(params_of(model, "default"))
    assert all(p.grad is None for p in params_of(model, "ref").values())
    # The reference computes what a load_for_inference of the same file computes, bit for bit.
    with use_adapter(model, "ref"), deterministic_lora(model):
        assert torch.equal(logits(model), logits(load_for_inference(tiny_llama(), folders["ref"])))


def test_a_dropout_asked_for_is_kept(folders: dict[str, Path]) -> None:
    model = load_for_training(tiny_llama(), folders["policy"])
    load_adapter(model, folders["ref"], adapter_name="ref", trainable=False, dropout=0.2)
    assert model.peft_config["ref"].lora_dropout == pytest.approx(0.2)
    assert not any(p.requires_grad for p in params_of(model, "ref").values())


def test_trainable_true_on_an_inference_model_is_refused(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["policy"])
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"trainable adapter 'x' to a model loaded for inference.*load_for_training"
    ):
        load_adapter(model, folders["ref"], adapter_name="x", trainable=True)
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize(("loader", "trainable"), [(load_for_inference, False), (load_for_training, True)])
def test_trainable_that_matches_the_model_is_the_default(
    folders: dict[str, Path], loader: Any, trainable: bool
) -> None:
    model = loader(tiny_llama(), folders["policy"])
    load_adapter(model, folders["ref"], adapter_name="ref", trainable=trainable)
    assert all(p.requires_grad is trainable for p in params_of(model, "ref").values())
    assert model.peft_config["ref"].inference_mode is not trainable


def test_replace_keeps_the_kind_of_a_frozen_reference(folders: dict[str, Path], tmp_path: Path) -> None:
    model = load_for_training(tiny_llama(), folders["policy"])
    load_adapter(model, folders["ref"], adapter_name="ref", trainable=False)
    newer = save_adapter(
        tiny_llama(), llama_lora(target_modules=["q_proj", "o_proj"], r=4), tmp_path / "n", seed=3
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"keeps adapter 'ref' as it was loaded.*found trainable=True"):
        load_adapter(model, newer, adapter_name="ref", replace=True, trainable=True)
    assert_unchanged(model, before)
    load_adapter(model, newer, adapter_name="ref", replace=True)
    assert not any(p.requires_grad for p in params_of(model, "ref").values())
    assert model.peft_config["ref"].lora_dropout == 0.0  # a frozen adapter's rates stay 0
    with use_adapter(model, "ref"), deterministic_lora(model):
        assert torch.equal(logits(model), logits(load_for_inference(tiny_llama(), newer)))


def test_the_base_model_as_reference_next_to_a_frozen_adapter(folders: dict[str, Path]) -> None:
    model = load_for_training(tiny_llama(), folders["policy"])
    load_adapter(model, folders["ref"], adapter_name="ref", trainable=False)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    with use_adapter(model, None):
        assert torch.equal(logits(model), logits(tiny_llama()))
    assert {id(p): p.requires_grad for p in model.parameters()} == grads
