"""deterministic_lora under real multi-process data parallelism on CPU (gloo).

One ``torch.multiprocessing.spawn`` of 2 ranks runs three scenarios -- DistributedDataParallel,
FSDP (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``) -- and saves what each rank saw;
the tests below judge those records, so the (slow) spawn happens once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from torch import nn

# One 2-rank spawn for the module (~20 s).
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
NAMES = ["base_model.model.fc1.lora_dropout.default", "base_model.model.fc2.lora_dropout.default"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _scenario(rank: int, wrap: Callable[[nn.Module], nn.Module]) -> dict[str, Any]:
    from safe_lora import deterministic_lora, live_dropout

    torch.manual_seed(0)  # the same initial weights on both ranks
    lora = LoraConfig(target_modules=["fc1", "fc2"], lora_dropout=0.5, init_lora_weights=False)
    model = wrap(get_peft_model(Net(), lora).train())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x_val = torch.randn(8, 16, generator=torch.Generator().manual_seed(7))  # same on both ranks
    torch.manual_seed(100 + rank)  # each rank its own data and dropout masks, as in real training
    record: dict[str, Any] = {
        "raw_names": [n for n, _ in model.named_modules() if n.endswith(".lora_dropout.default")],
        "live_before": [s.name for s in live_dropout(model)],
    }

    def train_step() -> None:
        x, y = torch.randn(8, 16), torch.randn(8, 16)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(2):
        train_step()
    with torch.no_grad():
        record["train_repeat"] = torch.equal(model(x_val), model(x_val))
    before = _flags(model)

    with deterministic_lora(model) as frozen:
        with torch.no_grad():
            first, second = model(x_val), model(x_val)
        record["frozen"] = [s.name for s in frozen]
        record["live_inside"] = [s.name for s in live_dropout(model)]
        record["val_repeat"] = torch.equal(first, second)
        record["val_ranks"] = _gather(first)
        record["inside_adapter_flags"] = {n: f for n, f in _flags(model).items() if ".lora_dropout." in n}
        train_step()  # gradients are all-reduced inside the block too
        with torch.no_grad():
            record["after_step_ranks"] = _gather(model(x_val))

    record["restored"] = _flags(model) == before
    record["training_after"] = all(_flags(model).values())
    with torch.no_grad():
        record["train_repeat_after"] = torch.equal(model(x_val), model(x_val))
    train_step()  # still trains after the block
    return record


def _ddp(model: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model)


def _fsdp(model: nn.Module) -> nn.Module:
    import functools

    from peft.tuners.lora import LoraLayer
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    # Each LoRA layer its own FSDP unit, so ``_fsdp_wrapped_module`` also appears mid-name.
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, LoraLayer))
    return FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy
    )


def _fsdp2(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)  # type: ignore[no-any-return]


SCENARIOS: dict[str, Callable[[nn.Module], nn.Module]] = {"ddp": _ddp, "fsdp": _fsdp, "fsdp2": _fsdp2}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import warnings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # FSDP's CPU / deprecation notices
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        records = {name: _scenario(rank, wrap) for name, wrap in SCENARIOS.items()}
        torch.save(records, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    out: Path = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_validation_inside_is_repeatable_identical_across_ranks_and_mode_restored(
    records: list[dict[str, dict[str, Any]]], scenario: str
) -> None:
    for rank in range(WORLD):
        r = records[rank][scenario]
        assert r["live_before"] == NAMES, ("names carry no wrapper components", r["raw_names"])
        assert r["train_repeat"] is False, "training ran with live LoRA dropout"
        assert r["frozen"] == NAMES
        assert r["live_inside"] == []
        assert r["val_repeat"] is True
        assert set(r["inside_adapter_flags"].values()) == {False}
        assert r["restored"] is True
        assert r["training_after"] is True
        assert r["train_repeat_after"] is False, "dropout live again after the block"
    raw = records[0][scenario]["raw_names"]
    if scenario == "ddp":
        assert all(n.startswith("module.") for n in raw)
    if scenario == "fsdp":
        assert all(n.count("_fsdp_wrapped_module.") == 2 for n in raw), raw
    # Same weights, no dropout: the validation pass agrees across ranks (and so on repeat).
    v0, v1 = records[0][scenario]["val_ranks"]
    assert torch.equal(v0, v1)
    assert torch.equal(records[0][scenario]["val_ranks"][0], records[1][scenario]["val_ranks"][1])
    # The step inside the block synchronised gradients: the ranks still agree.
    a0, a1 = records[0][scenario]["after_step_ranks"]
    assert torch.equal(a0, a1)
    assert not torch.equal(a0, v0), "the step inside the block changed the weights"
