"""The PEFT boundary: everything safe_lora takes from PEFT beyond its public top-level API, still there.

``safe_lora/_peft.py`` is the one module that uses PEFT's private names and records facts tied to its
version. These tests fail loudly when the installed PEFT no longer provides one of them, or a fact no
longer holds -- so a PEFT upgrade is checked here, in one place -- and they check that no other module
reaches past the boundary.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.metadata
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from _tuners import TUNERS, make_base, tuner_params
from packaging.specifiers import SpecifierSet
from peft.utils import get_peft_model_state_dict
from torch import nn

import safe_lora._peft as boundary
from safe_lora._fit import expected_state
from safe_lora._meta import MetaTwins, all_modules, on_meta

PACKAGE = Path(boundary.__file__).parent


def test_the_installed_peft_is_the_tested_release() -> None:
    assert peft.__version__ in SpecifierSet(boundary.TESTED_PEFT)
    declared = [r for r in importlib.metadata.requires("safe-lora") or [] if r.startswith("peft")]
    assert declared
    assert all(SpecifierSet(boundary.TESTED_PEFT) == SpecifierSet(r.removeprefix("peft")) for r in declared)


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        (peft.PeftModel, "_check_new_adapter_config"),
        (boundary.BaseTuner, "_cast_adapter_dtype"),
        (boundary.BaseTuner, "_temporarily_active"),
        (boundary.BaseTuner, "_prepare_model"),
        (boundary.BaseTunerLayer, "_move_adapter_to_device_of_base_layer"),
        (boundary.BaseTunerLayer, "_get_base_layer_device_and_dtype"),
        (boundary.BaseTunerLayer, "_active_adapter"),
    ],
)
def test_the_private_names_safe_lora_uses_exist(owner: type, name: str) -> None:
    present = hasattr(owner, name) or any(name in getattr(c, "__annotations__", {}) for c in owner.__mro__)
    if name == "_temporarily_active":  # defined by the adaption-prompt tuner, which safe_lora calls it on
        present = hasattr(boundary.tuner_class("ADAPTION_PROMPT"), name)
    if name == "_active_adapter":  # an instance attribute every tuner layer sets in __init__
        layer = boundary.tuner_class("LORA").tuner_layer_cls
        present = (
            "_active_adapter" in Path(peft.tuners.tuners_utils.__file__).read_text() and layer is not None
        )
    assert present, f"peft {peft.__version__} no longer has {owner.__name__}.{name}"


def test_only_the_boundary_imports_past_peft_s_top_level() -> None:
    """Every other module imports from PEFT only top-level public names (``from peft import X``)."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_peft.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peft."):
                offenders.append(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.ImportFrom) and node.module == "peft":
                offenders.extend(
                    f"{path.name}: from peft import {a.name}" for a in node.names if a.name.startswith("_")
                )
            if isinstance(node, ast.Import):
                offenders.extend(
                    f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("peft.")
                )
    assert offenders == []


def test_no_http_client_and_no_hub_internals() -> None:
    """The hub is reached through huggingface_hub's public API only: no HTTP client of our own (its
    errors come through the re-export ``huggingface_hub.utils.httpx``), no private hub module."""
    clients = {"httpx", "httpx2", "requests", "urllib3", "aiohttp"}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in clients, (path.name, module)
                assert not module.startswith("huggingface_hub.file_download"), (path.name, module)
                assert not any(
                    part.startswith("_") for part in module.split(".")[1:]
                ) or not module.startswith("huggingface_hub"), (path.name, module)


# --------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------


def _layer_names() -> set[str]:
    names: set[str] = set()
    for cls in {boundary.tuner_class(t) for t in boundary.known_peft_types()}:
        names |= boundary.layer_param_names(cls)
    return names


def test_every_integer_slot_is_a_tensor_name_peft_uses() -> None:
    source = "".join(p.read_text() for p in Path(peft.__file__).parent.rglob("*.py"))
    for slot in boundary.INTEGER_SLOTS | boundary.FLOAT_TENSOR_NAMES:
        # VBLoRA builds its top-k names with an f-string: f"vblora_logits_{x}_topk_{what}"
        spelled = slot.replace("_A_", "_{").replace("_B_", "_{") if slot.startswith("vblora") else slot
        assert slot in source or spelled.split("{")[0] in source, f"{slot} is not in peft {peft.__version__}"


def test_every_noop_rule_names_a_tuner_and_its_slots() -> None:
    names = _layer_names()
    for peft_type, rule in boundary.NOOP_RULES.items():
        assert boundary.tuner_class(peft_type) is not None, peft_type
        for slot in rule.slots:
            assert slot in names or slot in boundary.FLOAT_TENSOR_NAMES, f"{peft_type}: {slot}"


def test_structural_rates_and_task_classes_exist() -> None:
    import transformers

    xlora = boundary.config_class("XLORA")
    assert {f.name for f in dataclasses.fields(xlora)} >= set(boundary.STRUCTURAL_RATES)
    for name in boundary.TASK_CLASSES.values():
        assert hasattr(transformers, name)


def test_the_pattern_fields_are_fields_of_peft_configs() -> None:
    fields = {
        f.name for t in boundary.known_peft_types() for f in dataclasses.fields(boundary.config_class(t))
    }
    for spec in boundary.PATTERN_FIELDS:
        if spec.name != "*_pattern":
            assert spec.name in fields, spec.name


def test_only_loras_prepare_model_changes_the_structure() -> None:
    """module_names_matched relies on it: PEFT matches patterns after the tuner's _prepare_model."""
    overriding = {
        t
        for t in boundary.known_peft_types()
        if (cls := boundary.tuner_class(t)) is not None
        and getattr(cls, "_prepare_model", boundary.BaseTuner._prepare_model)
        is not boundary.BaseTuner._prepare_model
    }
    assert overriding <= {"LORA", "XLORA", "ADALORA"}, overriding
    # AdaLoRA's tuner subclasses LoRA's and inherits its _prepare_model unchanged.
    lora = boundary.tuner_class("LORA")
    assert boundary.tuner_class("ADALORA")._prepare_model is lora._prepare_model  # type: ignore[union-attr]


# Loading for training, CPT's prompt embedding to save is its encoder's output, which depends on the
# token-type mask's values (CPTEmbedding.get_projection): the fallback chain takes it to meta-params.
_TRAINING_NEEDS_VALUES = {"CPT"}


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("tuner", [t for t in TUNERS if t.available], ids=lambda t: t.id)
def test_injection_modes_are_the_strictest_that_work(tuner: object, training: bool) -> None:
    """Every tuner injects with all tensors on the meta device, except those INJECTION_MODES names --
    and those really cannot (so that a PEFT release that lifts the limit is noticed)."""
    t = tuner
    config = copy.deepcopy(t.config())  # type: ignore[attr-defined]
    config.inference_mode = not training  # as the loaders set it
    base = make_base(t.base)  # type: ignore[attr-defined]
    twins = MetaTwins(base)
    try:
        with on_meta():  # as safe_lora._attach injects
            model = boundary.peft_model_class(config)(base, config)
        expected_state(model, "default", file_keys=set())
        works = True
    except Exception:  # whatever PEFT raises when it needs values
        works = False
    finally:
        twins.restore(base)
    needs_values = set(boundary.INJECTION_MODES) | (_TRAINING_NEEDS_VALUES if training else set())
    assert works is (t.peft_type not in needs_values)  # type: ignore[attr-defined]


@pytest.mark.parametrize("tuner", ["lora", "vera"])
def test_hiding_the_other_adapters_gives_peft_s_own_answer_and_puts_every_entry_back(tuner: str) -> None:
    # PEFT's state dict of one adapter, its device move and upcast walk every adapter loaded; with the
    # others hidden they walk one. The answer must be PEFT's, and the containers exactly as before,
    # but for what PEFT set for the adapter inside the block.
    make = {
        "lora": lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "vera": lambda: peft.VeraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    }[tuner]
    model = peft.get_peft_model(make_base("llama"), make(), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, make())
    containers = [m for m in model.modules() if isinstance(m, (nn.ModuleDict, nn.ParameterDict))]
    before = [(c, dict(c._modules), dict(c._parameters), dict(c._buffers)) for c in containers]
    want = get_peft_model_state_dict(model, adapter_name="b")

    with boundary.other_adapters_hidden(model, "b") as hidden:
        assert hidden
        got = get_peft_model_state_dict(model, adapter_name="b")
        layer = next(m for m in model.modules() if isinstance(m, boundary.BaseTunerLayer))
        slot = next(getattr(layer, n) for n in layer.adapter_layer_names if "b" in getattr(layer, n))
        assert sorted(slot.keys()) == ["b"]  # the others are out of sight
        replacement = copy.deepcopy(slot["b"])
        slot["b"] = replacement  # what PEFT's upcast does: a new entry for the adapter

    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for container, modules, parameters, buffers in before:
        now = (dict(container._modules), dict(container._parameters), dict(container._buffers))
        if container is slot:
            expected_modules = {**modules, "b": replacement} if modules else modules
            expected_parameters = {**parameters, "b": replacement} if parameters else parameters
            assert list(now[0]) == list(modules)
            assert list(now[1]) == list(parameters)
            assert now[0] == expected_modules
            assert now[1] == expected_parameters
        else:
            assert now == (modules, parameters, buffers)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.device, torch.dtype]]:
    return [(k, t, t.device, t.dtype) for k, t in model.state_dict(keep_vars=True).items()]


def _placement(model: nn.Module) -> boundary.Placement | None:
    """The one device and floating dtype of every tensor of ``model``, if they share one."""
    devices = {t.device for _, t, _, _ in _tensors(model)}
    floats = {t.dtype for _, t, _, _ in _tensors(model) if t.is_floating_point()}
    return (devices.pop(), floats.pop()) if len(devices) == 1 and len(floats) == 1 else None


@pytest.mark.parametrize("tuner", tuner_params([t for t in TUNERS if t.available]))
def test_a_device_move_skipped_as_a_no_op_is_one_in_peft(tuner: object) -> None:
    # safe_lora skips PEFT's device move when every tensor already has the one device and dtype each
    # layer's base would give it. Wherever it would, PEFT's own move must change nothing.
    t = tuner
    config = copy.deepcopy(t.config())  # type: ignore[attr-defined]
    model = peft.get_peft_model(make_base(t.base), config)  # type: ignore[attr-defined]
    modules = all_modules(model)
    placement = _placement(model)
    if placement is None or not boundary.move_is_noop(modules, placement):
        pytest.skip("safe_lora runs PEFT's move here")
    before = _tensors(model)
    boundary.move_adapter_to_base_device(modules, "default")
    after = _tensors(model)
    assert [(k, id(t), d, dt) for k, t, d, dt in after] == [(k, id(t), d, dt) for k, t, d, dt in before]


def test_a_layer_whose_base_computes_in_another_dtype_is_moved() -> None:
    # Every tensor in float32, but one base layer computes in bfloat16 (what bitsandbytes' 4-bit
    # layers declare with compute_dtype): PEFT's move gives that layer's adapter bfloat16, so the move
    # is not a no-op.
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(make_base("llama"), config, autocast_adapter_dtype=False)
    modules = all_modules(model)
    assert _placement(model) == (torch.device("cpu"), torch.float32)
    assert boundary.move_is_noop(modules, (torch.device("cpu"), torch.float32))
    layers = [m for m in modules if isinstance(m, boundary.BaseTunerLayer)]
    layers[0].get_base_layer().compute_dtype = torch.bfloat16
    assert not boundary.move_is_noop(modules, (torch.device("cpu"), torch.float32))
    boundary.move_adapter_to_base_device(modules, "default")
    assert layers[0].lora_A["default"].weight.dtype == torch.bfloat16


class _Watched(nn.Module):
    """A module that records every attribute lookup that misses (what ``hasattr`` of a missing one does)."""

    def __init__(self) -> None:
        super().__init__()
        self.misses: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name != "misses":
            self.__dict__.setdefault("misses", []).append(name)
        return super().__getattr__(name)


def test_the_legacy_tp_walk_is_skipped_only_where_it_finds_nothing() -> None:
    # PEFT's get_peft_model_state_dict asks every module for `_tp_info` when the model has a
    # `_tp_plan` (every transformers Llama has one). safe_lora skips that walk when no module holds
    # `_tp_info`: the same state dict, the walk not made, the PeftModel as it was after.
    from peft.utils.save_and_load import _get_tp_info

    model = peft.get_peft_model(make_base("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert getattr(model, "_tp_plan", None) is not None  # so PEFT would walk
    watched = _Watched()
    model.base_model.model.add_module("watched", watched)
    want = get_peft_model_state_dict(model)
    _get_tp_info(model)
    assert "_tp_info" in watched.misses  # the walk PEFT makes
    watched.misses.clear()
    with boundary.legacy_tp_walk_skipped(model, all_modules(model)):
        assert _get_tp_info(model) is None
        got = get_peft_model_state_dict(model)
    assert "_tp_info" not in watched.misses
    assert "_tp_plan" not in vars(model)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}

    # A module with legacy TP info: PEFT must see the model's plan and collect it.
    layer = next(m for m in model.modules() if isinstance(m, boundary.BaseTunerLayer))
    layer._tp_info = object()  # type: ignore[assignment]
    with boundary.legacy_tp_walk_skipped(model, all_modules(model)):
        assert getattr(model, "_tp_plan", None) is not None
