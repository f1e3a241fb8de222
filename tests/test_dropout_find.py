"""Finding dropout sites (safe_lora._dropout_find): live_dropout, names, kinds and rates, the cached walk.

Freezing what is found -- deterministic_lora, assert_deterministic -- is ``test_dropout_freeze.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest
import torch
from _dropout_nets import PEFT_NAMES, MhaNet, Net, T, adapter_names, peft_net, perturb, repeatable
from conftest import make_mlp, tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from safe_lora import assert_deterministic, deterministic_lora, live_dropout, load_for_inference

# --------------------------------------------------------------------------------------------------
# What live_dropout lists
# --------------------------------------------------------------------------------------------------


def test_live_dropout_lists_name_kind_and_rate() -> None:
    model = peft_net(
        peft.LoHaConfig(target_modules=["fc1"], rank_dropout=0.25, module_dropout=0.5),
        Net(base_dropout=0.125),
    )
    sites = live_dropout(model)
    assert [(s.name, s.kind, s.p, s.attribute, s.adapter) for s in sites] == [
        ("base_model.model.fc1", "adapter", 0.25, "rank_dropout['default']", "default"),
        ("base_model.model.fc1", "adapter", 0.5, "module_dropout['default']", "default"),
        ("base_model.model.drop", "base", 0.125, "p", None),
    ]
    assert live_dropout(model.eval()) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        sites[0].p = 0.0  # type: ignore[misc]


def test_live_dropout_of_a_model_loaded_for_inference_is_empty(mlp_adapter: Path) -> None:
    model = load_for_inference(make_mlp(), mlp_adapter, dropout=None)  # keeps the saved rate 0.1
    assert live_dropout(model) == []
    assert_deterministic(model)
    model.train()
    assert {(s.name, s.p) for s in live_dropout(model)} == {
        ("base_model.model.fc1.lora_dropout.default", 0.1)
    }


def test_parameters_are_not_re_registered() -> None:
    # LoRA's MultiheadAttention re-creates its base nn.Parameters whenever named_modules() runs;
    # an optimizer holding the old objects would stop training them.
    model = peft_net(LoraConfig(target_modules=["mha"], lora_dropout=0.5), MhaNet())
    base = model.base_model.model.mha.base_layer
    weight = base._parameters["in_proj_weight"]
    live_dropout(model)
    with deterministic_lora(model):
        pass
    assert_deterministic(model.eval())
    assert base._parameters["in_proj_weight"] is weight


# --------------------------------------------------------------------------------------------------
# Names without wrapper components
# --------------------------------------------------------------------------------------------------


def test_names_drop_wrapper_components_anywhere() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    inner = model.get_base_model()
    inner.fc1 = checkpoint_wrapper(inner.fc1)
    inner.fc2 = torch.compile(inner.fc2, backend="eager")
    raw = {n for n, _ in model.named_modules() if n.endswith(".lora_dropout.default")}
    assert raw == {
        "base_model.model.fc1._checkpoint_wrapped_module.lora_dropout.default",
        "base_model.model.fc2._orig_mod.lora_dropout.default",
    }
    assert adapter_names(live_dropout(model)) == PEFT_NAMES
    with deterministic_lora(model) as frozen:
        assert {s.name for s in frozen} == PEFT_NAMES
        assert repeatable(model)
    assert not repeatable(model)


# --------------------------------------------------------------------------------------------------
# The walk is cached per model: a changed model must never reuse a stale one
# --------------------------------------------------------------------------------------------------


def test_a_rate_raised_between_blocks_is_frozen() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    for d in dropouts:
        d.p = 0.0
    with deterministic_lora(model):  # caches a walk in which no rate is live
        pass
    for d in dropouts:
        d.p = 0.5
    assert not repeatable(model)
    with deterministic_lora(model) as frozen:
        assert adapter_names(frozen) == PEFT_NAMES
        assert repeatable(model)


def test_an_adapter_added_between_blocks_is_frozen() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    with deterministic_lora(model):
        pass
    model.add_adapter("second", LoraConfig(target_modules=T, lora_dropout=0.5))
    model.base_model.set_adapter(["default", "second"])
    perturb(model)
    model.train()
    assert not repeatable(model)
    with deterministic_lora(model) as frozen:
        assert {s.adapter for s in frozen} == {"default", "second"}
        assert repeatable(model)


def test_a_module_swapped_for_another_of_its_class_between_blocks_is_frozen() -> None:
    # Same class, same number of modules and attributes everywhere: only the identity of the child
    # under ``lora_dropout["default"]`` changes, and the new one must be frozen, the old one not.
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.0))
    layer = model.base_model.model.fc1
    old = layer.lora_dropout["default"]
    with deterministic_lora(model):
        pass
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    model.train()
    assert not repeatable(model)
    with deterministic_lora(model) as frozen:
        assert [s.name for s in frozen] == ["base_model.model.fc1.lora_dropout.default"]
        assert repeatable(model)
        assert old.training  # an nn.Identity no longer in the model: not touched
    assert layer.lora_dropout["default"].training


def test_a_rate_attribute_added_between_blocks_is_seen() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    with deterministic_lora(model, include_base=True):
        pass
    model.base_model.model.act.attention_dropout = 0.3  # a module that now gates dropout itself
    names = {s.name for s in live_dropout(model) if s.kind == "base"}
    assert names == {"base_model.model.act"}
    with deterministic_lora(model, include_base=True):
        assert live_dropout(model) == []


# --------------------------------------------------------------------------------------------------
# The PEFT facts the walk relies on (safe_lora._peft) hold for the installed PEFT
# --------------------------------------------------------------------------------------------------


def test_the_peft_facts_of_the_walk_hold_for_the_installed_peft() -> None:
    from peft.tuners.poly.router import PolyRouter
    from peft.tuners.tuners_utils import BaseTunerLayer

    from safe_lora import _peft

    lora = peft_net(LoraConfig(target_modules=["fc1"], lora_dropout=0.5))
    layer = lora.base_model.model.fc1
    assert isinstance(layer, BaseTunerLayer)
    assert layer._modules[_peft.TUNER_LAYER_BASE_CHILD] is layer.get_base_layer()
    assert lora.base_model._modules[_peft.TUNER_BASE_CHILD] is lora.get_base_model()

    pvera = peft_net(peft.PveraConfig(target_modules=["fc1"], sample_at_inference=True))
    assert vars(pvera.base_model.model.fc1)[_peft.SAMPLE_AT_INFERENCE_ATTR] == {"default": True}

    monte = peft_net(LoraConfig(target_modules=["fc1"], monteclora_config=peft.MontecloraConfig()))
    samplers = monte.base_model.model.fc1._modules[_peft.MONTECLORA_SAMPLER_ATTR]
    assert isinstance(samplers, nn.ModuleDict)
    assert list(samplers) == ["default"]

    assert _peft.is_router(PolyRouter)
    assert not _peft.is_router(nn.Linear)
    poly = peft_net(peft.PolyConfig(target_modules=["fc1"], n_tasks=2))
    assert [type(m).__name__ for m in poly.modules() if _peft.is_router(type(m))] == ["PolyRouter"]

    encoder = peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_hidden_size=8)
    prompt = get_peft_model(tiny_llama(), encoder)
    assert isinstance(prompt._modules[_peft.PROMPT_ENCODER_CHILD], nn.ModuleDict)
