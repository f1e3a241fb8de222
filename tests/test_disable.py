"""use_adapter(model, None): every adapter off for a block -- exactly the base model's outputs, and
nothing else changes ("After loading", item 1)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _tuners import TUNERS, Tuner, make_base, output
from conftest import assert_unchanged, llama_lora, save_adapter, snapshot, tiny_llama
from peft import PeftModel
from torch import nn

from safe_lora import (
    AdapterConfigError,
    deterministic_lora,
    load_for_inference,
    load_for_training,
    set_active_adapter,
    use_adapter,
)

IDS = torch.tensor([[1, 5, 9, 3, 2, 7]])
Loader = Callable[..., Any]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("disable")
    return {
        "a": save_adapter(tiny_llama(), llama_lora(), root / "a", seed=1),
        "b": save_adapter(
            tiny_llama(), llama_lora(target_modules=["k_proj", "o_proj"], r=4), root / "b", seed=2
        ),
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()  # type: ignore[no-any-return]


BASE = logits(tiny_llama())
Flags = tuple[dict[int, bool], dict[int, bool]]


def flags(model: nn.Module) -> Flags:
    """(requires_grad, training) by object identity: PEFT's switches may move modules around."""
    return (
        {id(p): p.requires_grad for p in model.parameters()},
        {id(m): m.training for m in model.modules()},
    )


def shared(these: Flags, others: Flags) -> Flags:
    """``these`` flags, of the objects ``others`` also has."""
    return (
        {k: v for k, v in these[0].items() if k in others[0]},
        {k: v for k, v in these[1].items() if k in others[1]},
    )


def alone(path: Path) -> torch.Tensor:
    return logits(load_for_inference(tiny_llama(), path))


def test_raw_peft_switches_gradients_on_when_its_disable_block_ends(folders: dict[str, Path]) -> None:
    """The trap: PEFT's disable_adapter() (and enable_adapter_layers()) make a frozen model trainable."""
    model = load_for_inference(tiny_llama(), folders["a"])
    trainable = lambda: sum(p.requires_grad for p in model.parameters())  # noqa: E731
    assert trainable() == 0
    with model.disable_adapter():
        assert trainable() == 0
    assert trainable() == 8  # lora_A and lora_B of q_proj and v_proj in 2 layers
    model.base_model.disable_adapter_layers()
    model.base_model.enable_adapter_layers()
    assert trainable() == 8


@pytest.mark.parametrize("loader", [load_for_inference, load_for_training])
def test_none_computes_the_base_model_and_changes_nothing(folders: dict[str, Path], loader: Loader) -> None:
    model = loader(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    model.base_model.model.model.layers[1].eval()  # a mode the caller set on purpose
    with deterministic_lora(model):
        adapted = logits(model)
    assert not torch.equal(adapted, BASE)
    before, inside = snapshot(model), flags(model)

    with use_adapter(model, None) as returned:
        assert returned is model
        assert flags(model) == inside  # every requires_grad and mode, also inside the block
        assert torch.equal(logits(model), BASE)

    assert_unchanged(model, before)
    assert model.active_adapters == ["a"]
    with deterministic_lora(model):
        assert torch.equal(logits(model), adapted)


def test_a_training_step_around_a_reference_forward(folders: dict[str, Path]) -> None:
    """DPO's shape: the base model's logits as the reference, the adapter trained against them."""
    model = load_for_training(tiny_llama(), folders["a"])
    adapter = [p for p in model.parameters() if p.requires_grad]
    assert len(adapter) == 8
    optimizer = torch.optim.SGD(adapter, lr=0.1)
    values = [p.detach().clone() for p in adapter]
    with use_adapter(model, None):
        reference = model(input_ids=IDS).logits
        assert not reference.requires_grad  # no adapter took part: nothing to backpropagate into
        assert all(p.requires_grad for p in adapter)  # still trainable inside
    with deterministic_lora(model):
        assert torch.equal(reference, BASE)
    policy = model(input_ids=IDS).logits
    (policy - reference).pow(2).mean().backward()
    optimizer.step()
    assert all(p.grad is not None for p in adapter)
    assert all(not torch.equal(p, v) for p, v in zip(adapter, values, strict=True))
    assert all(m.training for m in model.modules())
    assert [p for p in model.parameters() if p.requires_grad] == adapter


def test_an_inner_none_block_inside_an_adapter_block(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    before = snapshot(model)
    with use_adapter(model, "b"):
        with use_adapter(model, None):
            assert torch.equal(logits(model), BASE)
            with use_adapter(model, None):  # nested twice: still the base model
                assert torch.equal(logits(model), BASE)
            assert torch.equal(logits(model), BASE)
        assert torch.equal(logits(model), alone(folders["b"]))
        assert model.active_adapters == ["b"]
    assert_unchanged(model, before)
    assert torch.equal(logits(model), alone(folders["a"]))


def test_an_adapter_block_inside_a_none_block_computes_that_adapter(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    before = snapshot(model)
    with use_adapter(model, None):
        with use_adapter(model, None), use_adapter(model, "b"):  # inside two None blocks
            assert torch.equal(logits(model), alone(folders["b"]))
            assert model.active_adapters == ["b"]
        assert torch.equal(logits(model), BASE)
        with use_adapter(model, "a"):
            assert torch.equal(logits(model), alone(folders["a"]))
        assert torch.equal(logits(model), BASE)
    assert_unchanged(model, before)
    assert torch.equal(logits(model), alone(folders["a"]))


@pytest.mark.parametrize("order", ["deterministic outside", "deterministic inside"])
def test_nests_with_deterministic_lora_on_a_training_model(folders: dict[str, Path], order: str) -> None:
    model = load_for_training(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    before = snapshot(model)
    if order == "deterministic outside":
        with deterministic_lora(model):
            with use_adapter(model, None):
                assert torch.equal(logits(model), BASE)
            assert torch.equal(logits(model), alone(folders["a"]))
    else:
        with use_adapter(model, None):
            with deterministic_lora(model), use_adapter(model, "b"):
                assert torch.equal(logits(model), alone(folders["b"]))
            assert torch.equal(logits(model), BASE)
    assert_unchanged(model, before)
    assert all(m.training for m in model.modules())


def test_restores_when_the_block_raises(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    before = snapshot(model)

    def fail_inside() -> None:
        with use_adapter(model, "b"), use_adapter(model, None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert_unchanged(model, before)
    assert model.active_adapters == ["a"]
    assert torch.equal(logits(model), alone(folders["a"]))


def test_a_layer_the_caller_switched_off_stays_off(folders: dict[str, Path]) -> None:
    """PEFT's disable_adapter() switches every layer back on at its end; here only what was on."""
    model = load_for_inference(tiny_llama(), folders["a"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.enable_adapters(False)
    before = snapshot(model)
    with use_adapter(model, None):
        assert torch.equal(logits(model), BASE)
    assert layer.disable_adapters
    assert_unchanged(model, before)


def test_refused_when_loading_rewrote_the_base_weights(tmp_path: Path) -> None:
    """PiSSA leaves the residual W - BA in the base layer: adapters off is not the base model."""
    path = save_adapter(
        tiny_llama(), llama_lora(init_lora_weights="pissa"), tmp_path / "pissa", train_steps=1
    )
    model = load_for_inference(tiny_llama(), path)
    with model.disable_adapter():  # what PEFT computes: not the base model
        assert not torch.allclose(logits(model), BASE, atol=1e-4)
    before = snapshot(model)
    pissa = r"init_lora_weights='pissa'.*freshly loaded base"
    with pytest.raises(AdapterConfigError, match=pissa) as info, use_adapter(model, None):
        pytest.fail("the block must not run")
    assert info.value.fields == ["init_lora_weights"]
    assert_unchanged(model, before)


def test_refused_while_an_adapter_is_merged(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    model.merge_adapter()
    before = snapshot(model)
    merged = r"merged into the base weights.*unmerge_adapter\(\) first"
    with pytest.raises(ValueError, match=merged), use_adapter(model, None):
        pytest.fail("the block must not run")
    assert_unchanged(model, before)


def test_set_active_adapter_takes_no_none(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"use_adapter\(model, None\)"):
        set_active_adapter(model, None)  # type: ignore[arg-type]
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------------
# Every tuner: PEFT's own switch (tuner layers, modules_to_save, trainable tokens, LN tuning, UniLoRA,
# prompt learning, adaption prompt), requires_grad and modes kept
# --------------------------------------------------------------------------------------------------

# Shadow's forward fails on this base in raw PEFT too; multitask prompt tuning needs task ids.
_SKIPPED = {"shadow", "multitask-prompt-tuning"}


@pytest.mark.slow
@pytest.mark.parametrize("tuner", [t for t in TUNERS if t.id not in _SKIPPED], ids=lambda t: t.id)
def test_every_tuner_off_is_the_base_model(tuner: Tuner) -> None:
    if not tuner.available:
        pytest.skip(f"{tuner.peft_type} needs {tuner.needs}")
    with tempfile.TemporaryDirectory() as folder:
        path = save_adapter(make_base(tuner.base), tuner.config(), Path(folder) / "a", train_steps=1)
        model = load_for_inference(make_base(tuner.base), path)
    base = output(make_base(tuner.base), tuner.base, **tuner.forward_kwargs)
    adapted = output(model, tuner.base, **tuner.forward_kwargs)
    assert not torch.equal(adapted, base)
    before, inside = snapshot(model), flags(model)
    with use_adapter(model, None):
        assert torch.equal(output(model, tuner.base, **tuner.forward_kwargs), base)
        now = flags(model)
        if tuner.peft_type == "ADAPTION_PROMPT":
            # PEFT swaps the adapted attention modules out for the block: compare what is there.
            now, inside = shared(now, inside), shared(inside, now)
        assert now == inside
    assert_unchanged(model, before)
    assert torch.equal(output(model, tuner.base, **tuner.forward_kwargs), adapted)


@pytest.mark.slow
def test_x_lora_off_is_the_base_model(tmp_path: Path) -> None:
    """X-LoRA overrides the tuner's switch: PEFT's disable_adapter() is the one that knows it."""
    import peft
    from conftest import QUANTIZABLE, quantizable_llama

    def base() -> Any:
        model = quantizable_llama()
        model.config.use_cache = False  # X-LoRA refuses a cache
        return model

    experts = {str(s): str(save_adapter(base(), llama_lora(), tmp_path / f"e{s}", seed=s)) for s in (0, 1)}
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=QUANTIZABLE["hidden_size"], adapters=experts, xlora_depth=2
    )
    model = load_for_inference(base(), save_adapter(base(), config, tmp_path / "x", train_steps=1))
    expected, adapted = logits(base()), logits(model)
    assert not torch.equal(adapted, expected)
    before, inside = snapshot(model), flags(model)
    with use_adapter(model, None):
        assert torch.equal(logits(model), expected)
        assert flags(model) == inside
    assert_unchanged(model, before)
    assert torch.equal(logits(model), adapted)


def test_peft_model_class_is_what_use_adapter_yields(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    with use_adapter(torch.compile(model), None) as inner:  # the compiled wrapper is accepted
        assert isinstance(inner, PeftModel)
        assert torch.equal(logits(model), BASE)


def test_several_active_adapters_all_off(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]})
    set_active_adapter(model, ["a", "b"])
    combined = logits(model)
    before = snapshot(model)
    with use_adapter(model, None):
        assert torch.equal(logits(model), BASE)
    assert_unchanged(model, before)
    assert model.active_adapters == ["a", "b"]
    assert torch.equal(logits(model), combined)
