"""Check an adapter's files against what a model expects, without a second copy of any weights.

The safetensors header is read without loading a tensor and compared with the keys and shapes
the injected (still empty) adapter expects; values are checked for NaN/inf once loaded. Whether
the model is the base the adapter was trained on is judged from evidence
(:func:`base_model_evidence`), not from names.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn

from safe_lora.errors import AdapterWeightsError, _fmt_keys

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the safetensors header describes it."""

    dtype: str
    shape: Shape


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open`` with every way a file can be unreadable turned into one typed error."""
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterWeightsError(
            f"Adapter weights unreadable: {os.fspath(path)!r} is not a valid safetensors file ({exc}) — "
            f"expected the file save_pretrained writes — re-save or re-download the adapter.",
            path=path,
        ) from exc


def read_header(path: Path) -> dict[str, HeaderEntry]:
    """Keys, dtypes and shapes of a safetensors file, from its header only (no tensor is read).

    Raises:
        AdapterWeightsError: The file is not readable safetensors (truncated, garbage header, ...).
    """
    with _opened(path) as handle:
        entries = {}
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            view = handle.get_slice(key)
            entries[key] = HeaderEntry(str(view.get_dtype()), tuple(view.get_shape()))
        return entries


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a safetensors file one at a time (memory-mapped, one tensor alive at once).

    Raises:
        AdapterWeightsError: The file is not readable safetensors.
    """
    with _opened(path) as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            yield key, handle.get_tensor(key)


def base_of(model: nn.Module) -> nn.Module:
    """The base model inside a ``PeftModel`` (or ``model`` itself).

    Unlike ``PeftModel.get_base_model`` this also works once the last adapter was deleted (PEFT
    then keeps a stale active adapter name, and ``get_base_model`` raises ``KeyError``).
    """
    if not isinstance(model, PeftModel):
        return model
    tuner: nn.Module = model.base_model
    if getattr(model, "_is_prompt_learning", False):
        return tuner
    inner = tuner._modules.get("model")
    return inner if inner is not None else tuner


def nonfinite_keys(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The keys whose floating-point tensors hold NaN or inf, sorted.

    A sum carries any NaN or inf through, so one sum per tensor and one check in all answer the
    usual "all finite" case (~10x cheaper than isfinite per tensor). A sum can also overflow on
    finite values; then the exact per-tensor scan decides, so the answer is always exact.
    """
    floats = [(k, t) for k, t in tensors if t.is_floating_point()]
    if not floats:
        return []
    sums = torch.stack([t.sum(dtype=torch.float64) for _, t in floats])
    if bool(torch.isfinite(sums.sum())):
        return []
    return sorted(k for k, t in floats if not bool(torch.isfinite(t).all()))


def check_finite(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise if any floating-point tensor holds NaN or inf.

    Raises:
        AdapterWeightsError: Naming the non-finite keys, sorted (``nonfinite_keys``).
    """
    bad = nonfinite_keys(tensors)
    if bad:
        raise AdapterWeightsError(
            f"Adapter weights hold NaN or inf in {os.fspath(path)!r}: {_fmt_keys(bad)} — expected "
            f"finite values — the adapter's training diverged; use an earlier checkpoint.",
            path=path,
            nonfinite_keys=bad,
        )


@dataclass
class Expected:
    """The adapter keys and shapes a model with the adapter injected holds, in saved form."""

    peft_model: PeftModel
    adapter_name: str
    shapes: dict[str, Shape]

    def optional(self) -> set[str]:
        """Keys PEFT also accepts when the adapter was saved with its embedding layers.

        Computed only when the file has keys beyond :attr:`shapes`: it walks the model again.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Could not identify embedding layer(s)": irrelevant
            state = get_peft_model_state_dict(
                self.peft_model, adapter_name=self.adapter_name, save_embedding_layers=True
            )
        return set(state) - set(self.shapes)


def expected_keys(peft_model: PeftModel, adapter_name: str) -> Expected:
    """What ``save_pretrained`` would write for ``adapter_name``: keys (adapter name removed) and shapes.

    Works on a model whose adapter weights are still empty (meta): only shapes are read.
    """
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return Expected(peft_model, adapter_name, {k: tuple(v.shape) for k, v in state.items()})


def compare(
    header: dict[str, HeaderEntry], expected: Expected, *, path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    """Compare the file's keys and shapes with what the model expects.

    Returns:
        ``(missing, unexpected)``, sorted — only non-empty when ``strict`` is false.

    Raises:
        AdapterWeightsError: A shape differs (always), or keys are missing/unexpected and ``strict``.
    """
    missing = sorted(set(expected.shapes) - set(header))
    unexpected = sorted(set(header) - set(expected.shapes))
    if unexpected:
        unexpected = sorted(set(unexpected) - expected.optional())
    mismatched = {
        key: (header[key].shape, shape)
        for key, shape in expected.shapes.items()
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
_SAVED_PREFIX = "base_model.model."
_LORA_FACTORS = ("lora_A", "lora_B")


def base_model_evidence(
    model: nn.Module,
    config: Any,
    header: Mapping[str, HeaderEntry],
    *,
    trained_on: str,
    loading_into: str,
) -> list[str]:
    """Evidence that ``model`` is not the base the adapter was trained on; empty when none disagrees.

    A different name alone is no evidence: ``"org/base"``, a local mirror of it and a copied folder
    are the same weights. So when ``trained_on`` (the adapter's ``base_model_name_or_path``) and
    ``loading_into`` (the model's name) differ, two things are compared instead:

    - the recorded base's own ``config.json`` -- read only from a local folder or the local
      Hugging Face cache, never the network -- against ``model.config``: ``model_type`` and the
      layer sizes and counts;
    - the shapes the adapter's LoRA factors imply against the modules they target: ``lora_A`` is
      ``(r, in_features)``, ``lora_B`` is ``(out_features, r)``, and their module must exist.

    When neither disagrees the difference is logged at debug level only.

    Args:
        model: The model the adapter is loaded into (a base model or a ``PeftModel``).
        config: The adapter's PEFT config.
        header: The weights file's keys and shapes (see :func:`read_header`).
        trained_on: The adapter's recorded base model name or path ("" when none).
        loading_into: The model's own name or path ("" when unknown).

    Returns:
        One line per disagreement, e.g. ``"model_type: the adapter's base is 'mistral', this model
        is 'llama'"``; empty when the names agree or unknown, or nothing else disagrees.

    Example:
        >>> base_model_evidence(llama, config, header, trained_on="org/mistral", loading_into="org/llama")
        ... # doctest: +SKIP
        ["model_type: the adapter's base is 'mistral', this model is 'llama'"]
    """
    if not trained_on or not loading_into or trained_on == loading_into:
        return []
    base = base_of(model)
    evidence = _config_evidence(base, trained_on, getattr(config, "revision", None))
    evidence += _shape_evidence(base, config, header)
    if not evidence:
        logger.debug(
            "Adapter trained on %r is loaded into %r: different names, but the recorded base's config "
            "(where readable locally) and the adapter's shapes agree with this model.",
            trained_on,
            loading_into,
        )
    return evidence


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
        raw = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
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


def _shape_evidence(base: nn.Module, config: Any, header: Mapping[str, HeaderEntry]) -> list[str]:
    # Factors whose shapes are not (r, in) / (out, r) of the target: LoRA on parameters (experts),
    # block-diagonal LoRA. Only plain ".weight" factors of Linear-like modules are read.
    if getattr(config, "target_parameters", None) or getattr(config, "use_bdlora", None):
        return []
    missing: set[str] = set()
    wrong: dict[str, str] = {}
    for key, entry in header.items():
        if not key.startswith(_SAVED_PREFIX) or len(entry.shape) != 2:
            continue
        parts = key[len(_SAVED_PREFIX) :].split(".")
        index = next((i for i, part in enumerate(parts) if part in _LORA_FACTORS), None)
        if index is None or parts[index + 1 :] != ["weight"]:
            continue
        path = ".".join(p for p in parts[:index] if p != "base_layer")
        try:
            module = base.get_submodule(path)
        except AttributeError:
            missing.add(path)
            continue
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
        more = f", ... ({len(shown) - 3} more)" if len(shown) > 3 else ""
        found_lines.append(f"LoRA shapes imply other layer sizes: {detail}{more}")
    return found_lines
