"""Shared fixtures: tiny models built in code and real adapters written by PEFT's ``save_pretrained``."""

from __future__ import annotations

import os

# Nothing is downloaded in tests: fail fast instead of waiting on DNS (peft and transformers look
# up "config.json" of the base model's name when saving).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftConfig, get_peft_model
from torch import nn

from safe_lora._demo import DemoMLP

# The files save_pretrained writes, and the LoRA keys of the MLP adapter of :func:`mlp_adapter`.
CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
A_KEY = "base_model.model.fc1.lora_A.weight"
B_KEY = "base_model.model.fc1.lora_B.weight"

# The seed network, Linear(2, 8) -> ReLU -> Linear(8, 1): the demo's, so both show the same.
MLP = DemoMLP


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def tiny_llama(seed: int = 0, **overrides: Any) -> Any:
    """A 2-layer Llama built from a config (nothing downloaded), in eval mode as from_pretrained gives.

    ``overrides`` change fields of the ``LlamaConfig`` (e.g. ``attention_dropout=0.5``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    cfg = LlamaConfig(**{**fields, **overrides})
    model = LlamaForCausalLM(cfg)
    model.config.name_or_path = "tiny-llama"
    model.name_or_path = "tiny-llama"
    return model.eval()


# bitsandbytes' CPU 4-bit kernels (0.50, on CPUs with AVX512-BF16) need every quantized layer's
# inputs to be a multiple of its block size (64) and its outputs of 32: the 32-wide tiny Llama fails
# inside bitsandbytes at the first forward, raw PEFT's too. The bases of the fidelity matrix are
# this wider tiny Llama, in every kind, so that one adapter fits them all.
QUANTIZABLE = {"hidden_size": 64, "intermediate_size": 128}


def quantizable_llama(seed: int = 0) -> Any:
    """:func:`tiny_llama` with every layer wide enough for bitsandbytes' CPU kernels."""
    return tiny_llama(seed, **QUANTIZABLE)


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`quantizable_llama` saved with ``save_pretrained``, for the bases of :func:`tiny_llama_as`."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    quantizable_llama().save_pretrained(folder)
    return folder


def llama_lora(**overrides: Any) -> LoraConfig:
    """A small LoRA on the tiny Llama's ``q_proj``/``v_proj`` (r=2, live dropout, non-zero init)."""
    fields: dict[str, Any] = {
        "target_modules": ["q_proj", "v_proj"],
        "r": 2,
        "lora_dropout": 0.1,
        "init_lora_weights": False,
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**{**fields, **overrides})


def save_adapter(
    base: nn.Module, config: PeftConfig, path: Path, *, train_steps: int = 0, seed: int = 0
) -> Path:
    """Wrap a *copy* of ``base`` with ``config``, optionally nudge the weights, and ``save_pretrained``."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    if train_steps:
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture
def mlp() -> MLP:
    return make_mlp()


@pytest.fixture
def lora_config() -> LoraConfig:
    return LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False)


@pytest.fixture
def mlp_adapter(tmp_path: Path, mlp: MLP, lora_config: LoraConfig) -> Path:
    """A real LoRA adapter (dropout 0.1, non-trivial weights) for :func:`make_mlp`, saved as safetensors."""
    return save_adapter(mlp, lora_config, tmp_path / "adapter")


@pytest.fixture
def adapter_factory(tmp_path: Path) -> Callable[..., Path]:
    """``adapter_factory(base, config, name="a")`` saves a real adapter under ``tmp_path / name``."""

    def factory(base: nn.Module, config: PeftConfig, name: str = "adapter", **kwargs: Any) -> Path:
        return save_adapter(base, config, tmp_path / name, **kwargs)

    return factory


Snapshot = dict[str, Any]


def snapshot(model: nn.Module) -> Snapshot:
    """Everything "left exactly as it was" means: module objects and types, values, flags, grads.

    Values are read from the parameters and buffers themselves, not from ``state_dict()``: on CPUs
    with AVX512-BF16, bitsandbytes' 4-bit layers re-pack their weight for the CPU kernel at the first
    forward and ``state_dict()`` unpacks it again, in place and lossily, so reading the state through
    it would change the model under test.
    """
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {
        "modules": [(name, id(m), type(m)) for name, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in tensors},
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "attrs": {name: sorted(vars(m)) for name, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attrs"] == before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


# The bases of the fidelity matrix (issue 9): the tiny Llama in each dtype people load models in,
# and quantized by bitsandbytes (which runs 4-bit and 8-bit on CPU).
BASE_KINDS = ("fp32", "bf16", "fp16", "bnb4-fp32", "bnb4-bf16", "bnb8")


def tiny_llama_as(kind: str, folder: Path) -> Any:
    """The tiny Llama saved in ``folder`` (``quantizable_llama().save_pretrained``) as one of ``BASE_KINDS``.

    Half precision is a cast of the fp32 weights; the bnb kinds go through ``from_pretrained`` with a
    ``BitsAndBytesConfig``, as a QLoRA user loads them (``bnb4-bf16`` also keeps its unquantized
    weights in bf16, as QLoRA recipes do). In eval mode, as from_pretrained gives.
    """
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if kind in dtypes:
        return quantizable_llama().to(dtypes[kind]).eval()
    quantization = {
        "bnb4-fp32": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        "bnb4-bf16": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16),
        "bnb8": BitsAndBytesConfig(load_in_8bit=True),
    }[kind]
    dtype = torch.bfloat16 if kind == "bnb4-bf16" else torch.float32
    model = LlamaForCausalLM.from_pretrained(
        os.fspath(folder), quantization_config=quantization, dtype=dtype, device_map="cpu"
    )
    return model.eval()
