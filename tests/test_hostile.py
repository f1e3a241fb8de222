"""A hostile adapter costs nothing: refused within 5 s, with at most 256 MiB of peak memory growth, and
the model exactly as it was -- by the loader and by ``inspect_adapter`` with and without a base model.

Every case is a real adapter written by PEFT's ``save_pretrained`` on a Llama-shaped base (hidden 512,
4 layers) with one field of ``adapter_config.json`` edited to claim what the weights cannot back: a
rank, a token count, a list length, a layer count -- the values that size PEFT's allocations or its
work -- or a regular expression that backtracks without end in a field PEFT matches against module
names. Raw PEFT pays what such a config asks (GBs, tens of seconds, or forever for a pattern) before
it finds the weights do not fit; the bars below are an unbounded path's clear failure.

All cases run in one child process (``tests/_hostile_child.py``) that resets the kernel's peak-RSS
counter before each call, so each call's own peak is measured, and a runaway allocation cannot take
the test runner with it.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

SECONDS = 5.0
GROWTH_MIB = 256.0

# A pattern the regex module itself backtracks on without end, under every template PEFT applies.
BOMB = r"((?:\w|\.)+?)+(?=[A-Z])"
# A pattern Python's re backtracks on without end, which the regex module answers at once.
RE_BOMB = "(.+)+!"
TARGETS = ["q_proj", "v_proj"]


def _pristine() -> dict[str, peft.PeftConfig]:
    lora = {"target_modules": TARGETS, "task_type": "CAUSAL_LM"}
    return {
        "lora": peft.LoraConfig(r=4, **lora),
        "lora-tokens": peft.LoraConfig(r=4, trainable_token_indices=[1, 2], **lora),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "p-tuning": peft.PromptEncoderConfig(
            num_virtual_tokens=4, encoder_hidden_size=8, task_type="CAUSAL_LM"
        ),
        "multitask": peft.MultitaskPromptTuningConfig(
            num_virtual_tokens=4, num_tasks=2, task_type="CAUSAL_LM"
        ),
        "adaption": peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM"),
        "vera": peft.VeraConfig(r=4, **lora),
        "loha": peft.LoHaConfig(r=4, **lora),
        "lokr": peft.LoKrConfig(r=4, **lora),
        "adalora": peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, **lora),
        "fourierft": peft.FourierFTConfig(n_frequency=16, **lora),
        "vblora": peft.VBLoRAConfig(vector_length=8, num_vectors=16, **lora),
        "randlora": peft.RandLoraConfig(r=4, **lora),
        "boft": peft.BOFTConfig(boft_block_size=4, **lora),
        "c3a": peft.C3AConfig(block_size=16, **lora),
        "shira": peft.ShiraConfig(r=2, **lora),
        "hra": peft.HRAConfig(r=4, **lora),
        "ia3": peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }


# (case id, pristine adapter, config fields to set). Sizes are chosen so that paying for them would blow
# the bars clearly: GBs of tensors, or minutes of Python.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("lora-r", "lora", {"r": 40_000}),
    ("lora-rank-pattern", "lora", {"rank_pattern": {"q_proj": 400_000}}),
    ("lora-layer-replication", "lora", {"layer_replication": [[0, 4]] * 300}),
    ("lora-target-list", "lora", {"target_modules": [f"m{i}" for i in range(150_000)] + TARGETS}),
    ("lora-target-list-long", "lora", {"target_modules": [f"m{i}" for i in range(2_000_000)] + TARGETS}),
    (
        "multitask-source-file",
        "multitask",
        {"prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": "/dev/zero"},
    ),
    ("lora-token-indices", "lora-tokens", {"trainable_token_indices": list(range(2, 60_000))}),
    ("lora-token-indices-long", "lora-tokens", {"trainable_token_indices": list(range(2, 500_000))}),
    ("prompt-virtual-tokens", "prompt", {"num_virtual_tokens": 2_000_000}),
    ("prompt-token-dim", "prompt", {"token_dim": 2_000_000}),
    ("prompt-submodules", "prompt", {"num_transformer_submodules": 100_000}),
    ("prefix-virtual-tokens", "prefix", {"num_virtual_tokens": 2_000_000}),
    ("prefix-layers", "prefix", {"num_layers": 200_000}),
    ("p-tuning-hidden", "p-tuning", {"encoder_hidden_size": 1_000_000}),
    ("multitask-tasks", "multitask", {"num_tasks": 5_000_000}),
    ("adaption-len", "adaption", {"adapter_len": 2_000_000}),
    ("vera-r", "vera", {"r": 400_000}),
    ("loha-r", "loha", {"r": 40_000}),
    ("lokr-r", "lokr", {"r": 40_000}),
    ("adalora-init-r", "adalora", {"init_r": 40_000}),
    ("fourierft-n", "fourierft", {"n_frequency": 200_000}),
    ("vblora-vectors", "vblora", {"num_vectors": 40_000_000}),
    ("vblora-length", "vblora", {"vector_length": 4_000_000}),
    ("randlora-r", "randlora", {"r": 400_000}),
    ("c3a-block", "c3a", {"block_size": 512}),
    ("shira-r", "shira", {"r": 40_000}),
    ("hra-r", "hra", {"r": 40_000}),
    # Patterns, in every field PEFT matches against module names.
    *[
        (f"pattern-{field}-{kind}", base, {field: value(bomb)})
        for kind, bomb in (("regex", BOMB), ("re", RE_BOMB))
        for field, base, value in (
            ("target_modules", "lora", lambda b: b),
            ("exclude_modules", "lora", lambda b: b),
            ("rank_pattern", "lora", lambda b: {b: 8}),
            ("alpha_pattern", "lora", lambda b: {b: 8}),
            ("modules_to_save", "lora", lambda b: [b]),
            ("layers_pattern", "lora", lambda b: [b]),
            ("n_frequency_pattern", "fourierft", lambda b: {b: 4}),
            ("feedforward_modules", "ia3", lambda b: b),
        )
    ],
]
# Patterns the regex module answers at once match no module: the load is then either refused or
# harmless (an exclusion or a pattern key that selects nothing), but never slow.
# A long target list the file's size allows is reduced to the names that match a module, and loads.
# P-tuning's encoder_hidden_size sizes an MLP that only training builds, and PEFT cannot load a
# prompt-learning adapter for training: the inference load never allocates it.
HARMLESS = {
    "lora-target-list",
    "p-tuning-hidden",
    *(
        f"pattern-{f}-re"
        for f in (
            "exclude_modules",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "n_frequency_pattern",
        )
    ),
}
EXTRA = {
    "pattern-layers_pattern-regex": {"layers_to_transform": [0]},
    "pattern-layers_pattern-re": {"layers_to_transform": [0]},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
    )
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    pristine = {}
    for name, peft_config in _pristine().items():
        model = peft.get_peft_model(copy.deepcopy(base), peft_config)
        model.save_pretrained(root / f"pristine-{name}")
        pristine[name] = root / f"pristine-{name}"
    cases = []
    for case_id, source, fields in CASES:
        folder = root / case_id
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(
            (pristine[source] / "adapter_model.safetensors").read_bytes()
        )
        raw = json.loads((pristine[source] / "adapter_config.json").read_text())
        raw.update(EXTRA.get(case_id, {}))
        raw.update(fields)
        (folder / "adapter_config.json").write_text(json.dumps(raw))
        cases.append({"id": case_id, "folder": os.fspath(folder), "base": os.fspath(root / "base")})
    (root / "cases.json").write_text(json.dumps(cases))
    child = Path(__file__).with_name("_hostile_child.py")
    run = subprocess.run(
        [sys.executable, os.fspath(child), os.fspath(root / "cases.json"), os.fspath(root / "results.json")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((root / "results.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("case_id", [case[0] for case in CASES])
@pytest.mark.parametrize("call", ["load", "load_training", "inspect", "inspect_model", "inspect_folder"])
def test_a_hostile_config_costs_nothing(results: dict[str, Any], case_id: str, call: str) -> None:
    result = results[case_id][call]
    assert result["error"] is None or result["safe_lora_error"], result["message"]
    assert result["seconds"] < SECONDS, f"{call} took {result['seconds']:.1f} s: {result['message']}"
    assert result["grew_mib"] < GROWTH_MIB, f"{call} grew {result['grew_mib']:.0f} MiB: {result['message']}"
    if not results[case_id]["model_unchanged"]["loaded"]:
        assert results[case_id]["model_unchanged"]["outcome"], "a refusal changed the model"
    if case_id in HARMLESS:
        return
    if call in ("load", "load_training"):
        assert result["error"] is not None, "the hostile config loaded"
    elif call in ("inspect_model", "inspect_folder"):
        assert result["outcome"] is False, "inspect with the base says it loads safely"


@pytest.mark.parametrize(
    "case_id", [c[0] for c in CASES if c[0].startswith("pattern-") and c[0].endswith("-regex")]
)
def test_a_pattern_that_does_not_finish_is_named(results: dict[str, Any], case_id: str) -> None:
    field = case_id.removeprefix("pattern-").removesuffix("-regex")
    result = results[case_id]["load"]
    assert result["error"] == "AdapterConfigError"
    assert field in result["fields"], result["message"]
