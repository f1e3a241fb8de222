"""Every warning safe_lora emits points at the caller's line, from every public entry point that emits it.

``warnings.warn`` blames the line a fixed number of frames up; safe_lora's entry points reach their
checks through different call paths (``auto`` through the loaders, context managers through
``contextlib``, the decorator through its wrapper), so each warning goes through ``errors.warn``,
which finds the first frame outside safe_lora. Each situation below is built for real -- a fresh
adapter saved before any training step, a config field the installed PEFT does not know, a recorded
base of another architecture, a key dropped from the file, a model without adapters, PVeRA sampling
at inference, a hub that does not answer -- and the recorded warning's ``filename`` must be this file
and its ``lineno`` the line of the call.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import save_adapter, tiny_llama
from hub_server import HubServer, Outcome, folder_files
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from safe_lora import (
    BaseModelMismatchWarning,
    HubUnreachableWarning,
    NoAdapterWarning,
    NoOpAdapterWarning,
    SafeLoraWarning,
    StochasticAdapterWarning,
    UnknownConfigFieldWarning,
    auto,
    deterministic_lora,
    inspect_adapter,
    load_adapter,
    load_for_inference,
    load_for_training,
)

CONFIG, SAFETENSORS = "adapter_config.json", "adapter_model.safetensors"
DROPPED = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _line() -> int:
    """The caller's current line (``_line() + 1``: the line of the call that follows)."""
    return sys._getframe(1).f_lineno


def _lora(**overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = {"target_modules": ["q_proj", "v_proj"], "r": 2, "task_type": "CAUSAL_LM"}
    return LoraConfig(**{**fields, **overrides})


def _llama(base_dir: Path) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(base_dir).eval()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The base (a saved tiny Llama) and one adapter folder per situation, each recording that base."""
    from transformers import MistralConfig

    root = tmp_path_factory.mktemp("warnings")
    base_dir = root / "base"
    tiny_llama().save_pretrained(base_dir)
    trained = save_adapter(_llama(base_dir), _lora(init_lora_weights=False), root / "trained", train_steps=1)

    # A fresh get_peft_model(...).save_pretrained: lora_B is all zeros, the adapter changes nothing.
    noop = root / "noop"
    get_peft_model(_llama(base_dir), _lora()).save_pretrained(str(noop))

    # A field the installed PEFT does not know, whose value (null) means "not used".
    unknown = Path(shutil.copytree(trained, root / "unknown"))
    config = json.loads((unknown / CONFIG).read_text(encoding="utf-8"))
    (unknown / CONFIG).write_text(json.dumps({**config, "new_variant_config": None}), encoding="utf-8")

    # The recorded base is a Mistral with the Llama's sizes: the keys and shapes fit, the
    # architecture does not.
    fields = tiny_llama().config.to_dict()
    sizes = {k: fields[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    MistralConfig(**sizes, num_attention_heads=4, num_key_value_heads=2).save_pretrained(root / "mistral")
    mismatch = Path(shutil.copytree(trained, root / "mismatch"))
    config = json.loads((mismatch / CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(root / "mistral")
    (mismatch / CONFIG).write_text(json.dumps(config), encoding="utf-8")

    # One key dropped from the file: strict=False loads the rest with a UserWarning.
    partial = Path(shutil.copytree(trained, root / "partial"))
    tensors = load_file(partial / SAFETENSORS)
    del tensors[DROPPED]
    save_file(tensors, partial / SAFETENSORS)

    return {
        "base": base_dir,
        "trained": trained,
        "noop": noop,
        "unknown": unknown,
        "mismatch": mismatch,
        "partial": partial,
    }


# --------------------------------------------------------------------------------------------------
# The loaders: each situation through each entry point
# --------------------------------------------------------------------------------------------------

# (situation, warning category, message fragment, extra keyword arguments)
SITUATIONS = [
    ("noop", NoOpAdapterWarning, "changes nothing", {}),
    ("unknown", UnknownConfigFieldWarning, "new_variant_config", {}),
    ("mismatch", BaseModelMismatchWarning, "'mistral'", {}),
    ("partial", UserWarning, "strict=False", {"strict": False}),
]

# An entry point: (folders, adapter folder, keyword arguments) -> the line of the call.
Entry = Callable[[dict[str, Path], Path, dict[str, Any]], int]


def _for_inference(f: dict[str, Path], adapter: Path, kw: dict[str, Any]) -> int:
    model = _llama(f["base"])
    line = _line() + 1
    load_for_inference(model, adapter, **kw)
    return line


def _for_training(f: dict[str, Path], adapter: Path, kw: dict[str, Any]) -> int:
    model = _llama(f["base"])
    line = _line() + 1
    load_for_training(model, adapter, **kw)
    return line


def _load_adapter(f: dict[str, Path], adapter: Path, kw: dict[str, Any]) -> int:
    model = load_for_inference(_llama(f["base"]), f["trained"])
    line = _line() + 1
    load_adapter(model, adapter, adapter_name="second", **kw)
    return line


def _base_kw(f: dict[str, Path], adapter: Path) -> dict[str, Any]:
    # auto loads the recorded base; for the mismatch, the caller's own base instead (as PEFT's
    # Auto classes would load the Mistral the adapter names).
    return {"base_model": f["base"]} if adapter.name == "mismatch" else {}


def _auto_for_inference(f: dict[str, Path], adapter: Path, kw: dict[str, Any]) -> int:
    base = _base_kw(f, adapter)
    line = _line() + 1
    auto.for_inference(adapter, **base, **kw)
    return line


def _auto_for_training(f: dict[str, Path], adapter: Path, kw: dict[str, Any]) -> int:
    base = _base_kw(f, adapter)
    line = _line() + 1
    auto.for_training(adapter, **base, **kw)
    return line


ENTRIES: dict[str, Entry] = {
    "load_for_inference": _for_inference,
    "load_for_training": _for_training,
    "load_adapter": _load_adapter,
    "auto.for_inference": _auto_for_inference,
    "auto.for_training": _auto_for_training,
}


def _ours(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    """safe_lora's warnings among those recorded: its own categories, and its strict=False notice."""
    return [
        w
        for w in caught
        if issubclass(w.category, SafeLoraWarning)
        or (w.category is UserWarning and "strict=False" in str(w.message))
    ]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(
    ("situation", "category", "fragment", "kwargs"), SITUATIONS, ids=[s[0] for s in SITUATIONS]
)
def test_loader_warning_points_at_the_callers_line(
    folders: dict[str, Path],
    entry: str,
    situation: str,
    category: type[Warning],
    fragment: str,
    kwargs: dict[str, Any],
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = ENTRIES[entry](folders, folders[situation], dict(kwargs))
    ours = _ours(caught)
    assert [w.category for w in ours] == [category], [(w.category, str(w.message)) for w in caught]
    (warning,) = ours
    assert fragment in str(warning.message)
    assert (warning.filename, warning.lineno) == (__file__, line)


CODES = {
    "noop": "noop-adapter",
    "unknown": "config-ignored-fields",
    "mismatch": "base-mismatch",
    "partial": "keys-partial",
}


@pytest.mark.parametrize("situation", [s[0] for s in SITUATIONS])
def test_inspect_adapter_never_warns(folders: dict[str, Path], situation: str) -> None:
    """It reports the same situations as findings instead, with and without a base model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bare = inspect_adapter(folders[situation], strict=situation != "partial")
        with_base = inspect_adapter(
            folders[situation], base_model=_llama(folders["base"]), strict=situation != "partial"
        )
    assert _ours(caught) == []
    # What a loader warns about is a finding of the report instead (a base mismatch needs the base).
    assert bare.loads_safely  # warnings, not refusals
    assert with_base.loads_safely
    assert [f.code for f in with_base.findings if f.code == CODES[situation]] == [CODES[situation]]


# --------------------------------------------------------------------------------------------------
# deterministic_lora, as a context manager and as a decorator
# --------------------------------------------------------------------------------------------------


def _no_adapter() -> nn.Module:
    return tiny_llama().train()  # type: ignore[no-any-return]


def _pvera_sampling() -> nn.Module:
    torch.manual_seed(0)
    config = peft.PveraConfig(target_modules=["q_proj"], sample_at_inference=True)
    return get_peft_model(tiny_llama(), config).train()


MODELS: dict[str, tuple[Callable[[], nn.Module], type[Warning], str]] = {
    "no-adapter": (_no_adapter, NoAdapterWarning, "found none in LlamaForCausalLM"),
    "pvera-sample_at_inference": (_pvera_sampling, StochasticAdapterWarning, "sample_at_inference"),
}


def _as_context_manager(model: nn.Module) -> int:
    line = _line() + 1
    with deterministic_lora(model):
        pass
    return line


def _as_decorator(model: nn.Module) -> int:
    @deterministic_lora(model)
    def evaluate() -> bool:
        return True

    line = _line() + 1
    evaluate()
    return line


@pytest.mark.parametrize("form", [_as_context_manager, _as_decorator], ids=["with", "decorator"])
@pytest.mark.parametrize("model", list(MODELS))
def test_deterministic_lora_warning_points_at_the_callers_line(
    model: str, form: Callable[[nn.Module], int]
) -> None:
    build, category, fragment = MODELS[model]
    built = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = form(built)
    ours = _ours(caught)
    assert [w.category for w in ours] == [category]
    assert fragment in str(ours[0].message)
    assert (ours[0].filename, ours[0].lineno) == (__file__, line)


def test_the_helper_names_the_callers_module_for_filters(folders: dict[str, Path]) -> None:
    """``filterwarnings(module=...)`` matches the caller's module, as for ``warnings.warn``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=NoOpAdapterWarning, module=__name__)
        load_for_inference(_llama(folders["base"]), folders["noop"])
    assert _ours(caught) == []


# --------------------------------------------------------------------------------------------------
# HubUnreachableWarning: a hub that does not answer, in a child process (huggingface_hub reads its
# endpoint when imported)
# --------------------------------------------------------------------------------------------------

UNREACHABLE = HubUnreachableWarning.__name__
HUB_ENTRIES = [
    "child_load_for_inference",
    "child_load_for_training",
    "child_load_adapter",
    "child_auto_for_inference",
    "child_auto_for_training",
]


@pytest.mark.hub
@pytest.mark.slow
def test_hub_unreachable_warning_points_at_the_callers_line(folders: dict[str, Path], tmp_path: Path) -> None:
    context = tmp_path / "context.json"
    context.write_text(
        json.dumps(
            {
                "base": str(folders["base"]),
                "trained": str(folders["trained"]),
                "cache": str(tmp_path / "cache"),
            }
        ),
        encoding="utf-8",
    )
    # Answers within a second or never: the silent hub costs one second per load.
    env = {
        "HUB_TEST_CONTEXT": str(context),
        "HUB_TEST_OUT": str(tmp_path / "out.json"),
        "HF_HUB_ETAG_TIMEOUT": "1",
    }
    server = HubServer()
    server.add_repo("org/adapter", {"main": folder_files(folders["trained"])})
    with server:
        warm = server.run_child("test_warnings", HUB_ENTRIES, env=env)  # fills the cache
        with server.silenced():
            silent = server.run_child("test_warnings", HUB_ENTRIES, env=env, timeout=300)
    for name in HUB_ENTRIES:
        assert warm[name].error is None, warm[name].message
        assert warm[name].warned(UNREACHABLE) == []
        outcome: Outcome = silent[name]
        assert outcome.error is None, outcome.message
        (message,) = outcome.warned(UNREACHABLE)
        assert "Hugging Face Hub unreachable" in message
        # The child imported this very file: the warning names it, and the line of the call.
        assert outcome.warned_at(UNREACHABLE) == [(__file__, outcome.value)], name


# --- the child side --------------------------------------------------------------------------------


def _context() -> dict[str, str]:
    return json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def child_load_for_inference() -> int:
    c = _context()
    line = _line() + 1
    load_for_inference(_llama(Path(c["base"])), "org/adapter", cache_dir=c["cache"])
    return line


def child_load_for_training() -> int:
    c = _context()
    line = _line() + 1
    load_for_training(_llama(Path(c["base"])), "org/adapter", cache_dir=c["cache"])
    return line


def child_load_adapter() -> int:
    c = _context()
    model = load_for_inference(_llama(Path(c["base"])), c["trained"])
    line = _line() + 1
    load_adapter(model, "org/adapter", adapter_name="hub", cache_dir=c["cache"])
    return line


def child_auto_for_inference() -> int:
    c = _context()
    line = _line() + 1
    auto.for_inference("org/adapter", base_model=c["base"], cache_dir=c["cache"])
    return line


def child_auto_for_training() -> int:
    c = _context()
    line = _line() + 1
    auto.for_training("org/adapter", base_model=c["base"], cache_dir=c["cache"])
    return line


@pytest.mark.slow
@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_a_warning_from_code_without_a_file_is_a_warning(how: str) -> None:
    """``python -c`` and a script on stdin: ``__main__`` has no source file (its loader is
    BuiltinImporter); the warning is shown at ``<string>`` / ``<stdin>``, never an ImportError."""
    import subprocess

    code = "from safe_lora.errors import SafeLoraWarning, warn\nwarn('the message', SafeLoraWarning)\n"
    argv = (
        [sys.executable, "-W", "always", "-c", code] if how == "-c" else [sys.executable, "-W", "always", "-"]
    )
    run = subprocess.run(
        argv, input=None if how == "-c" else code, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    where = "<string>" if how == "-c" else "<stdin>"
    assert f"{where}:2: SafeLoraWarning: the message" in run.stderr
