"""Rollback: a refused load leaves every tensor bit-identical, in-place writes included (issue 10),
and the capture for an add does not grow with the adapters already loaded (issue 12)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import assert_unchanged, make_mlp, save_adapter, snapshot, tiny_llama, tiny_llama_as
from peft import LoraConfig, get_peft_model
from torch import nn

from safe_lora import AdapterWeightsError, load_adapter, load_for_inference, load_for_training
from safe_lora._attach import _protect_in_place_targets
from safe_lora._rollback import Snapshot

IDS = torch.tensor([[1, 5, 9, 3, 2]])

# The misfit adapters below are saved fresh (lora_B zero): safe_lora rightly says they change nothing.
pytestmark = pytest.mark.filterwarnings("ignore::safe_lora.errors.NoOpAdapterWarning")


BNB = pytest.mark.bnb
BASES = ["fp32", "bf16", pytest.param("bnb4-fp32", marks=BNB), pytest.param("bnb8", marks=BNB)]


def quant_state(model: nn.Module) -> dict[str, Any]:
    """What snapshot() cannot see: the bnb attributes of every weight, as plain values."""
    found: dict[str, Any] = {}
    for name, param in model.named_parameters():
        for attr, value in vars(param).items():
            state = value.as_dict(packed=True) if hasattr(value, "as_dict") else value
            if isinstance(state, dict):
                for k, v in state.items():
                    found[f"{name}.{attr}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
            elif isinstance(state, torch.Tensor):
                found[f"{name}.{attr}"] = state.clone()
            elif isinstance(state, (bool, int, float, str)) or state is None:
                found[f"{name}.{attr}"] = state
    return found


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]  # type: ignore[arg-type]
        for k in a
    )


INITS: dict[str, dict[str, Any]] = {
    "default": {},
    "pissa": {"init_lora_weights": "pissa"},  # swaps the base weight's storage for a residual
    "olora": {"init_lora_weights": "olora"},  # writes the fp32 base weight in place
    "kasa": {"kasa_config": peft.KasaConfig()},  # truncates the base weight
}


def _misfit_adapter(kind: str, folder: Path, init: str, tmp: Path) -> Path:
    """A real adapter saved at r=2 whose config then claims r=4: PEFT injects (running the init on
    the real base weights) before the shapes can disagree."""
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM", **INITS[init])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_llama_as(kind, folder), config)
    except (ValueError, TypeError) as exc:  # raw PEFT refuses some inits on quantized weights
        pytest.skip(f"raw PEFT cannot create a {init} adapter on a {kind} base: {exc}")
    model.save_pretrained(tmp / "adapter")
    path = tmp / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 4}))
    return tmp / "adapter"


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("init", list(INITS))
@pytest.mark.parametrize("kind", BASES)
def test_a_refused_load_leaves_every_tensor_bit_identical(
    kind: str, init: str, strict: bool, llama_folder: Path, tmp_path: Path
) -> None:
    adapter = _misfit_adapter(kind, llama_folder, init, tmp_path)
    model = tiny_llama_as(kind, llama_folder)
    with torch.no_grad():
        # First: bnb's 8-bit layer moves its quantization state off the weight on its first forward.
        expected = model(IDS).logits
    before, quant = snapshot(model), quant_state(model)
    with pytest.raises(AdapterWeightsError, match="wrong shape"):
        load_for_inference(model, adapter, strict=strict)
    assert_unchanged(model, before)
    assert same_state(quant_state(model), quant)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


class Interrupt:
    """A load_state_dict post hook that interrupts the load once PEFT has injected (and run its init)."""

    def __init__(self) -> None:
        self.fired = 0

    def __call__(self, module: nn.Module, incompatible: object) -> None:
        self.fired += 1
        raise KeyboardInterrupt


@pytest.mark.parametrize("init", ["pissa", "olora", "kasa"])
def test_keyboard_interrupt_mid_load_restores_rewritten_base_weights(init: str, tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM", **INITS[init])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "a")
    model = tiny_llama()
    interrupt = Interrupt()
    model.model.layers[0].self_attn.register_load_state_dict_post_hook(interrupt)
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt):
        load_for_training(model, tmp_path / "a")
    assert interrupt.fired
    assert_unchanged(model, before)


def test_a_refused_load_keeps_the_callers_hook_handles_working(llama_folder: Path, tmp_path: Path) -> None:
    # A RemovableHandle holds a weak reference to the very dict its hook sits in: a rollback that
    # put back copies of the module's hook dicts would leave the hook impossible to remove.
    adapter = _misfit_adapter("fp32", llama_folder, "default", tmp_path)
    model = tiny_llama_as("fp32", llama_folder)
    calls: list[str] = []
    q_proj = model.model.layers[0].self_attn.q_proj
    handles = [
        q_proj.register_forward_hook(lambda *_: calls.append("forward")),
        q_proj.register_forward_pre_hook(lambda *_: calls.append("pre")),
        model.register_load_state_dict_post_hook(lambda *_: calls.append("load")),
    ]
    containers = {name: id(value) for name, value in vars(q_proj).items() if isinstance(value, dict)}
    with pytest.raises(AdapterWeightsError, match="wrong shape"):
        load_for_inference(model, adapter)
    assert {name: id(value) for name, value in vars(q_proj).items() if isinstance(value, dict)} == containers
    with torch.no_grad():
        model(IDS)
    assert calls == ["pre", "forward"]
    for handle in handles:
        handle.remove()
    calls.clear()
    with torch.no_grad():
        model(IDS)
    assert calls == []
    assert not q_proj._forward_hooks
    assert not q_proj._forward_pre_hooks


class Scribble(Interrupt):
    """Writes q_proj's quantized weight and its state in place -- as a PEFT code path that re-packs
    a bitsandbytes weight would -- then interrupts the load."""

    def __call__(self, module: nn.Module, incompatible: object) -> None:
        weight = module.q_proj.get_base_layer().weight
        with torch.no_grad():
            weight.data.bitwise_not_()  # the packed uint8 / int8 storage itself
            for attr in ("quant_state", "SCB"):
                state = getattr(weight, attr, None)
                absmax = state if isinstance(state, torch.Tensor) else getattr(state, "absmax", None)
                if isinstance(absmax, torch.Tensor):
                    absmax.mul_(2)
        super().__call__(module, incompatible)


@pytest.mark.bnb
@pytest.mark.parametrize("kind", ["bnb4-fp32", "bnb4-bf16", "bnb8"])
def test_quantized_storage_written_in_place_is_restored(
    kind: str, llama_folder: Path, tmp_path: Path
) -> None:
    # No PEFT 0.21 path was found that re-packs a weight on a refused LoRA load; this writes it by
    # hand mid-load, so that the backup of quantized targets is proven, whichever PEFT does it.
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(tiny_llama_as(kind, llama_folder), config).save_pretrained(tmp_path / "a")
    model = tiny_llama_as(kind, llama_folder)
    with torch.no_grad():
        expected = model(IDS).logits
    scribble = Scribble()
    model.model.layers[0].self_attn.register_load_state_dict_post_hook(scribble)
    before, quant = snapshot(model), quant_state(model)
    with pytest.raises(KeyboardInterrupt):
        load_for_inference(model, tmp_path / "a")
    assert scribble.fired
    assert_unchanged(model, before)
    assert same_state(quant_state(model), quant)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


@pytest.mark.parametrize(
    ("config", "backed_up"),
    [
        (LoraConfig(target_modules=["q_proj", "v_proj"], r=2), set()),  # the common load copies nothing
        (LoraConfig(target_modules="all-linear", r=2), set()),
        (
            LoraConfig(target_modules=["q_proj"], r=2, init_lora_weights="olora"),
            {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"},
        ),
    ],
)
def test_only_tensors_a_load_can_write_in_place_are_copied(config: LoraConfig, backed_up: set[str]) -> None:
    model = tiny_llama()
    snap = Snapshot(model)
    _protect_in_place_targets(model, config, snap)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(t)] for t, *_ in snap._values} == backed_up


def test_the_capture_for_an_add_does_not_grow_with_the_adapters_loaded(tmp_path: Path) -> None:
    """Existing adapters' own modules are sealed: the N-th add captures what the first did."""
    configs = [LoraConfig(target_modules=["fc1", "fc2"], r=2, init_lora_weights=False) for _ in range(6)]
    paths = [save_adapter(make_mlp(), c, tmp_path / f"a{i}", seed=i) for i, c in enumerate(configs)]
    model = load_for_inference(make_mlp(), paths[0], adapter_name="a0")
    sizes = []
    for i, path in enumerate(paths[1:], start=1):
        sizes.append(len(Snapshot(model).modules))
        load_adapter(model, path, adapter_name=f"a{i}")
    assert len(set(sizes)) == 1, sizes
    assert sum(1 for _ in model.modules()) > 2 * sizes[0] // 2  # while the model itself grew


def test_a_refused_add_restores_the_other_adapters_exactly(tmp_path: Path) -> None:
    configs = {n: LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False) for n in ("a", "b")}
    paths = {n: save_adapter(make_mlp(), c, tmp_path / n, seed=i) for i, (n, c) in enumerate(configs.items())}
    model = load_for_training(make_mlp(), paths["a"], adapter_name="a")
    model.base_model.model.fc1.lora_A["a"].requires_grad_(False)  # the caller froze one factor
    (paths["b"] / "adapter_config.json").write_text(
        json.dumps({**json.loads((paths["b"] / "adapter_config.json").read_text()), "r": 3})
    )
    before = snapshot(model)
    with pytest.raises(AdapterWeightsError, match="wrong shape"):
        load_adapter(model, paths["b"], adapter_name="b")
    assert_unchanged(model, before)


def test_snapshot_restores_a_swapped_storage_without_copying_it() -> None:
    model = make_mlp()
    weight = model.fc1.weight
    original = weight.detach().clone()
    snap = Snapshot(model)
    weight.data = torch.zeros_like(weight)  # what PiSSA's init does to a base weight
    snap.restore()
    assert model.fc1.weight is weight
    assert torch.equal(weight, original)
    assert snap._values == []  # nothing was copied for it


def test_restore_puts_back_grads_modes_and_structure() -> None:
    model = make_mlp()
    model.fc2.requires_grad_(False)
    snap = Snapshot(model)
    before = snapshot(model)
    model.fc1 = nn.Linear(2, 8)
    model.fc2.requires_grad_(True)
    model.train()
    model.extra = nn.ReLU()
    snap.restore()
    assert_unchanged(model, before)


def test_deepcopy_free_guard_leaves_no_trace(tmp_path: Path) -> None:
    """The load_state_dict interception is an instance attribute for the load only."""
    config = LoraConfig(target_modules=["fc1"], r=2, init_lora_weights=False)
    path = save_adapter(make_mlp(), config, tmp_path / "a")
    model = load_for_inference(make_mlp(), path)
    assert "load_state_dict" not in vars(model)
    copy.deepcopy(model)
