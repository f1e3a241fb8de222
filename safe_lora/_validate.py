"""Check an adapter against a base model *before* the base model is touched.

The check is a dry run: the injection PEFT would do is done on a meta-device skeleton of the
model (same module tree, no storage), which tells exactly which adapter keys and shapes this base
model expects. That is compared with the safetensors header, which is read without loading a
tensor. Nothing here holds a second copy of the weights.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from safe_lora.errors import AdapterConfigError, AdapterMergeError, AdapterWeightsError, _fmt_keys

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the safetensors header describes it."""

    dtype: str
    shape: Shape


def read_header(path: Path) -> dict[str, HeaderEntry]:
    """Keys, dtypes and shapes of a safetensors file, from its header only (no tensor is read).

    Raises:
        AdapterWeightsError: The file is not readable safetensors (truncated, garbage header, ...).
    """
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            entries = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                view = handle.get_slice(key)
                entries[key] = HeaderEntry(str(view.get_dtype()), tuple(view.get_shape()))
            return entries
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterWeightsError(
            f"Adapter weights unreadable: {os.fspath(path)!r} is not a valid safetensors file ({exc}) — "
            f"expected the file save_pretrained writes — re-save or re-download the adapter.",
            path=path,
        ) from exc


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a safetensors file one at a time (memory-mapped, one tensor alive at once)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterWeightsError(
            f"Adapter weights unreadable: {os.fspath(path)!r} could not be read ({exc}) — "
            f"re-save or re-download the adapter.",
            path=path,
        ) from exc


def nonfinite_keys(tensors: Iterator[tuple[str, torch.Tensor]]) -> list[str]:
    """The keys whose floating-point tensors hold NaN or inf, sorted."""
    bad = [k for k, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return sorted(bad)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device.

    Module types, names, attributes and tied weights are kept (the deepcopy memo maps each tensor
    to one meta twin), but no storage is allocated, so this costs a walk of the module tree.
    """
    memo: dict[int, Any] = {}
    for tensor in chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


@dataclass
class DryRun:
    """What the injection of one adapter into a given model expects."""

    expected: dict[str, Shape]
    # Keys PEFT also accepts when the adapter was saved with its embedding layers.
    optional: set[str] = field(default_factory=set)


def dry_run(
    model: nn.Module,
    config: PeftConfig,
    *,
    adapter_name: str,
    merge: bool = False,
    path: Path | None = None,
) -> DryRun:
    """Inject ``config`` into a meta skeleton of ``model`` and report the keys and shapes it expects.

    ``model`` may be a plain base model (a new :class:`PeftModel` is built around the skeleton) or
    a :class:`PeftModel` (the adapter is added next to the ones it holds).

    Raises:
        AdapterConfigError: PEFT refuses the config for this model (e.g. targets that match nothing).
        AdapterMergeError: ``merge`` is true and the tuner cannot merge into the base weights.
    """
    skeleton = meta_skeleton(model)
    config = copy.deepcopy(config)
    try:
        with warnings.catch_warnings():
            # The skeleton is throw-away; PEFT's warnings about it would only confuse the caller.
            warnings.simplefilter("ignore")
            if isinstance(skeleton, PeftModel):
                skeleton.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
                peft_model = skeleton
            else:
                peft_model = _new_peft_model(skeleton, config, adapter_name)
    except Exception as exc:  # PEFT raises ValueError/TypeError/KeyError/RuntimeError for bad configs
        where = f" in {os.fspath(path)!r}" if path is not None else ""
        raise AdapterConfigError(
            f"Adapter config does not fit this model{where}: {exc} — expected a config PEFT can apply "
            f"to {type(model).__name__} (target modules that exist in it, valid field values) — check "
            f"that this adapter was trained on this base model architecture, or fix the config "
            f"(e.g. 'target_modules').",
            path=path,
        ) from exc

    with warnings.catch_warnings():
        # "Could not identify embedding layer(s)" for non-transformers models: irrelevant here.
        warnings.simplefilter("ignore")
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        with_embeddings = get_peft_model_state_dict(
            peft_model, adapter_name=adapter_name, save_embedding_layers=True
        )
    expected = {k: tuple(v.shape) for k, v in state.items()}
    optional = set(with_embeddings) - set(expected)
    if merge:
        _check_mergeable(peft_model, adapter_name)
    return DryRun(expected, optional)


def _new_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str) -> PeftModel:
    # The same class choice as PeftModel.from_pretrained, so task wrappers match the real load.
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # type: ignore[arg-type]
    return cls(model, config, adapter_name, low_cpu_mem_usage=True)


def _check_mergeable(peft_model: PeftModel, adapter_name: str) -> None:
    raw_type = getattr(peft_model.peft_config[adapter_name], "peft_type", "unknown")
    peft_type = str(getattr(raw_type, "value", raw_type))
    tuner: Any = peft_model.base_model
    if not hasattr(tuner, "merge_and_unload"):
        raise AdapterMergeError(
            f"Cannot merge a {peft_type} adapter: the tuner has no merge_and_unload — expected a tuner "
            f"that adds weights to the base layers (LoRA, LoHa, LoKr, IA3, ...) — load it with "
            f"merge=False.",
            peft_type=peft_type,
        )
    try:
        # Merging on meta tensors runs every layer's merge code without any arithmetic, so an
        # unsupported layer type fails here and never half-way through merging the real weights.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.set_adapter(adapter_name)
            tuner.merge_and_unload()
    except Exception as exc:
        raise AdapterMergeError(
            f"Cannot merge this {peft_type} adapter into the base weights: {exc} — load it with "
            f"merge=False and serve it unmerged.",
            peft_type=peft_type,
        ) from exc


def compare(
    header: dict[str, HeaderEntry], plan: DryRun, *, path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    """Compare the file's keys and shapes with what the model expects.

    Returns:
        ``(missing, unexpected)``, sorted — only non-empty when ``strict`` is false.

    Raises:
        AdapterWeightsError: A shape differs (always), or keys are missing/unexpected and ``strict``.
    """
    missing = sorted(set(plan.expected) - set(header))
    unexpected = sorted(set(header) - set(plan.expected) - plan.optional)
    mismatched = {
        key: (header[key].shape, shape)
        for key, shape in plan.expected.items()
        if key in header and header[key].shape != shape
    }
    where = os.fspath(path)
    if mismatched:
        detail = "; ".join(
            f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in sorted(mismatched.items())
        )
        raise AdapterWeightsError(
            f"Adapter weights have the wrong shape for this base model in {where!r}: {detail} — "
            f"expected the shapes the config's targets give on this model — load the adapter into the "
            f"base model it was trained on.",
            path=path,
            mismatched_keys=mismatched,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) the config's targets expect: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) nothing consumes: {_fmt_keys(unexpected)}")
        raise AdapterWeightsError(
            f"Adapter weights do not match the config in {where!r}: {'; '.join(parts)} — a partial "
            f"adapter silently does less than it should — re-save the adapter, check that it belongs to "
            f"this base model, or pass strict=False to load what fits with a warning.",
            path=path,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    return missing, unexpected
