"""``receipt(model)``: what a model is -- its adapters' sources and file digests, the base, the library
versions, the modes -- as JSON-ready data that is the same for the same inputs.

Real adapters saved by PEFT, loaded by safe_lora's loaders (and, for the adapters safe_lora did not
load, by PEFT and transformers themselves); the hub side of a receipt (repo, revision, commit) is in
``test_provenance_hub.py``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONFIG, SAFETENSORS, make_mlp, save_adapter, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaForCausalLM

import safe_lora
from safe_lora import (
    auto,
    live_dropout,
    load_adapter,
    load_for_inference,
    load_for_training,
    receipt,
    use_adapter,
)

X = torch.tensor([[1, 5, 9, 2, 7]])
LIBRARIES = ("peft", "torch", "transformers", "huggingface_hub", "safetensors")


def lora(**overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = {
        "target_modules": ["q_proj", "v_proj"],
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.1,
        "rank_pattern": {"layers.0.self_attn.q_proj": 4},
        "alpha_pattern": {"layers.1.self_attn.v_proj": 16},
        "task_type": "CAUSAL_LM",
    }
    return LoraConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters saved once (PEFT writes ``target_modules`` in set order, which varies by process)."""
    root = tmp_path_factory.mktemp("receipt")
    tiny_llama().save_pretrained(root / "base")
    named = LlamaForCausalLM.from_pretrained(root / "base")
    plain = lora(rank_pattern={}, alpha_pattern={})
    return {
        "base": root / "base",
        "a": save_adapter(named, lora(), root / "a", train_steps=1, seed=1),
        "b": save_adapter(named, lora(), root / "b", train_steps=1, seed=2),  # a's config, other weights
        "plain": save_adapter(named, plain, root / "plain", train_steps=1, seed=3),
        "plain2": save_adapter(named, plain, root / "plain2", train_steps=1, seed=4),  # plain's config
    }


def digests(folder: Path) -> dict[str, str]:
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in (CONFIG, SAFETENSORS)}


def dumped(model: nn.Module) -> str:
    """The receipt as serving code would log it: sorted keys, no NaN or inf allowed."""
    return json.dumps(receipt(model), sort_keys=True, allow_nan=False)


def config_sha256(model: Any) -> str:
    canonical = json.dumps(json.loads(model.config.to_json_string()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# --- what it says ----------------------------------------------------------------------------------------


def test_every_field_of_a_loaded_adapter(folders: dict[str, Path]) -> None:
    base = tiny_llama()
    model = load_for_inference(base, folders["a"])
    got = json.loads(dumped(model))
    assert got["format"] == "safe_lora.receipt/1"
    assert got["adapters"] == {
        "default": {
            "source": os.fspath(folders["a"]),
            "revision": None,
            "commit": None,
            "subfolder": None,
            "files": digests(folders["a"]),
            "peft_type": "LORA",
            "modules": 4,  # q_proj and v_proj of two layers
            "r": 2,
            "rank_pattern": {"layers.0.self_attn.q_proj": 4},  # as the file says it
            "ranks": [2, 4],  # as PEFT resolved them for the layers
            "alpha": 4,
            "alpha_pattern": {"layers.1.self_attn.v_proj": 16},
            "alphas": [4, 16],
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": None,
            "active": True,
        }
    }
    assert got["active_adapters"] == ["default"]
    assert got["merged"] == []
    assert got["model"] == "peft.peft_model.PeftModelForCausalLM"
    assert got["base_model"] == {
        "class": "transformers.models.llama.modeling_llama.LlamaForCausalLM",
        "name_or_path": "tiny-llama",
        "config_sha256": config_sha256(base),
    }
    assert got["versions"] == {
        "safe_lora": safe_lora.__version__,
        **{name: importlib.metadata.version(name) for name in LIBRARIES},
    }
    assert got["modes"] == {
        "training_modules": {"count": 0, "total": len(list(model.modules())), "names": []},
        "trainable_parameters": 0,
        "live_dropout": [],
    }


def test_a_training_load_shows_its_modes_and_live_dropout(folders: dict[str, Path]) -> None:
    model = load_for_training(tiny_llama(), folders["a"])
    modes = receipt(model)["modes"]
    total = len(list(model.modules()))
    assert modes["training_modules"] == {"count": total, "total": total, "names": None}  # too many to list
    assert modes["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    sites = [{"name": s.name, "kind": s.kind, "p": s.p, "adapter": s.adapter} for s in live_dropout(model)]
    assert modes["live_dropout"] == sites
    assert len(sites) == 4
    assert {(s["kind"], s["p"], s["adapter"]) for s in sites} == {("adapter", 0.1, "default")}


def test_a_few_modules_in_training_mode_are_named(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    model.get_base_model().lm_head.train()
    assert receipt(model)["modes"]["training_modules"]["names"] == ["base_model.model.lm_head"]


def test_a_base_without_a_config_has_no_config_digest(tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8)
    model = load_for_inference(make_mlp(), save_adapter(make_mlp(), config, tmp_path / "mlp", train_steps=1))
    base = receipt(model)["base_model"]
    assert base == {"class": "safe_lora._demo.DemoMLP", "name_or_path": None, "config_sha256": None}


def test_receipt_is_exported_and_takes_modules_only() -> None:
    assert "receipt" in safe_lora.__all__
    assert safe_lora.receipt is receipt
    with pytest.raises(TypeError, match=r"receipt\(\) takes a torch\.nn\.Module, found str"):
        receipt("out/adapter")  # type: ignore[arg-type]


# --- the same inputs, the same bytes ------------------------------------------------------------------------


def test_two_fresh_loads_give_byte_identical_receipts(folders: dict[str, Path]) -> None:
    assert dumped(load_for_inference(tiny_llama(), folders["a"])) == dumped(
        load_for_inference(tiny_llama(), folders["a"])
    )


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from safe_lora import load_for_inference, receipt
print(json.dumps(receipt(load_for_inference(tiny_llama(), {adapter!r})), sort_keys=True, allow_nan=False))
"""


@pytest.mark.slow
def test_fresh_processes_with_other_hash_seeds_give_byte_identical_receipts(folders: dict[str, Path]) -> None:
    """PEFT keeps ``target_modules`` as a set, whose order changes with ``PYTHONHASHSEED``: the
    receipt's does not."""
    code = _CHILD.format(tests=os.fspath(Path(__file__).parent), adapter=os.fspath(folders["a"]))
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outputs.append(done.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1] == dumped(load_for_inference(tiny_llama(), folders["a"]))


def test_non_finite_settings_still_serialise(folders: dict[str, Path]) -> None:
    """A model safe_lora did not load may hold a NaN alpha (safe_lora refuses one): no crash, a string."""
    model = get_peft_model(tiny_llama(), lora(lora_alpha=float("nan"), alpha_pattern={}))
    got = json.loads(dumped(model))
    assert got["adapters"]["default"]["alpha"] == "nan"
    assert got["adapters"]["default"]["alphas"] == ["nan"]


# --- it follows the model ----------------------------------------------------------------------------------


def test_it_follows_load_adapter_and_replace(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    load_adapter(model, folders["plain"], adapter_name="plain")
    got = receipt(model)
    assert sorted(got["adapters"]) == ["default", "plain"]
    assert got["adapters"]["plain"]["files"] == digests(folders["plain"])
    assert got["adapters"]["plain"]["source"] == os.fspath(folders["plain"])
    assert (got["adapters"]["plain"]["active"], got["adapters"]["default"]["active"]) == (False, True)
    assert got["adapters"]["plain"]["ranks"] == [2]
    assert got["active_adapters"] == ["default"]
    with use_adapter(model, "plain"):
        assert receipt(model)["active_adapters"] == ["plain"]

    # (Replaced: "plain", whose config has no patterns. replace=True refuses a config with a
    # rank_pattern against the same config loaded: the loaded copy holds the resolved patterns.)
    load_adapter(model, folders["plain2"], adapter_name="plain", replace=True)
    replaced = receipt(model)["adapters"]["plain"]
    assert replaced["files"] == digests(folders["plain2"]) != digests(folders["plain"])
    assert replaced["source"] == os.fspath(folders["plain2"])
    assert receipt(model)["adapters"]["default"] == got["adapters"]["default"]


def test_a_refused_load_adapter_leaves_the_receipt_as_it_was(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["plain"])
    before = dumped(model)
    with pytest.raises(safe_lora.AdapterIntegrityError):
        load_adapter(model, folders["plain2"], adapter_name="default", replace=True, expected_sha256="0" * 64)
    with pytest.raises(safe_lora.AdapterIntegrityError):
        load_adapter(model, folders["b"], adapter_name="b", expected_sha256="0" * 64)
    assert dumped(model) == before


def test_a_mapping_of_adapters(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]}, active="b")
    got = receipt(model)
    assert {name: entry["files"] for name, entry in got["adapters"].items()} == {
        "a": digests(folders["a"]),
        "b": digests(folders["b"]),
    }
    assert got["active_adapters"] == ["b"]


# --- models safe_lora did not load --------------------------------------------------------------------------


def test_an_adapter_peft_loaded_has_no_source(folders: dict[str, Path]) -> None:
    model = PeftModel.from_pretrained(tiny_llama(), os.fspath(folders["a"]))
    entry = receipt(model)["adapters"]["default"]
    assert (entry["source"], entry["files"], entry["commit"]) == (None, {}, None)
    assert (entry["peft_type"], entry["modules"], entry["ranks"]) == ("LORA", 4, [2, 4])
    json.dumps(receipt(model), allow_nan=False)


def test_a_base_model_without_adapters(folders: dict[str, Path]) -> None:
    got = receipt(tiny_llama())
    assert (got["adapters"], got["active_adapters"], got["merged"]) == ({}, [], [])
    assert (
        got["base_model"]["class"]
        == got["model"]
        == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    )


def test_an_adapter_added_by_peft_next_to_recorded_ones(folders: dict[str, Path]) -> None:
    model = load_for_inference(tiny_llama(), folders["a"])
    model.load_adapter(os.fspath(folders["plain"]), adapter_name="raw")
    got = receipt(model)["adapters"]
    assert got["default"]["files"] == digests(folders["a"])
    assert (got["raw"]["source"], got["raw"]["files"]) == (None, {})


@pytest.mark.filterwarnings("ignore:Adapter default was active which is now deleted")
def test_a_recorded_name_loaded_again_by_peft_loses_its_record(folders: dict[str, Path]) -> None:
    """Deleted and loaded again by PEFT under the same name: the record is not that adapter's."""
    model = load_for_inference(tiny_llama(), {"default": folders["a"], "keep": folders["plain"]})
    model.delete_adapter("default")
    model.load_adapter(os.fspath(folders["b"]), adapter_name="default")
    got = receipt(model)["adapters"]
    assert (got["default"]["source"], got["default"]["files"]) == (None, {})
    assert got["keep"]["files"] == digests(folders["plain"])


def test_transformers_peft_integration(folders: dict[str, Path]) -> None:
    """``PreTrainedModel.load_adapter`` (transformers' own PEFT integration): no PeftModel, still listed."""
    model = tiny_llama()
    model.load_adapter(os.fspath(folders["a"]), adapter_name="hf")
    got = receipt(model)
    assert got["adapters"]["hf"]["source"] is None
    assert got["adapters"]["hf"]["modules"] == 4
    assert got["active_adapters"] == ["hf"]


# --- wrappers and merged models ---------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "both"])
def test_wrappers_give_the_receipt_of_the_model_inside(folders: dict[str, Path], wrap: str) -> None:
    model = load_for_training(tiny_llama(), folders["a"])
    wrapped: nn.Module = model
    if wrap in ("DataParallel", "both"):
        wrapped = nn.DataParallel(wrapped)  # no GPU: it only holds the module
    if wrap in ("compile", "both"):
        wrapped = torch.compile(wrapped)  # compiles at the first call, which never comes
    assert dumped(wrapped) == dumped(model)


def test_merge_keeps_the_record_on_the_model_returned(folders: dict[str, Path]) -> None:
    merged = load_for_inference(tiny_llama(), folders["a"], merge=True)
    got = json.loads(dumped(merged))
    assert got["adapters"] == {}
    assert got["active_adapters"] == []
    (entry,) = got["merged"]
    assert entry["name"] == "default"
    assert entry["source"] == os.fspath(folders["a"])
    assert entry["files"] == digests(folders["a"])
    assert (entry["modules"], entry["ranks"], entry["alphas"]) == (4, [2, 4], [4, 16])  # before the merge
    assert entry["rank_pattern"] == {"layers.0.self_attn.q_proj": 4}
    assert (
        got["model"]
        == got["base_model"]["class"]
        == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    )
    assert dumped(merged) == dumped(load_for_inference(tiny_llama(), folders["a"], merge=True))


def test_only_the_active_adapter_of_a_mapping_is_merged(folders: dict[str, Path]) -> None:
    merged = load_for_inference(tiny_llama(), {"a": folders["a"], "b": folders["b"]}, active="b", merge=True)
    assert [(e["name"], e["files"]) for e in receipt(merged)["merged"]] == [("b", digests(folders["b"]))]


def test_a_merged_model_used_as_a_base_keeps_its_merged_entry(folders: dict[str, Path]) -> None:
    merged = load_for_inference(tiny_llama(), folders["a"], merge=True)
    model = load_for_inference(merged, folders["b"])
    got = receipt(model)
    assert [e["files"] for e in got["merged"]] == [digests(folders["a"])]
    assert got["adapters"]["default"]["files"] == digests(folders["b"])


def test_auto_records_the_adapter_and_the_base_it_loaded(folders: dict[str, Path], tmp_path: Path) -> None:
    adapter = Path(shutil.copytree(folders["a"], tmp_path / "a"))
    got = receipt(auto.for_inference(adapter))
    assert got["adapters"]["default"]["files"] == digests(folders["a"])
    assert got["adapters"]["default"]["source"] == os.fspath(adapter)
    assert got["base_model"]["name_or_path"] == os.fspath(folders["base"])
    merged = receipt(auto.for_inference(adapter, merge=True))
    assert [e["files"] for e in merged["merged"]] == [digests(folders["a"])]
