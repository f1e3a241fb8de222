"""One real adapter per PEFT tuner and notable variant, as ``save_pretrained`` writes it.

Shared by the bad-input tests: every check that refuses file content (unknown config fields,
dtypes) must accept all of these, and the no-op rule is proven against each of them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch
from conftest import make_mlp, tiny_llama
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from torch import nn

Base = Literal["llama", "mlp", "conv"]
LLAMA_TARGETS = ["q_proj", "v_proj"]


class TinyConv(nn.Module):
    """Conv2d(3, 8, 3) -> BatchNorm -> ReLU -> Conv2d(8, 4, 1) -> mean: LoRA/LoHa/LoKr on convolutions.

    The BatchNorm holds an int64 buffer (``num_batches_tracked``): a module saved whole may
    legitimately carry integer tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x)))).mean(dim=(2, 3))  # type: ignore[no-any-return]


def make_base(base: Base, seed: int = 0) -> nn.Module:
    if base == "llama":
        return tiny_llama(seed)
    if base == "conv":
        torch.manual_seed(seed)
        return TinyConv().eval()
    return make_mlp(seed)


def sample_input(base: Base) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if base == "llama":
        return {"input_ids": torch.randint(0, 64, (2, 6), generator=generator)}
    if base == "conv":
        return {"x": torch.randn(2, 3, 5, 5, generator=generator)}
    return {"x": torch.randn(4, 2, generator=generator)}


def output(model: nn.Module, base: Base, **extra: Any) -> torch.Tensor:
    """The model's output (logits for the Llama) on a fixed input."""
    with torch.no_grad():
        out = model(**sample_input(base), **extra)
    return out.logits if base == "llama" else out  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Tuner:
    """A PEFT config to save on a base, and what the bad-input checks must say about it."""

    id: str
    peft_type: str
    kwargs: dict[str, Any]
    base: Base = "llama"
    needs: str | None = None  # a module the tuner imports
    fresh_noop: bool = False  # a fresh get_peft_model(...).save_pretrained(...) changes nothing

    def config(self) -> PeftConfig:
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]  # type: ignore[index]
        kwargs = dict(self.kwargs)
        if self.base == "llama":
            kwargs.setdefault("task_type", "CAUSAL_LM")
        return cls(**kwargs)  # type: ignore[no-any-return]

    @property
    def available(self) -> bool:
        return self.needs is None or importlib.util.find_spec(self.needs) is not None

    @property
    def forward_kwargs(self) -> dict[str, Any]:
        """Extra forward arguments the tuner needs (Poly routes by task id)."""
        return {"task_ids": torch.zeros(2, dtype=torch.long)} if self.peft_type == "POLY" else {}


_NO_TARGETS = {
    "PROMPT_TUNING",
    "PREFIX_TUNING",
    "P_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "CPT",
    "ADAPTION_PROMPT",
    "CARTRIDGE",
}


def _t(
    id: str,
    peft_type: str,
    base: Base = "llama",
    needs: str | None = None,
    noop: bool = False,
    **kwargs: Any,
) -> Tuner:
    if base == "llama" and "target_modules" not in kwargs and peft_type not in _NO_TARGETS:
        kwargs["target_modules"] = list(LLAMA_TARGETS)
    return Tuner(id, peft_type, kwargs, base, needs, noop)


TUNERS: list[Tuner] = [
    _t("lora", "LORA", noop=True),
    _t("lora-mlp", "LORA", noop=True, base="mlp", target_modules=["fc1"]),
    _t("lora-conv", "LORA", noop=True, base="conv", target_modules=["conv1", "conv2"]),
    _t("lora-bias", "LORA", noop=True, lora_bias=True),
    _t("lora-embedding", "LORA", target_modules=["q_proj", "embed_tokens"]),
    _t("lora-dora", "LORA", use_dora=True),
    _t(
        "lora-rslora-pattern",
        "LORA",
        noop=True,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
    ),
    _t("lora-modules-to-save", "LORA", modules_to_save=["lm_head"]),
    _t(
        "lora-modules-to-save-batchnorm",
        "LORA",
        base="conv",
        target_modules=["conv1"],
        modules_to_save=["bn"],
    ),
    _t("lora-bias-all", "LORA", noop=True, bias="all"),
    _t("lora-trainable-tokens", "LORA", trainable_token_indices=[1, 2]),
    _t(
        "lora-target-parameters",
        "LORA",
        noop=True,
        target_modules=[],
        target_parameters=["mlp.gate_proj.weight"],
    ),
    _t("lora-gaussian", "LORA", noop=True, init_lora_weights="gaussian"),
    _t("adalora", "ADALORA", noop=True, total_step=10),
    _t("ia3", "IA3", noop=True, target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    _t("loha", "LOHA", noop=True),
    _t(
        "loha-conv-tucker",
        "LOHA",
        noop=True,
        base="conv",
        target_modules=["conv1"],
        use_effective_conv2d=True,
    ),
    _t("lokr", "LOKR", noop=True),
    _t("lokr-decomposed", "LOKR", noop=True, decompose_both=True, decompose_factor=4),
    _t(
        "lokr-conv-tucker",
        "LOKR",
        noop=True,
        base="conv",
        target_modules=["conv1"],
        use_effective_conv2d=True,
    ),
    _t("vera", "VERA", noop=True),
    _t("vera-projection", "VERA", noop=True, save_projection=True),
    _t("pvera", "PVERA", noop=True),
    _t("randlora", "RANDLORA", noop=True),
    _t("fourierft", "FOURIERFT", n_frequency=16),
    _t("waveft", "WAVEFT", noop=True, n_frequency=16),
    _t("c3a", "C3A", block_size=16),
    _t("hira", "HIRA", noop=True),
    _t("gralora", "GRALORA", noop=True),
    _t("gralora-hybrid", "GRALORA", noop=True, hybrid_r=4),
    _t("poly", "POLY", noop=True),
    _t("lily", "LILY", noop=True),
    _t("delora", "DELORA", noop=True),
    _t("miss", "MISS", noop=True, r=4),
    _t("miss-bat", "MISS", noop=True, r=4, init_weights="bat"),
    _t("peanut", "PEANUT", noop=True),
    _t("shira", "SHIRA", noop=True, r=2),
    _t("supertuning", "SUPERTUNING", noop=True),
    _t("tinylora", "TINYLORA", noop=True),
    _t("unilora", "UNILORA"),
    _t("unilora-indices", "UNILORA", save_indices=True),
    _t("beft", "BEFT", noop=True),
    _t("glora", "GLORA", noop=True),
    _t("boft", "BOFT", noop=True, boft_block_size=4),
    _t("oft", "OFT", noop=True, oft_block_size=4, r=0),
    _t("road", "ROAD", noop=True, group_size=8),
    _t("hra", "HRA"),
    _t("osf", "OSF"),
    _t("psoft", "PSOFT", r=4),
    _t("frod", "FROD"),
    _t("frod-projection", "FROD", save_projection=True),
    _t("deft", "DEFT"),
    _t("vblora", "VBLORA", vector_length=8, num_vectors=16),
    _t("vblora-topk", "VBLORA", vector_length=8, num_vectors=16, save_only_topk_weights=True),
    _t("shadow", "SHADOW"),
    _t("ln-tuning", "LN_TUNING", target_modules=["input_layernorm"]),
    _t("trainable-tokens", "TRAINABLE_TOKENS", target_modules=["embed_tokens"], token_indices=[1, 2]),
    _t("adamss", "ADAMSS", needs="sklearn"),
    _t("adaption-prompt", "ADAPTION_PROMPT", noop=True, adapter_len=2, adapter_layers=1),
    _t("prompt-tuning", "PROMPT_TUNING", num_virtual_tokens=4),
    _t("prefix-tuning", "PREFIX_TUNING", num_virtual_tokens=4),
    _t("p-tuning", "P_TUNING", num_virtual_tokens=4, encoder_hidden_size=8),
    _t("multitask-prompt-tuning", "MULTITASK_PROMPT_TUNING", num_virtual_tokens=4, num_tasks=2),
    _t("cpt", "CPT", cpt_token_ids=[1, 2, 3], cpt_mask=[1, 1, 1], cpt_tokens_type_mask=[1, 2, 3]),
    _t("cartridge", "CARTRIDGE", num_virtual_tokens=4),
]


# The tuners the quick tier runs per-tuner tests on: one of each kind of layer, state and save
# format (LoRA on Llama, an MLP and convolutions; rank-adaptive; vectors; Kronecker; shared
# projections; sparse indices; tokens; prompts). The slow tier runs them all.
QUICK_TUNERS = frozenset(
    {
        "lora",
        "lora-mlp",
        "lora-conv",
        "adalora",
        "ia3",
        "lokr",
        "vera",
        "shira",
        "trainable-tokens",
        "prompt-tuning",
        "adaption-prompt",
    }
)


def tuner_params(tuners: list[Tuner]) -> list[Any]:
    """``tuners`` as pytest params, each outside :data:`QUICK_TUNERS` marked ``slow``."""
    return [
        pytest.param(t, id=t.id, marks=[] if t.id in QUICK_TUNERS else [pytest.mark.slow]) for t in tuners
    ]
