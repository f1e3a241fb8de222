"""Checks of an adapter against the model it is loaded into, each yielding findings.

What PEFT would create for a config on a model -- every key, shape and dtype of the adapter's state
dict -- is learnt from PEFT itself, by injecting on the meta device (:mod:`safe_lora._attach`), and
compared here with what the weights file holds (:func:`fit_findings`). Whether the model is the base
the adapter was trained on is judged from evidence, not names (:func:`evidence_findings`).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from torch import nn

from safe_lora._checks import Finding
from safe_lora._meta import all_modules, modules_along, on_meta
from safe_lora._peft import (
    EMBEDDING_LAYER_NAMES,
    SAVED_PREFIX,
    BaseTunerLayer,
    legacy_tp_walk_skipped,
    other_adapters_hidden,
)
from safe_lora._readers import TensorInfo, dtype_name
from safe_lora.errors import AdapterWeightsError, BaseModelMismatchWarning, _fmt_keys

__all__ = ["Expected", "evidence_findings", "expected_state", "fit_findings"]

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass
class Expected:
    """The adapter state dict PEFT would save for one adapter on one model: what loading must fill.

    Attributes:
        shapes: ``{key: shape}`` as ``save_pretrained`` writes the keys (adapter name removed).
        floating: ``{key: whether the tensor is floating point}`` (index buffers are integers).
        optional: Keys PEFT also accepts: embedding layers saved whole (``save_embedding_layers``).
        deferred: Keys of tensors PEFT creates later, not on the meta device (MonteCLoRA's sampler):
            the file must hold them like the others; their shapes are checked when PEFT builds them.
    """

    shapes: dict[str, Shape]
    floating: dict[str, bool]
    optional: set[str] = field(default_factory=set)
    deferred: set[str] = field(default_factory=set)

    def known(self, key: str) -> bool:
        """Whether the file may hold ``key``: the adapter's, one PEFT saves along, or deferred."""
        return key in self.shapes or key in self.optional or key in self.deferred


def expected_state(peft_model: PeftModel, adapter_name: str, *, file_keys: set[str]) -> Expected:
    """What ``save_pretrained`` would write for ``adapter_name``, by PEFT's ``get_peft_model_state_dict``.

    Works on a model whose tensors are on the meta device: only shapes and dtypes are read. The keys
    PEFT also accepts (embedding layers saved whole) are asked for only when ``file_keys`` holds keys
    beyond the adapter's own: that walks the model a second time.
    """
    # on_meta for prompt learning: PEFT's get_prompt_embedding_to_save ends in `.cpu()`, which a meta
    # tensor cannot do. Every other tuner's path selects and renames entries of the model's state dict
    # (VB-LoRA's top-k is computed from them, on meta): no factory to redirect, and the mode would
    # cost a Python call for each of the ~1,000 `detach()`s of the state dict.
    # The other adapters hidden: what PEFT would drop first, at a cost that does not grow with them.
    prompt_learning = peft_model.peft_config[adapter_name].is_prompt_learning
    with (
        warnings.catch_warnings(),
        on_meta() if prompt_learning else nullcontext(),
        other_adapters_hidden(peft_model, adapter_name),
        legacy_tp_walk_skipped(peft_model, all_modules(peft_model)),
    ):
        warnings.simplefilter("ignore")  # "Could not identify embedding layer(s)": irrelevant here
        # The model's state dict passed in: built once for both calls below, and the same answer
        # (PEFT only adds a warning about unsharded LoRA factors when it builds the dict itself).
        model_state = peft_model.state_dict()
        state = get_peft_model_state_dict(
            peft_model, model_state, adapter_name=adapter_name, save_embedding_layers=False
        )
        expected = Expected(
            {k: tuple(v.shape) for k, v in state.items()},
            {k: v.is_floating_point() for k, v in state.items()},
        )
        if file_keys - set(expected.shapes):
            full = get_peft_model_state_dict(
                peft_model, model_state, adapter_name=adapter_name, save_embedding_layers=True
            )
            expected.optional = set(full) - set(expected.shapes)
    return expected


def fit_findings(
    header: Mapping[str, TensorInfo],
    expected: Expected,
    *,
    where: str,
    strict: bool,
    vocab_size: int | None = None,
    key_mapping: Mapping[str, str] | None = None,
    renamed_from: Mapping[str, str] | None = None,
) -> list[Finding]:
    """The file's keys, shapes and dtypes against what the model expects.

    Shapes that differ and float-vs-integer dtypes that differ are always errors; missing or
    unexpected keys are errors with ``strict`` and warnings without (the loader then loads what fits).

    Args:
        header: What the weights file says of each tensor (keys as saved).
        expected: What PEFT would create (:func:`expected_state`).
        where: The weights file, for messages.
        strict: Whether missing or unexpected keys refuse the load.
        vocab_size: The model's vocabulary size, to recognise embeddings resized during training.
        key_mapping: The caller's ``key_mapping=``, when one renamed the header's keys: keys that
            then fit nothing are the mapping's to fix, and the refusal says so.
        renamed_from: For each header key the mapping renamed, the file's own key.
    """
    missing = sorted((set(expected.shapes) | expected.deferred) - set(header))
    unexpected = sorted(k for k in header if not expected.known(k))
    mismatched = {
        key: (header[key].shape, shape)
        for key, shape in expected.shapes.items()
        if key in header and header[key].shape != shape
    }
    if mismatched:
        shown = sorted(mismatched.items())
        detail = "; ".join(f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in shown[:10])
        more = f"; and {len(shown) - 10} more" if len(shown) > 10 else ""
        advice = _resize_advice(mismatched, vocab_size) or (
            "load the adapter into the base model it was trained on"
        )
        error = AdapterWeightsError(
            f"Adapter weights have the wrong shape for this base model in {where!r}: {len(shown)} tensor(s) "
            f"— {advice} — expected the shapes the config's targets give on this model, found "
            f"{detail}{more}.",
            path=where,
            mismatched_keys=mismatched,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
        return [Finding.refusal("shape-mismatch", error, mismatched)]
    kinds = sorted(
        key
        for key, floating in expected.floating.items()
        if key in header and _is_float(header[key].dtype) != floating
    )
    if kinds:
        bad = {k: header[k].dtype for k in kinds}
        error = AdapterWeightsError(
            f"Adapter weights have the wrong dtype in {where!r}: "
            f"{_fmt_keys(f'{k} ({v})' for k, v in bad.items())} "
            f"— expected the floating-point (or, for index buffers, integer) tensors the adapter holds — the "
            f"file is corrupt or was written by another tool; re-save the adapter with save_pretrained.",
            path=where,
            wrong_dtypes=bad,
        )
        return [Finding.refusal("wrong-dtype", error, kinds)]
    if not (missing or unexpected):
        return []
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) the config's targets expect: {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) nothing consumes: {_fmt_keys(unexpected)}")
    if not strict:
        return [Finding("warning", "keys-partial", "; ".join(parts), tuple(missing + unexpected))]
    if key_mapping is not None:
        return [_mapping_refusal(key_mapping, renamed_from or {}, missing, unexpected, where=where)]
    error = AdapterWeightsError(
        f"Adapter weights do not match the config in {where!r}: {'; '.join(parts)} — a partial adapter "
        f"silently does less than it should — re-save the adapter, check that it belongs to this base "
        f"model, or pass strict=False to load what fits with a warning.",
        path=where,
        missing_keys=missing,
        unexpected_keys=unexpected,
    )
    code = "missing-keys" if missing else "unexpected-keys"
    return [Finding.refusal(code, error, missing + unexpected)]


def _mapping_refusal(
    key_mapping: Mapping[str, str],
    renamed_from: Mapping[str, str],
    missing: list[str],
    unexpected: list[str],
    *,
    where: str,
) -> Finding:
    """Keys that fit nothing once the caller's ``key_mapping=`` renamed them: named as the file has them."""
    unmapped = sorted(renamed_from.get(key, key) for key in unexpected)
    shown = _fmt_keys(f"{renamed_from[k]} -> {k}" if k in renamed_from else k for k in unexpected)
    wanted = f" (e.g. {missing[0]})" if missing else ""
    error = AdapterWeightsError(
        f"Adapter weights do not fit this model after key_mapping={dict(key_mapping)!r} in {where!r}: "
        f"{len(unexpected)} file key(s) name no tensor of the model once renamed: {shown} — expected "
        f"key_mapping to rename the file's keys onto the adapter's keys on this model{wanted} — fix "
        f"key_mapping=, or drop it if the adapter was saved from this model's architecture.",
        path=where,
        missing_keys=missing,
        unexpected_keys=unmapped,
    )
    return Finding.refusal("key-mapping", error, unmapped)


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF")) or dtype in {"C64", "complex128"}


def _resize_advice(mismatched: Mapping[str, tuple[Shape, Shape]], vocab_size: int | None) -> str | None:
    """When the only shapes that differ are vocabulary rows of embedding layers: resize first."""
    if vocab_size is None:
        return None
    sizes = set()
    for key, (found, wanted) in mismatched.items():
        modules = [p for p in key.split(".") if p != "base_layer"]
        if not any(p in EMBEDDING_LAYER_NAMES for p in modules) or len(found) != len(wanted):
            return None
        differ = [i for i, (a, b) in enumerate(zip(found, wanted, strict=True)) if a != b]
        if len(differ) != 1 or wanted[differ[0]] != vocab_size:
            return None
        sizes.add(found[differ[0]])
    if len(sizes) != 1:
        return None
    (size,) = sizes
    return (
        f"the adapter was trained with the embeddings resized to {size} tokens and this base has "
        f"{vocab_size}: resize the base's embeddings first (model.resize_token_embeddings({size})), then "
        f"load the adapter"
    )


# --------------------------------------------------------------------------------------------------
# Is this the base the adapter was trained on?
# --------------------------------------------------------------------------------------------------

# The parts of a transformers config that say which network a checkpoint is. Vocabulary size is
# left out on purpose: resizing the embeddings (added tokens) keeps the base the same.
_ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
_LORA_FACTORS = ("lora_A", "lora_B")


def model_name(model: nn.Module) -> str:
    """The model's own name or path (``name_or_path``, ``config._name_or_path``), or ``""``."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    return str(name or "")


def evidence_findings(
    base: nn.Module, config: Any, header: Mapping[str, TensorInfo], *, name: str
) -> list[Finding]:
    """A :class:`~safe_lora.errors.BaseModelMismatchWarning` finding when there is evidence that
    ``base`` is not the model the adapter was trained on.

    A different name alone is no evidence: ``"org/base"``, a local mirror of it and a copied folder
    are the same weights, and a model built from a config has no name at all. Two things are compared
    instead, whenever they can be read:

    - the recorded base's own ``config.json`` (the adapter config's ``base_model_name_or_path``) --
      read only from a local folder or the local Hugging Face cache, never the network -- against
      ``base.config``: ``model_type`` and the layer sizes and counts;
    - the shapes the adapter's LoRA factors imply against the modules they target: ``lora_A`` is
      ``(r, in_features)``, ``lora_B`` is ``(out_features, r)``, and their module must exist.

    Args:
        base: The base model (inside any ``PeftModel``).
        config: The adapter's PEFT config.
        header: What the weights file says of each tensor.
        name: The adapter's name inside the model, for the message.
    """
    trained_on = str(getattr(config, "base_model_name_or_path", None) or "")
    loading_into = model_name(base)
    if trained_on and trained_on == loading_into:
        return []
    evidence = _config_evidence(base, trained_on, getattr(config, "revision", None)) if trained_on else []
    evidence += _shape_evidence(base, config, header)
    if not evidence:
        if trained_on != loading_into:
            logger.debug(
                "Adapter trained on %r is loaded into %r: different names, but the recorded base's config "
                "(where readable locally) and the adapter's shapes agree with this model.",
                trained_on,
                loading_into,
            )
        return []
    into = (
        repr(loading_into) if loading_into else f"this {type(base).__name__} (built without a recorded name)"
    )
    trained = repr(trained_on) if trained_on else "another model"
    message = (
        f"Adapter {name!r} was trained on {trained}, which is not {into} it is loaded into: "
        f"{'; '.join(evidence)} — the outputs may be meaningless — load the base model the adapter was "
        f"trained on."
    )
    return [Finding("warning", "base-mismatch", message, warning=BaseModelMismatchWarning)]


def _recorded_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """The ``config.json`` of the base the adapter names, from a folder or the local HF cache only."""
    folder = Path(name)
    file: str | os.PathLike[str] | None = folder / "config.json" if folder.is_dir() else None
    if file is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a valid repo id either: nothing to read
            return None
        file = cached if isinstance(cached, str) else None
    if file is None:
        return None
    try:
        path = Path(file)
        if not path.is_file() or path.stat().st_size > 1 << 20:  # a model config is a few KiB
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def _config_evidence(base: nn.Module, trained_on: str, revision: str | None) -> list[str]:
    recorded = _recorded_config(trained_on, revision)
    ours = getattr(base, "config", None)
    if recorded is None or ours is None:
        return []
    found = []
    for name in _ARCHITECTURE_FIELDS:
        theirs, mine = recorded.get(name), getattr(ours, name, None)
        if theirs is not None and mine is not None and theirs != mine:
            found.append(f"{name}: the adapter's base is {theirs!r}, this model's is {mine!r}")
    return found


def _shape_evidence(base: nn.Module, config: Any, header: Mapping[str, TensorInfo]) -> list[str]:
    # Factors whose shapes are not (r, in) / (out, r) of the target: LoRA on parameters (experts),
    # block-diagonal LoRA. Only plain ".weight" factors of Linear-like modules are read.
    if getattr(config, "target_parameters", None) or getattr(config, "use_bdlora", None):
        return []
    missing: set[str] = set()
    wrong: dict[str, str] = {}
    found_at: dict[str, nn.Module] = {}  # lora_A and lora_B of one module: looked up once
    for key, entry in header.items():
        if not key.startswith(SAVED_PREFIX) or len(entry.shape) != 2:
            continue
        parts = key[len(SAVED_PREFIX) :].split(".")
        index = next((i for i, part in enumerate(parts) if part in _LORA_FACTORS), None)
        if index is None or parts[index + 1 :] != ["weight"]:
            continue
        path = ".".join(p for p in parts[:index] if p != "base_layer")
        module = found_at.get(path)
        if module is None:
            if path in missing:
                continue
            along = modules_along(base, path)
            if along is None:
                missing.add(path)
                continue
            module = found_at[path] = along[-1]
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if parts[index] == "lora_A":
            side, expected, found = "in_features", getattr(layer, "in_features", None), entry.shape[1]
        else:
            side, expected, found = "out_features", getattr(layer, "out_features", None), entry.shape[0]
        if isinstance(expected, int) and expected != found:
            wrong[f"{path}.{side}"] = f"{found} in the adapter, {expected} here"
    found_lines = []
    if missing:
        found_lines.append(
            f"the adapter holds LoRA weights for modules this model lacks: {_fmt_keys(missing)}"
        )
    if wrong:
        shown = sorted(wrong.items())
        detail = ", ".join(f"{k} ({v})" for k, v in shown[:3])
        more = f", and {len(shown) - 3} more" if len(shown) > 3 else ""
        found_lines.append(f"LoRA shapes imply other layer sizes: {detail}{more}")
    return found_lines


def tensor_dtype(tensor: torch.Tensor) -> str:
    """A tensor's dtype in the one spelling safe_lora uses (safetensors')."""
    return dtype_name(tensor.dtype)
