"""Several adapters on one base: load_for_inference({...}), load_adapter (add and replace=True),
use_adapter and set_active_adapter (issues 6 and 12)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _tuners import TUNERS, Tuner, make_base, output, tuner_params
from conftest import MLP, assert_unchanged, make_mlp, save_adapter, snapshot
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from torch import nn

from safe_lora import (
    AdapterConfigError,
    AdapterExistsError,
    AdapterWeightsError,
    UnknownAdapterError,
    deterministic_lora,
    load_adapter,
    load_for_inference,
    load_for_training,
    set_active_adapter,
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
    with pytest.raises(
        AdapterExistsError, match=r"already holds \['default'\].*pass a new adapter_name.*replace=True"
    ):
        load_adapter(model, adapters["b"], adapter_name="default")


def test_load_adapter_needs_a_peft_model(adapters: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="load the first adapter with load_for_inference"):
        load_adapter(make_mlp(), adapters["b"], adapter_name="b")  # type: ignore[arg-type]


def test_merged_serving_of_the_chosen_adapter(adapters: dict[str, Path]) -> None:
    merged = load_for_inference(make_mlp(), adapters, active="c", merge=True)
    assert type(merged) is MLP
    assert no_grads(merged)
    torch.testing.assert_close(merged(X), alone(adapters["c"]))


# --- replace=True: new weights in place, or nothing changes (issue 12) --------------------------


def _variant(tmp_path: Path, name: str, seed: int, **changes: object) -> Path:
    """A second training run of adapter "a" (same config unless ``changes``), other weights."""
    config = LoraConfig(**{**CONFIGS["a"].to_dict(), **changes})  # type: ignore[arg-type]
    return save_adapter(make_mlp(), config, tmp_path / name, seed=seed)


def identities(model: nn.Module) -> dict[str, tuple[int, torch.dtype, torch.device]]:
    return {n: (id(p), p.dtype, p.device) for n, p in model.named_parameters()}


@pytest.mark.parametrize("loader", [load_for_inference, load_for_training])
@pytest.mark.parametrize("alpha", [8, 24])  # the same scaling, and one that must be updated
def test_replace_writes_in_place_and_equals_a_fresh_load(
    adapters: dict[str, Path], tmp_path: Path, loader: object, alpha: int
) -> None:
    model = loader(make_mlp(), adapters["a"])  # type: ignore[operator]
    new = _variant(tmp_path, "a2", seed=7, lora_alpha=alpha)
    before_ids = identities(model)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}

    returned = load_adapter(model, new, adapter_name="default", replace=True)

    assert returned is model
    assert identities(model) == before_ids  # same tensor objects, dtypes and devices
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    fresh = loader(make_mlp(), new)  # type: ignore[operator]
    for (name, value), (_, expected) in zip(
        model.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), name
    assert model.base_model.model.fc1.scaling["default"] == fresh.base_model.model.fc1.scaling["default"]
    with torch.no_grad():
        assert torch.equal(model.eval()(X), fresh.eval()(X))
    assert model.peft_config["default"].lora_alpha == alpha


def test_a_training_model_keeps_training_after_replace(adapters: dict[str, Path], tmp_path: Path) -> None:
    model = load_for_training(make_mlp(), adapters["a"])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    load_adapter(model, _variant(tmp_path, "a2", seed=3), adapter_name="default", replace=True)
    a = model.base_model.model.fc1.lora_A["default"].weight
    swapped = a.detach().clone()
    model(X).pow(2).sum().backward()
    optimizer.step()  # the optimizer still holds the very parameters that got the new values
    assert not torch.equal(a, swapped)


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.fc1.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _drop_key(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    del tensors["base_model.model.fc1.lora_A.weight"]
    save_file(tensors, str(path / "adapter_model.safetensors"))


REFUSED_REPLACEMENTS = [
    ("nan", {}, _nan_weights, AdapterWeightsError, r"NaN or inf.*fc1\.lora_B\.weight"),
    (
        "other rank",
        {"r": 2},
        None,
        AdapterConfigError,
        r"configs differ in r: loaded 4, new 2.*new adapter_name",
    ),
    ("missing key", {}, _drop_key, AdapterWeightsError, r"missing 1 key.*fc1\.lora_A\.weight"),
    (
        "other targets",
        {"target_modules": ["fc2"]},
        None,
        AdapterConfigError,
        r"configs differ in targets: loaded adapts 1 module\(s\), new 1 "
        r"\(only new: \[fc2\], only loaded: \[fc1\]\)",
    ),
    ("dora", {"use_dora": True}, None, AdapterConfigError, r"use_dora: loaded False, new True"),
]


@pytest.mark.parametrize("loader", [load_for_inference, load_for_training])
@pytest.mark.parametrize(
    ("case", "changes", "breakage", "error", "match"),
    REFUSED_REPLACEMENTS,
    ids=[c[0] for c in REFUSED_REPLACEMENTS],
)
def test_a_refused_replacement_changes_nothing(
    adapters: dict[str, Path],
    tmp_path: Path,
    loader: object,
    case: str,
    changes: dict[str, object],
    breakage: object,
    error: type[Exception],
    match: str,
) -> None:
    model = loader(make_mlp(), adapters["a"])  # type: ignore[operator]
    new = _variant(tmp_path, "a2", seed=5, **changes)
    if breakage is not None:
        breakage(new)  # type: ignore[operator]
    before = snapshot(model)
    scaling = dict(model.base_model.model.fc1.scaling)
    with deterministic_lora(model), torch.no_grad():  # a training model has live dropout
        expected = model(X)
    with pytest.raises(error, match=match):
        load_adapter(model, new, adapter_name="default", replace=True)
    assert_unchanged(model, before)
    assert model.base_model.model.fc1.scaling == scaling
    with deterministic_lora(model), torch.no_grad():
        assert torch.equal(model(X), expected)


def test_replacing_with_another_tuner_is_refused(adapters: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoHaConfig

    model = load_for_inference(make_mlp(), adapters["a"])
    loha = save_adapter(
        make_mlp(), LoHaConfig(target_modules=["fc1"], r=4, init_weights=False), tmp_path / "h"
    )
    before = snapshot(model)
    with pytest.raises(AdapterConfigError, match=r"expected a LORA adapter, found LOHA.*new adapter_name"):
        load_adapter(model, loha, adapter_name="default", replace=True)
    assert_unchanged(model, before)


def test_replace_needs_a_loaded_name(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters["a"])
    with pytest.raises(UnknownAdapterError, match=r"Cannot replace adapter 'b'.*replace=False to add"):
        load_adapter(model, adapters["a"], adapter_name="b", replace=True)


def test_a_compiled_model_serves_the_swapped_weights_without_recompiling(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    from torch._dynamo.testing import CompileCounter

    model = load_for_inference(make_mlp(), adapters["a"])
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        first = compiled(X)
        compiled(X)
    compiles = counter.frame_count
    assert compiles >= 1
    new = _variant(tmp_path, "a2", seed=11)
    load_adapter(compiled, new, adapter_name="default", replace=True)  # the compiled wrapper is accepted
    with torch.no_grad():
        served = compiled(X)
    assert counter.frame_count == compiles  # zero recompiles
    assert torch.equal(served, load_for_inference(make_mlp(), new)(X))
    assert not torch.equal(served, first)


def test_delete_then_load_again_works_like_a_first_load(adapters: dict[str, Path]) -> None:
    """PEFT keeps a stale active name after the last adapter is deleted; its load_adapter then
    fails with KeyError('default')."""
    model = load_for_inference(make_mlp(), adapters["a"])
    model.delete_adapter("default")
    load_adapter(model, adapters["c"], adapter_name="default")
    assert model.active_adapters == ["default"]
    assert no_grads(model)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(X), alone(adapters["c"]))


# --- set_active_adapter: a permanent switch without PEFT's side effects (issue 12) ---------------


@pytest.mark.parametrize("loader", [load_for_inference, load_for_training])
def test_set_active_adapter_keeps_modes_and_every_requires_grad(
    adapters: dict[str, Path], loader: object
) -> None:
    model = loader(make_mlp(), {"a": adapters["a"], "b": adapters["b"]})  # type: ignore[operator]
    model.base_model.model.fc2.eval()  # frozen on purpose
    grads = grad_flags(model)
    modes = {n: m.training for n, m in model.named_modules()}

    set_active_adapter(model, "b")

    assert model.active_adapters == ["b"]
    assert model.active_adapter == "b"
    assert grad_flags(model) == grads
    assert {n: m.training for n, m in model.named_modules()} == modes
    raw = PeftModel.from_pretrained(make_mlp(), str(adapters["a"]), adapter_name="a")
    raw.load_adapter(str(adapters["b"]), "b")
    raw.set_adapter("b")
    with torch.no_grad():
        assert torch.equal(model.eval()(X), raw.eval()(X))


def test_set_active_adapter_combines_several(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters)
    set_active_adapter(model, ["a", "c"])
    assert model.active_adapters == ["a", "c"]
    assert no_grads(model)
    raw = PeftModel.from_pretrained(make_mlp(), str(adapters["a"]), adapter_name="a")
    raw.load_adapter(str(adapters["c"]), "c")
    raw.base_model.set_adapter(["a", "c"])
    with torch.no_grad():
        assert torch.equal(model(X), raw.eval()(X))


def test_set_active_adapter_refuses_an_unknown_name_and_changes_nothing(adapters: dict[str, Path]) -> None:
    model = load_for_inference(make_mlp(), adapters)
    before = snapshot(model)
    with pytest.raises(UnknownAdapterError, match=r"expected one of \['a', 'b', 'c'\], found 'z'"):
        set_active_adapter(model, ["b", "z"])
    assert model.active_adapters == ["a"]
    assert_unchanged(model, before)


def test_switching_adapters_with_modules_to_save_keeps_grads(tmp_path: Path) -> None:
    """modules_to_save wrappers have their own set_adapter: PEFT's path, grads put back."""
    configs = {
        n: LoraConfig(target_modules=["fc1"], modules_to_save=["fc2"], r=2, init_lora_weights=False)
        for n in "ab"
    }
    paths = {n: save_adapter(make_mlp(), c, tmp_path / n, seed=i) for i, (n, c) in enumerate(configs.items())}
    model = load_for_training(make_mlp(), paths)
    grads = grad_flags(model)
    with use_adapter(model, "b"):
        assert grad_flags(model) == grads
        with torch.no_grad():
            inside = model.eval()(X)
    assert grad_flags(model) == grads
    assert torch.equal(inside, load_for_inference(make_mlp(), paths["b"])(X))


def test_replace_follows_the_models_mode_for_dropout(adapters: dict[str, Path], tmp_path: Path) -> None:
    new = _variant(tmp_path, "a2", seed=9, lora_dropout=0.2)
    training = load_for_training(make_mlp(), adapters["a"])
    load_adapter(training, new, adapter_name="default", replace=True)
    dropout = training.base_model.model.fc1.lora_dropout["default"]
    assert isinstance(dropout, nn.Dropout)
    assert dropout.p == pytest.approx(0.2)  # the new run's rate, as a new adapter would get
    assert dropout.training
    inference = load_for_inference(make_mlp(), adapters["a"])
    load_adapter(inference, new, adapter_name="default", replace=True)
    assert isinstance(inference.base_model.model.fc1.lora_dropout["default"], nn.Identity)
    assert inference.peft_config["default"].lora_dropout == 0.0


@pytest.mark.parametrize("tuner", tuner_params(TUNERS))
def test_adding_an_adapter_is_raw_peft_s_add_for_every_tuner(tmp_path: Path, tuner: Tuner) -> None:
    # The meta injection of an add hides the adapters already loaded from PEFT's walks: what PEFT
    # builds for the new one, and leaves of the old one, must be exactly what its own add gives.
    if not tuner.available:
        pytest.skip(f"needs {tuner.needs}")
    config = tuner.config()
    if config.is_prompt_learning:
        pytest.skip("a prompt-learning adapter is one per model (as in PEFT)")
    base = make_base(tuner.base)
    first = save_adapter(base, config, tmp_path / "a", train_steps=1, seed=1)
    second = save_adapter(base, config, tmp_path / "b", train_steps=1, seed=2)
    raw = PeftModel.from_pretrained(copy.deepcopy(base), str(first), adapter_name="a")
    try:
        raw.load_adapter(str(second), adapter_name="b")
    except Exception as exc:
        pytest.skip(f"raw PEFT cannot add a second {tuner.id} adapter: {type(exc).__name__}: {exc}")
    raw.set_adapter("b")
    ours = load_for_inference(copy.deepcopy(base), first, adapter_name="a")
    load_adapter(ours, second, adapter_name="b")
    set_active_adapter(ours, "b")

    for name in ("a", "b"):
        want = get_peft_model_state_dict(raw, adapter_name=name)
        got = get_peft_model_state_dict(ours, adapter_name=name)
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            assert got[key].dtype == value.dtype, key
            assert torch.equal(got[key], value), key
    extra = tuner.forward_kwargs
    try:
        expected = output(raw.eval(), tuner.base, **extra)
    except Exception as exc:
        pytest.skip(f"raw PEFT cannot run two {tuner.id} adapters: {type(exc).__name__}: {exc}")
    assert torch.equal(output(ours.eval(), tuner.base, **extra), expected)
