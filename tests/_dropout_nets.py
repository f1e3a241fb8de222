"""Tiny models and helpers shared by ``test_dropout_find.py`` and ``test_dropout_freeze.py``."""

from __future__ import annotations

from collections.abc import Callable

import peft
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from safe_lora import DropoutSite


class Net(nn.Module):
    """Linear(16, 16) -> ReLU -> [Dropout] -> Linear(16, 16); the optional dropout is the base's own."""

    def __init__(self, base_dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(base_dropout)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))  # type: ignore[no-any-return]


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)  # type: ignore[no-any-return]


class ConvNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        conv: type[nn.Module] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv = conv(4, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)  # type: ignore[no-any-return]


class GPT2ConvNet(nn.Module):
    """transformers' ``Conv1D`` (a transposed Linear, as in GPT-2's ``c_attn``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_attn = Conv1D(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_attn(x)  # type: ignore[no-any-return]


class MhaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x)[0]  # type: ignore[no-any-return]


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Make every trainable (adapter) weight non-trivial, so that dropping a unit changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=gen))


def peft_net(config: peft.PeftConfig, base: nn.Module | None = None) -> PeftModel:
    torch.manual_seed(0)
    model = get_peft_model(base if base is not None else Net(), config)
    perturb(model)
    return model.train()


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def draws(run: Callable[[], torch.Tensor], n: int = 3) -> list[torch.Tensor]:
    with torch.no_grad():
        return [run().detach().clone() for _ in range(n)]


def all_equal(tensors: list[torch.Tensor]) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


def adapter_names(sites: list[DropoutSite]) -> set[str]:
    return {s.name for s in sites if s.kind == "adapter"}


X16 = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
T = ["fc1", "fc2"]
PEFT_NAMES = {f"base_model.model.fc{i}.lora_dropout.default" for i in (1, 2)}


def run_linear(m: nn.Module) -> torch.Tensor:
    return m(X16)  # type: ignore[no-any-return]


def run_llama(m: nn.Module) -> torch.Tensor:
    return m(input_ids=IDS).logits  # type: ignore[no-any-return]


def repeatable(model: nn.Module) -> bool:
    return all_equal(draws(lambda: model(X16)))
