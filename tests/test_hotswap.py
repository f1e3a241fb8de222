"""load_adapter(..., replace=True) at PEFT's level: models prepared with PEFT's
prepare_model_for_compiled_hotswap take any rank up to the padded one and any alpha, in place, as
PEFT's hotswap_adapter does -- and every refusal names its real cause and changes nothing
("After loading", item 4)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama
from peft import LoraConfig, PeftModel
from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from safetensors.torch import load_file, save_file
from torch import nn

from safe_lora import AdapterConfigError, AdapterWeightsError, load_adapter, load_for_inference

IDS = torch.tensor([[1, 5, 9, 3, 2, 7]])
TARGETS = ["q_proj", "v_proj", "o_proj"]
TARGET_RANK = 8


def lora(r: int, alpha: float, **overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = {
        "target_modules": TARGETS,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "init_lora_weights": False,
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hotswap")
    shapes = {"r4": (4, 8), "r8": (8, 32), "r2": (2, 3), "r4b": (4, 8), "r16": (16, 16)}
    return {
        name: save_adapter(tiny_llama(), lora(r, alpha), root / name, train_steps=1, seed=i)
        for i, (name, (r, alpha)) in enumerate(shapes.items())
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()  # type: ignore[no-any-return]


def prepared(path: Path) -> PeftModel:
    model = load_for_inference(tiny_llama(), path)
    prepare_model_for_compiled_hotswap(model, target_rank=TARGET_RANK)
    return model


def scalings(model: nn.Module) -> dict[str, Any]:
    """Every scaling of every LoRA layer: the objects (tensors after preparing) and their values."""
    found = {}
    for name, module in model.named_modules():
        held = getattr(module, "scaling", None)
        if isinstance(held, dict):  # LoRA layers (attention modules have a float scaling of their own)
            for adapter, value in held.items():
                found[f"{name}.{adapter}"] = (id(value), float(value))
    return found


def tensors(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}


def test_a_prepared_model_takes_other_ranks_and_alphas_as_peft_does(folders: dict[str, Path]) -> None:
    from torch._dynamo.testing import CompileCounter

    ours = prepared(folders["r4"])
    raw = PeftModel.from_pretrained(tiny_llama(), str(folders["r4"])).eval()
    prepare_model_for_compiled_hotswap(raw, target_rank=TARGET_RANK)
    objects, scaling_objects = tensors(ours), {k: v[0] for k, v in scalings(ours).items()}
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter)
    with torch.no_grad():
        compiled(input_ids=IDS)
        compiled(input_ids=IDS)
    compiles = counter.frame_count

    for step in ["r8", "r2", "r4b", "r4"]:  # up, down, the same rank with other weights, back
        load_adapter(compiled, folders[step], adapter_name="default", replace=True)
        hotswap_adapter(raw, str(folders[step]), adapter_name="default", torch_device="cpu")
        with torch.no_grad():
            served = compiled(input_ids=IDS).logits
        assert torch.equal(served, logits(raw)), step  # PEFT's own hot swap, bit for bit
        assert counter.frame_count == compiles, step  # no recompilation
        assert tensors(ours) == objects  # the same tensors, the same storage
        assert {k: v[0] for k, v in scalings(ours).items()} == scaling_objects  # the same scaling tensors
        for module in ours.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                assert module.lora_A["default"].weight.shape[0] == TARGET_RANK  # still padded
    fresh = logits(load_for_inference(tiny_llama(), folders["r4"]))
    torch.testing.assert_close(logits(ours), fresh, rtol=0, atol=1e-6)  # padding: the sum's order only
    assert ours.peft_config["default"].r == 4


def test_a_refusal_on_a_prepared_model_changes_nothing(folders: dict[str, Path], tmp_path: Path) -> None:
    model = prepared(folders["r4"])
    load_adapter(model, folders["r2"], adapter_name="default", replace=True)
    before, scaling_before, expected = snapshot(model), scalings(model), logits(model)

    with pytest.raises(AdapterConfigError, match=r"configs differ in r: new 16, above the rank 8") as info:
        load_adapter(model, folders["r16"], adapter_name="default", replace=True)
    assert info.value.fields == ["r"]

    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_bytes((folders["r8"] / "adapter_config.json").read_bytes())
    weights = load_file(str(folders["r8"] / "adapter_model.safetensors"))
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterWeightsError, match="NaN or inf"):
        load_adapter(model, nan, adapter_name="default", replace=True)

    assert_unchanged(model, before)
    assert scalings(model) == scaling_before  # the scaling tensors too, objects and values
    assert torch.equal(logits(model), expected)


def test_an_unprepared_model_refuses_another_rank_and_names_the_way(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["r4"])
    before = snapshot(model)
    with pytest.raises(
        AdapterConfigError, match=r"configs differ in r: loaded 4, new 8 .*prepare_model_for_compiled_hotswap"
    ):
        load_adapter(model, folders["r8"], adapter_name="default", replace=True)
    assert_unchanged(model, before)


def test_the_configs_are_named_first_whatever_the_keys_say(folders: dict[str, Path], tmp_path: Path) -> None:
    """Other targets *and* another rank: both fields named, in that order, under strict=False too."""
    other = save_adapter(tiny_llama(), lora(2, 8, target_modules=["k_proj"]), tmp_path / "k", train_steps=1)
    model = load_for_inference(tiny_llama(), folders["r4"])
    before = snapshot(model)
    for strict in (True, False):
        with pytest.raises(AdapterConfigError) as info:
            load_adapter(model, other, adapter_name="default", replace=True, strict=strict)
        message = str(info.value)
        assert "unexpected" not in message
        assert "strict=False" not in message
        assert message.index("targets: loaded adapts 6 module(s), new 2") < message.index(
            "r: loaded 4, new 2"
        )
        assert "only new: [model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj]" in message
        assert info.value.fields == ["r", "target_modules"]
    assert_unchanged(model, before)


def test_a_variant_is_named(folders: dict[str, Path], tmp_path: Path) -> None:
    dora = save_adapter(tiny_llama(), lora(4, 8, use_dora=True), tmp_path / "dora", train_steps=1)
    model = prepared(folders["r4"])
    with pytest.raises(AdapterConfigError, match=r"use_dora: loaded False, new True") as info:
        load_adapter(model, dora, adapter_name="default", replace=True)
    assert info.value.fields == ["use_dora"]


def _rewrite(source: Path, target: Path, change: Any) -> Path:
    target.mkdir()
    (target / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    weights = load_file(str(source / "adapter_model.safetensors"))
    change(weights)
    save_file(weights, str(target / "adapter_model.safetensors"))
    return target


def test_shape_misfits_are_mismatched_keys(folders: dict[str, Path], tmp_path: Path) -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    def wider(weights: dict[str, torch.Tensor]) -> None:
        weights[key] = torch.zeros(40, 4)  # q_proj has 32 outputs

    path = _rewrite(folders["r4b"], tmp_path / "wide", wider)
    model = load_for_inference(tiny_llama(), folders["r4"])
    before = snapshot(model)
    with pytest.raises(AdapterWeightsError, match=r"1 key\(s\) of another shape \(file vs loaded\)") as info:
        load_adapter(model, path, adapter_name="default", replace=True)
    assert info.value.mismatched_keys == {key: ((40, 4), (32, 4))}
    assert info.value.unexpected_keys == []
    assert info.value.missing_keys == []
    assert_unchanged(model, before)


def test_messages_list_ten_keys_and_attributes_all(folders: dict[str, Path], tmp_path: Path) -> None:
    extra = [
        f"base_model.model.model.layers.{i}.mlp.{m}.lora_{f}.weight"
        for i in range(2)
        for m in ("gate_proj", "up_proj", "down_proj")
        for f in "AB"
    ]

    def more(weights: dict[str, torch.Tensor]) -> None:
        weights.update({k: torch.zeros(4, 4) for k in extra})

    path = _rewrite(folders["r4b"], tmp_path / "more", more)
    model = load_for_inference(tiny_llama(), folders["r4"])
    with pytest.raises(AdapterWeightsError, match=r"12 unexpected key\(s\): .*, and 2 more") as info:
        load_adapter(model, path, adapter_name="default", replace=True)
    assert info.value.unexpected_keys == sorted(extra)
    assert str(info.value).count("mlp.") == 10


class CountCopies:
    """Counts tensor ``copy_`` calls while armed, and at call ``at`` raises a real SIGINT."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.calls = 0

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and getattr(arg, "__name__", "") == "copy_":
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)

    def run(self, call: Any) -> None:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.setprofile(self.profile)
        try:
            call()
        finally:
            sys.setprofile(None)
            signal.signal(signal.SIGINT, previous)


def test_a_keyboard_interrupt_half_way_through_the_writes_puts_everything_back(
    folders: dict[str, Path],
) -> None:
    # How many copy_ calls a swap makes: the writes are the last ones (nothing after them copies).
    counting, twin = CountCopies(), prepared(folders["r4"])
    counting.run(lambda: load_adapter(twin, folders["r8"], adapter_name="default", replace=True))
    writes = 3 * 2 * 2  # q, v, o in 2 layers, lora_A and lora_B
    assert counting.calls >= writes

    model = prepared(folders["r4"])
    before, scaling_before, expected = snapshot(model), scalings(model), logits(model)
    interrupt = CountCopies(at=counting.calls - writes // 2)  # half of the tensors written
    with pytest.raises(KeyboardInterrupt):
        interrupt.run(lambda: load_adapter(model, folders["r8"], adapter_name="default", replace=True))
    assert interrupt.calls >= interrupt.at  # type: ignore[operator]
    assert_unchanged(model, before)
    assert scalings(model) == scaling_before
    assert torch.equal(logits(model), expected)
    assert model.peft_config["default"].r == 4


def test_adalora_keeps_its_own_scaling(tmp_path: Path) -> None:
    """AdaLoRA shares LoRA's "lora_" prefix but scales by alpha itself: a new alpha is named, not
    rewritten with LoRA's formula."""
    from peft import AdaLoraConfig

    def adalora(alpha: float, seed: int) -> Path:
        config = AdaLoraConfig(
            target_modules=["q_proj"], init_r=4, lora_alpha=alpha, total_step=10, task_type="CAUSAL_LM"
        )
        return save_adapter(tiny_llama(), config, tmp_path / f"a{alpha}-{seed}", train_steps=1, seed=seed)

    model = load_for_inference(tiny_llama(), adalora(8, 0))
    before = snapshot(model)
    with pytest.raises(AdapterConfigError, match=r"lora_alpha: loaded 8, new 16") as info:
        load_adapter(model, adalora(16, 1), adapter_name="default", replace=True)
    assert info.value.fields == ["lora_alpha"]
    assert_unchanged(model, before)
    same = adalora(8, 2)
    load_adapter(model, same, adapter_name="default", replace=True)
    assert torch.equal(logits(model), logits(load_for_inference(tiny_llama(), same)))
