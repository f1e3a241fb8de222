"""One unwrap for every entry point: a model arrives wrapped, every public function reaches the same model.

Wrappers: ``torch.compile`` (``OptimizedModule``), ``DataParallel`` (on CPU it calls the module
itself), ``DistributedDataParallel`` and FSDP in a single-process gloo group. A compiled *base* loads
into the module it wraps; a base wrapped for parallel training is refused (its parameters were
registered when it was wrapped); a wrapped ``PeftModel`` is used through the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import assert_unchanged, make_mlp, save_adapter, snapshot
from peft import LoraConfig, PeftModel
from torch import nn

from safe_lora import (
    NondeterministicModelError,
    assert_deterministic,
    deterministic_lora,
    inspect_adapter,
    live_dropout,
    load_adapter,
    load_for_inference,
    load_for_training,
    set_active_adapter,
    use_adapter,
)
from safe_lora._unwrap import unwrap

X = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))


def lora() -> LoraConfig:
    return LoraConfig(target_modules=["fc1", "fc2"], r=2, lora_dropout=0.5, init_lora_weights=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unwrap")
    return {name: save_adapter(make_mlp(), lora(), root / name, seed=i) for i, name in enumerate("abc")}


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)  # type: ignore[no-any-return]


def compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")  # type: ignore[return-value]


@pytest.fixture(scope="module")
def gloo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A process group of one rank (gloo, CPU): what DDP and FSDP need to wrap a model."""
    init = tmp_path_factory.mktemp("gloo") / "init"
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)


# --------------------------------------------------------------------------------------------------
# A compiled base loads into the module it wraps
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", [load_for_inference, load_for_training], ids=["inference", "training"])
def test_compiled_base_loads_into_the_original_module(
    adapters: dict[str, Path], load: Callable[..., PeftModel]
) -> None:
    base = make_mlp()
    wrapper = compiled(base)
    model = load(wrapper, adapters["a"])
    reference = load(make_mlp(), adapters["a"])
    assert model.get_base_model() is base
    with deterministic_lora(model), deterministic_lora(reference):
        assert torch.equal(out(model), out(reference))
        assert torch.equal(out(wrapper), out(reference)), "the compiled wrapper runs the adapted base"
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]


def test_compiled_base_with_a_mapping_and_merge(adapters: dict[str, Path]) -> None:
    merged = load_for_inference(compiled(make_mlp()), adapters["a"], merge=True)
    assert type(merged) is type(make_mlp())
    assert torch.equal(out(merged), out(load_for_inference(make_mlp(), adapters["a"], merge=True)))
    several = load_for_inference(compiled(make_mlp()), {"a": adapters["a"], "b": adapters["b"]}, active="b")
    reference = load_for_inference(make_mlp(), {"a": adapters["a"], "b": adapters["b"]}, active="b")
    assert torch.equal(out(several), out(reference))


# --------------------------------------------------------------------------------------------------
# A base wrapped for parallel training is refused, and left as it was
# --------------------------------------------------------------------------------------------------


def _refused(wrapped: nn.Module, adapters: dict[str, Path], name: str) -> None:
    before = snapshot(wrapped)
    for load in (load_for_inference, load_for_training):
        with pytest.raises(TypeError) as info:
            load(wrapped, adapters["a"])
        message = str(info.value)
        assert f"takes the base model before it is wrapped for parallel training, found {name}" in message
        assert "load the adapter first, then wrap" in message
    assert_unchanged(wrapped, before)


def test_data_parallel_base_is_refused_naming_it(adapters: dict[str, Path]) -> None:
    _refused(nn.DataParallel(make_mlp()), adapters, "DataParallel")


@pytest.mark.distributed
@pytest.mark.usefixtures("gloo")
@pytest.mark.parametrize(
    ("wrap", "name"), [(ddp, "DistributedDataParallel"), (fsdp, "FullyShardedDataParallel")]
)
def test_distributed_base_is_refused_naming_the_wrapper(
    adapters: dict[str, Path], wrap: Callable[[nn.Module], nn.Module], name: str
) -> None:
    _refused(wrap(make_mlp()), adapters, name)


# --------------------------------------------------------------------------------------------------
# A wrapped PeftModel: every entry point reaches the PeftModel inside
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch.compile", "DataParallel", pytest.param("DDP", marks=pytest.mark.distributed)])
def wrap(request: pytest.FixtureRequest) -> Callable[[nn.Module], nn.Module]:
    """Each wrapper a model arrives in; DDP in a process group of one rank."""
    if request.param == "DDP":
        request.getfixturevalue("gloo")
        return ddp
    return compiled if request.param == "torch.compile" else nn.DataParallel


@pytest.fixture
def two(adapters: dict[str, Path]) -> PeftModel:
    """A training model holding adapters a (active) and b: DDP wraps only models with trainable weights."""
    return load_for_training(make_mlp(), {"a": adapters["a"], "b": adapters["b"]})


def _alone(adapters: dict[str, Path], name: str) -> torch.Tensor:
    return out(load_for_inference(make_mlp(), adapters[name]))


def test_use_adapter_through_a_wrapper(
    two: PeftModel, adapters: dict[str, Path], wrap: Callable[[nn.Module], nn.Module]
) -> None:
    wrapped = wrap(two)
    assert unwrap(wrapped) is two
    flags = [m.training for m in wrapped.modules()]
    grads = [p.requires_grad for p in two.parameters()]
    with deterministic_lora(wrapped):
        with use_adapter(wrapped, "b") as inner:
            assert inner is two
            assert two.active_adapters == ["b"]
            assert torch.equal(out(wrapped), _alone(adapters, "b"))
        assert two.active_adapters == ["a"]
        assert torch.equal(out(wrapped), _alone(adapters, "a"))
    assert [m.training for m in wrapped.modules()] == flags
    assert [p.requires_grad for p in two.parameters()] == grads


def test_set_active_adapter_through_a_wrapper(
    two: PeftModel, adapters: dict[str, Path], wrap: Callable[[nn.Module], nn.Module]
) -> None:
    wrapped = wrap(two)
    grads = [p.requires_grad for p in two.parameters()]
    set_active_adapter(wrapped, "b")
    assert two.active_adapters == ["b"]
    assert [p.requires_grad for p in two.parameters()] == grads
    with deterministic_lora(wrapped):
        assert torch.equal(out(wrapped), _alone(adapters, "b"))


def test_load_adapter_through_a_wrapper(
    two: PeftModel, adapters: dict[str, Path], wrap: Callable[[nn.Module], nn.Module]
) -> None:
    wrapped = wrap(two)
    assert load_adapter(wrapped, adapters["c"], adapter_name="c") is two
    assert sorted(two.peft_config) == ["a", "b", "c"]
    assert two.active_adapters == ["a"]
    with deterministic_lora(wrapped), use_adapter(wrapped, "c"):
        assert torch.equal(out(wrapped), _alone(adapters, "c"))
    replaced = load_adapter(wrapped, adapters["a"], adapter_name="c", replace=True)
    assert replaced is two
    with deterministic_lora(wrapped), use_adapter(wrapped, "c"):
        assert torch.equal(out(wrapped), _alone(adapters, "a"))


def test_dropout_functions_through_a_wrapper(two: PeftModel, wrap: Callable[[nn.Module], nn.Module]) -> None:
    wrapped = wrap(two)
    names = {s.name for s in live_dropout(two)}
    assert {s.name for s in live_dropout(wrapped)} == names
    assert len(names) == 4  # fc1 and fc2, adapters a and b: no wrapper components in the names
    with pytest.raises(NondeterministicModelError, match="live dropout"):
        assert_deterministic(wrapped)
    with deterministic_lora(wrapped) as frozen:
        assert {s.name for s in frozen} == names
        assert live_dropout(wrapped) == []
        assert_deterministic(wrapped)
        assert torch.equal(out(wrapped), out(wrapped))
    assert {s.name for s in live_dropout(wrapped)} == names


# --------------------------------------------------------------------------------------------------
# inspect_adapter(base_model=...) checks against the model inside the wrapper
# --------------------------------------------------------------------------------------------------


def test_inspect_adapter_against_a_wrapped_base(
    adapters: dict[str, Path], wrap: Callable[[nn.Module], nn.Module]
) -> None:
    base = make_mlp()
    wrapped = wrap(base)
    before = snapshot(wrapped)
    report = inspect_adapter(adapters["a"], base_model=wrapped)
    assert report.loads_safely
    assert report.checked_against == type(base).__name__
    assert_unchanged(wrapped, before)

    other = wrap(nn.Sequential(nn.Linear(2, 3)))
    refused = inspect_adapter(adapters["a"], base_model=other)
    assert not refused.loads_safely
