"""safe_lora.auto: PEFT's AutoPeftModelFor* semantics, with the adapter checked before the base loads.

Local folders in this process; the hub (``hub_server.py``) in a subprocess, where the request log
shows that a broken adapter never costs a single request for the base model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_adapter, tiny_llama
from hub_server import HubServer, Outcome, folder_files
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, PeftModelForCausalLM
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM

from safe_lora import (
    AdapterConfigError,
    AdapterWeightsError,
    UnsafeAdapterError,
    auto,
    load_for_inference,
)

X = torch.tensor([[1, 5, 9, 2, 7]])
CONFIG, SAFETENSORS = "adapter_config.json", "adapter_model.safetensors"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def lora(**overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "r": 2, "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**fields, "lora_dropout": 0.1, **overrides})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("auto") / "base"
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path) -> Path:
    """A LoRA adapter whose config names ``base_dir`` as its base, as PEFT records it."""
    return save_adapter(
        LlamaForCausalLM.from_pretrained(base_dir), lora(), base_dir.parent / "adapter", train_steps=1
    )


def edited(adapter: Path, target: Path, *, config: dict[str, Any] | None = None, weights: Any = None) -> Path:
    """A copy of ``adapter`` with config fields overridden and/or the tensors transformed."""
    shutil.copytree(adapter, target)
    if config is not None:
        raw = json.loads((target / CONFIG).read_text(encoding="utf-8"))
        (target / CONFIG).write_text(json.dumps({**raw, **config}), encoding="utf-8")
    if weights is not None:
        save_file(weights(load_file(target / SAFETENSORS)), target / SAFETENSORS)
    return target


# --- what AutoPeftModelForCausalLM gives, bit for bit ---------------------------------------------------


def test_for_inference_equals_peft_auto_model(adapter_dir: Path) -> None:
    model = auto.for_inference(adapter_dir)
    reference = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    assert type(model) is PeftModelForCausalLM
    assert torch.equal(logits(model), logits(reference))
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    assert model.peft_config["default"].lora_dropout == 0.0  # a copy of the config, dropout removed


def test_merge_equals_peft_merge_and_unload(adapter_dir: Path) -> None:
    merged = auto.for_inference(adapter_dir, merge=True)
    reference = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).merge_and_unload().eval()
    assert type(merged) is LlamaForCausalLM
    assert torch.equal(logits(merged), logits(reference))


def test_for_training_is_trainable_and_equals_peft(adapter_dir: Path) -> None:
    model = auto.for_training(adapter_dir)
    assert all(m.training for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_" in n for n in trainable)
    reference = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), is_trainable=True)
    assert torch.equal(logits(model.eval()), logits(reference.eval()))


def test_base_kwargs_go_to_the_base_from_pretrained(adapter_dir: Path, base_dir: Path) -> None:
    model = auto.for_inference(adapter_dir, dtype=torch.bfloat16)
    assert model.get_base_model().dtype == torch.bfloat16
    # The same as loading the base by hand with those kwargs. (Not compared with PEFT here: on a
    # bf16 base the loaders' low_cpu_mem_usage path rounds the fp32 adapter weights through bf16,
    # PEFT's default path does not -- peft/utils/save_and_load.py, set_peft_model_state_dict.)
    by_hand = load_for_inference(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), adapter_dir
    )
    assert torch.equal(logits(model), logits(by_hand))


def test_grown_vocabulary_is_resized_from_the_saved_embeddings(base_dir: Path, tmp_path: Path) -> None:
    """An adapter trained after adding tokens: the saved embedding's rows say the size, no tokenizer."""
    grown = LlamaForCausalLM.from_pretrained(base_dir)
    grown.resize_token_embeddings(70)
    config = lora(modules_to_save=["embed_tokens", "lm_head"])
    adapter = save_adapter(grown, config, tmp_path / "grown", train_steps=1)
    model = auto.for_inference(adapter)
    manual = LlamaForCausalLM.from_pretrained(base_dir)
    manual.resize_token_embeddings(70)
    reference = PeftModel.from_pretrained(manual, str(adapter)).eval()
    assert model.get_base_model().get_input_embeddings().num_embeddings == 70
    assert torch.equal(logits(model), logits(reference))


# --- the base and its class: from the config, or given ---------------------------------------------------


def test_base_model_and_model_class_fill_in_what_the_config_lacks(adapter_dir: Path, tmp_path: Path) -> None:
    bare = edited(adapter_dir, tmp_path / "bare", config={"base_model_name_or_path": None, "task_type": None})
    with pytest.raises(AdapterConfigError, match=r"records no base model .* pass base_model="):
        auto.for_inference(bare)
    base = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    with pytest.raises(AdapterConfigError, match=r"records no task_type .* pass model_class="):
        auto.for_inference(bare, base_model=base)
    model = auto.for_inference(bare, base_model=base, model_class=LlamaForCausalLM)
    assert torch.equal(logits(model), logits(auto.for_inference(adapter_dir)))


# --- a broken adapter never loads the base ------------------------------------------------------------


def _nan(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(tensors)[0]
    return {**tensors, key: torch.full_like(tensors[key], float("nan"))}


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("nan", AdapterWeightsError, "NaN or inf"),
        ("truncated", AdapterWeightsError, "not a valid safetensors file"),
        ("unknown type", AdapterConfigError, "Unknown PEFT type"),
        ("pickle only", UnsafeAdapterError, "allow_pickle=True"),
        ("pickle with code", UnsafeAdapterError, "weights_only"),  # even with allow_pickle=True
        ("integer weights", AdapterWeightsError, "dtypes the adapter cannot hold"),
        ("bad dropout", ValueError, r"dropout must be in \[0, 1\)"),
    ],
)
def test_broken_adapter_is_refused_before_the_base_loads(
    adapter_dir: Path, tmp_path: Path, case: str, error: type[Exception], match: str
) -> None:
    # The base it names does not exist: had the base been loaded first, transformers would raise.
    missing = {"base_model_name_or_path": str(tmp_path / "no-such-base")}
    if case == "nan":
        broken = edited(adapter_dir, tmp_path / "broken", config=missing, weights=_nan)
    elif case == "unknown type":
        broken = edited(adapter_dir, tmp_path / "broken", config={**missing, "peft_type": "NOT_A_TUNER"})
    else:
        broken = edited(adapter_dir, tmp_path / "broken", config=missing)
    if case == "truncated":
        weights = broken / SAFETENSORS
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "pickle only":
        torch.save(load_file(broken / SAFETENSORS), broken / "adapter_model.bin")
        (broken / SAFETENSORS).unlink()
    elif case == "pickle with code":
        (broken / "adapter_model.bin").write_bytes(pickle.dumps({"x": _RunsCode()}))
        (broken / SAFETENSORS).unlink()
    elif case == "integer weights":
        tensors = load_file(broken / SAFETENSORS)
        save_file({k: v.to(torch.int32) for k, v in tensors.items()}, broken / SAFETENSORS)
    dropout = 2.0 if case == "bad dropout" else 0.0
    with pytest.raises(error, match=match):
        auto.for_inference(broken, dropout=dropout, allow_pickle=case == "pickle with code")


class _RunsCode:
    """Unpickling this would call a function: ``torch.load(weights_only=True)`` refuses it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


# --- against the local hub: the bars --------------------------------------------------------------------

HUB = ["child_auto", "child_peft_auto", "child_auto_nan", "child_auto_bad_config", "child_peft_auto_nan"]


@pytest.fixture(scope="module")
def hub_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("auto-hub")
    tiny_llama().save_pretrained(root / "base")
    base = tiny_llama()
    base.name_or_path = "org/tiny-llama"  # what from_pretrained("org/tiny-llama") records, PEFT copies
    good = save_adapter(base, lora(), root / "adapter", train_steps=1)
    nan = edited(good, root / "nan", weights=_nan)
    bad = edited(good, root / "bad", config={"peft_type": "NOT_A_TUNER"})
    extras = {"README.md": b"# adapter\n", "optimizer.pt": b"\x80opt", "training_args.bin": b"\x80args"}

    server = HubServer()
    server.add_repo("org/tiny-llama", {"main": folder_files(root / "base")})
    for repo, folder in (("org/adapter", good), ("org/nan-adapter", nan), ("org/bad-config", bad)):
        server.add_repo(repo, {"main": {**folder_files(folder), **extras}})
    context = root / "context.json"
    context.write_text(json.dumps({"root": str(root)}), encoding="utf-8")
    env = {
        "HUB_TEST_CONTEXT": str(context),
        "HUB_TEST_OUT": str(root / "out.json"),
        "HF_HOME": str(root / "hf"),
    }
    with server:
        return server.run_child("test_auto", HUB, env=env)


def base_requests(outcome: Outcome) -> list[str]:
    return [f"{r.method} {r.path}" for r in outcome.requests if r.repo == "org/tiny-llama"]


@pytest.mark.slow  # one child process for the hub tests (~15 s)
@pytest.mark.hub
def test_hub_id_gives_what_peft_auto_gives(hub_outcomes: dict[str, Outcome]) -> None:
    assert hub_outcomes["child_auto"].error is None, hub_outcomes["child_auto"].message
    assert hub_outcomes["child_peft_auto"].value == {"equal": True}


@pytest.mark.slow  # one child process for the hub tests (~15 s)
@pytest.mark.hub
def test_hub_id_fetches_the_two_adapter_files_first_then_the_base(hub_outcomes: dict[str, Outcome]) -> None:
    downloads = hub_outcomes["child_auto"].downloads
    assert downloads[:2] == [f"org/adapter/{CONFIG}", f"org/adapter/{SAFETENSORS}"]
    assert all(path.startswith("org/tiny-llama/") for path in downloads[2:])
    assert "org/tiny-llama/model.safetensors" in downloads
    touched = {path for path in hub_outcomes["child_auto"].touched if path.startswith("org/adapter/")}
    assert touched == {f"org/adapter/{CONFIG}", f"org/adapter/{SAFETENSORS}"}


@pytest.mark.slow  # one child process for the hub tests (~15 s)
@pytest.mark.hub
@pytest.mark.parametrize(
    ("scenario", "error", "match"),
    [
        ("child_auto_nan", "AdapterWeightsError", "NaN or inf"),
        ("child_auto_bad_config", "AdapterConfigError", "Unknown PEFT type"),
    ],
)
def test_broken_hub_adapter_costs_not_one_request_for_the_base(
    hub_outcomes: dict[str, Outcome], scenario: str, error: str, match: str
) -> None:
    outcome = hub_outcomes[scenario]
    assert outcome.error == error
    assert match in outcome.message
    assert base_requests(outcome) == []


@pytest.mark.slow  # one child process for the hub tests (~15 s)
@pytest.mark.hub
def test_raw_peft_auto_downloads_the_base_for_a_nan_adapter(hub_outcomes: dict[str, Outcome]) -> None:
    """What auto exists for, reproduced: PEFT fetches the base, then loads the NaN adapter silently."""
    outcome = hub_outcomes["child_peft_auto_nan"]
    assert outcome.error is None
    assert outcome.value == {"nan_weights": True}
    assert "GET /org/tiny-llama/resolve/" in "\n".join(base_requests(outcome))


# --- the child side -----------------------------------------------------------------------------------


def _root() -> Path:
    return Path(json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8"))["root"])


def child_auto() -> None:
    model = auto.for_inference("org/adapter", cache_dir=str(_root() / "cache-auto"))
    torch.save(logits(model), _root() / "auto-logits.pt")


def child_peft_auto() -> dict[str, bool]:
    model = AutoPeftModelForCausalLM.from_pretrained("org/adapter", cache_dir=str(_root() / "cache-peft"))
    ours = torch.load(_root() / "auto-logits.pt")
    return {"equal": torch.equal(logits(model.eval()), ours)}


def child_auto_nan() -> None:
    auto.for_inference("org/nan-adapter", cache_dir=str(_root() / "cache-nan"))


def child_auto_bad_config() -> None:
    auto.for_inference("org/bad-config", cache_dir=str(_root() / "cache-bad"))


def child_peft_auto_nan() -> dict[str, bool]:
    model = AutoPeftModelForCausalLM.from_pretrained(
        "org/nan-adapter", cache_dir=str(_root() / "cache-peft-nan")
    )
    return {"nan_weights": any(bool(torch.isnan(p).any()) for p in model.parameters())}
