"""Several adapters on one base: load_for_inference({...}), load_adapter, use_adapter (issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MLP, assert_unchanged, make_mlp, save_adapter, snapshot
from peft import LoraConfig, PeftModel
from torch import nn

from safe_lora import (
    AdapterConfigError,
    AdapterExistsError,
    AdapterWeightsError,
    UnknownAdapterError,
    load_adapter,
    load_for_inference,
    load_for_training,
    use_adapter,
)

X = torch.tensor([[0.5, -1.0], [1.5, 2.0]])

CONFIGS = {
    "a": LoraConfig(target_modules=["fc1"], r=4, lora_dropout=0.5, init_lora_weights=False),
    "b": LoraConfig(target_modules=["fc2"], r=2, lora_dropout=0.5, init_lora_weights=False),
    "c": LoraConfig(target_modules=["fc1", "fc2"], r=3, lora_dropout=0.5, init_lora_weights=False),
}


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    return {
        name: save_adapter(make_mlp(), config, tmp_path / name, seed=i)
        for i, (name, config) in enumerate(CONFIGS.items())
    }


def alone(path: Path) -> torch.Tensor:
    return load_for_inference(make_mlp(), path)(X)


def grad_flags(model: nn.Module) -> dict[int, bool]:
    """requires_grad by parameter identity: names change when PEFT wraps a layer."""
    return {id(p): p.requires_grad for p in model.parameters()}


def no_grads(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.parameters())


def test_each_adapter_gives_its_own_outputs(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters)
    assert model.active_adapters == ["a"]  # the first by default
    assert not any(m.training for m in model.modules())
    assert no_grads(model)
    outs = {}
    for name, path in adapters.items():
        with use_adapter(model, name):
            outs[name] = model(X)
            assert model.active_adapters == [name]
        torch.testing.assert_close(outs[name], alone(path))
    assert not torch.allclose(outs["a"], outs["b"])
    assert model.active_adapters == ["a"]


def test_active_and_dropout_of_every_adapter(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters, active="b")
    assert model.active_adapters == ["b"]
    torch.testing.assert_close(model(X), alone(adapters["b"]))
    for name in adapters:
        for module in model.modules():
            if hasattr(module, "lora_dropout") and name in module.lora_dropout:
                assert isinstance(module.lora_dropout[name], nn.Identity)
    assert model.peft_config["c"].lora_dropout == 0.0


def test_unknown_active_is_refused(adapters: dict[str, Path]) -> None:
    base = make_mlp()
    before = snapshot(base)
    with pytest.raises(UnknownAdapterError, match=r"expected one of \['a', 'b', 'c'\], found active='z'"):
        load_for_inference(base, adapters, active="z")
    assert_unchanged(base, before)


def test_raw_peft_set_adapter_turns_gradients_on(adapters: dict[str, Path]) -> None:
    """The trap use_adapter avoids: switching adapters makes an inference model trainable."""
    raw = PeftModel.from_pretrained(make_mlp(), str(adapters["a"]))
    raw.load_adapter(str(adapters["b"]), "b")
    raw.set_adapter("b")
    assert not no_grads(raw)


def test_switching_never_turns_gradients_on(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters)
    for name in ["c", "b", "a", "c"]:
        with use_adapter(model, name):
            assert no_grads(model)
            assert not any(m.training for m in model.modules())
        assert no_grads(model)


def test_use_adapter_restores_on_exception_and_keeps_flags(adapters: dict[str, Path]) -> None:
    model = load_for_training(make_mlp(), adapters["a"])
    load_adapter(model, adapters["b"], adapter_name="b")
    model.base_model.model.fc2.eval()  # frozen on purpose by the user
    before = snapshot(model)
    seen: list[list[str]] = []

    def fail_inside() -> None:
        with use_adapter(model, "b"):
            seen.append(list(model.active_adapters))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert seen == [["b"]]
    assert model.active_adapters == ["default"]
    assert_unchanged(model, before)


def test_use_adapter_unknown_name(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters["a"])
    with pytest.raises(UnknownAdapterError, match=r"load it first with safe_lora\.load_adapter"):
        use_adapter(model, "nope").__enter__()


def test_a_failing_adapter_in_the_mapping_leaves_the_model(adapters: dict[str, Path]) -> None:
    (adapters["c"] / "adapter_model.safetensors").write_bytes(b"garbage")
    base = make_mlp()
    before = snapshot(base)
    with pytest.raises(AdapterWeightsError, match="not a valid safetensors file"):
        load_for_inference(base, adapters)
    assert_unchanged(base, before)


@pytest.mark.parametrize("problem", ["corrupt", "targets nothing"])
def test_a_failing_second_adapter_leaves_the_first_intact(adapters: dict[str, Path], problem: str) -> None:
    model = load_for_inference(make_mlp(), adapters["a"])
    expected = model(X)
    if problem == "corrupt":
        (adapters["b"] / "adapter_model.safetensors").write_bytes(b"garbage")
        error: type[Exception] = AdapterWeightsError
    else:  # PEFT itself would accept this silently
        cfg_path = adapters["b"] / "adapter_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "target_modules": ["nope"]}))
        error = AdapterConfigError
    before = snapshot(model)
    with pytest.raises(error):
        load_adapter(model, adapters["b"], adapter_name="b")
    assert_unchanged(model, before)
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(model(X), expected)


def test_load_adapter_into_inference_model(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters["a"])
    before = grad_flags(model)
    returned = load_adapter(model, adapters["c"], adapter_name="c")
    assert returned is model
    assert model.active_adapters == ["default"]
    assert no_grads(model)
    assert not any(m.training for m in model.modules())
    assert isinstance(model.base_model.model.fc1.lora_dropout["c"], nn.Identity)
    after = grad_flags(model)
    assert {k: after[k] for k in before} == before
    with use_adapter(model, "c"):
        torch.testing.assert_close(model(X), alone(adapters["c"]))


def test_load_adapter_into_training_model_keeps_mode_and_grads(adapters: dict[str, Path]) -> None:
    model = load_for_training(make_mlp().eval(), adapters["a"])
    before = grad_flags(model)
    load_adapter(model, adapters["b"], adapter_name="b")
    after = grad_flags(model)
    assert all(m.training for m in model.modules())
    assert model.active_adapters == ["default"]
    assert {k: after[k] for k in before} == before
    assert any(before.values())  # the first adapter stays trainable
    new = [p.requires_grad for n, p in model.named_parameters() if ".b." in n]
    assert new
    assert all(new)
    assert model.base_model.model.fc2.lora_dropout["b"].p == pytest.approx(0.5)  # saved rate kept


def test_load_adapter_refuses_a_taken_name(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters["a"])
    with pytest.raises(AdapterExistsError, match=r"already holds \['default'\].*pass a new adapter_name"):
        load_adapter(model, adapters["b"], adapter_name="default")


def test_load_adapter_needs_a_peft_model(adapters: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="load the first adapter with load_for_inference"):
        load_adapter(make_mlp(), adapters["b"], adapter_name="b")  # type: ignore[arg-type]


def test_merged_serving_of_the_chosen_adapter(adapters: dict[str, Path]) -> None:
    merged = load_for_inference(make_mlp(), adapters, active="c", merge=True)
    assert type(merged) is MLP
    assert no_grads(merged)
    torch.testing.assert_close(merged(X), alone(adapters["c"]))
