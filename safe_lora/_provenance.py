"""What is loaded, and from which bytes: the record each load leaves, and the receipt built from it.

Every load (:func:`safe_lora.load_for_inference`, :func:`~safe_lora.load_for_training`,
:func:`~safe_lora.load_adapter`, ``replace=True``, :mod:`safe_lora.auto`) records, per adapter, where
its files came from (the folder, or the hub repo, revision and commit) and the sha256 of each file
read -- the digests of the very bytes that were parsed, not of the files as they are on disk later.
:func:`receipt` turns that, and what the model holds now, into a JSON-ready dict serving code can log.

What a receipt does and does not say:

- It states what safe_lora *loaded*. Weights changed afterwards (training steps, raw PEFT calls such
  as ``hotswap_adapter``, ``param.data.copy_``) are not hashed again; ``modes.trainable_parameters``
  says whether anything could have been trained.
- An adapter PEFT holds that safe_lora did not load -- loaded by PEFT itself, or deleted and loaded
  again under a recorded name -- has ``"source": null`` and no file digests.
- ``merge=True`` returns the base model with the active adapter merged into its weights. The record
  survives on that returned model: its receipt lists the adapter under ``merged`` (its source and
  digests, and the layer facts as they were just before the merge), and ``adapters`` is empty -- no
  adapter is loaded any more. The other adapters of a mapping are not in the merged weights and are
  not listed. A merged model later used as the base of another load keeps that entry, next to the new
  adapters (a name may then appear in both). A model merged by calling PEFT's ``merge_and_unload``
  directly has no record.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from torch import nn

from safe_lora._checks import AdapterOnDisk
from safe_lora._peft import BaseTunerLayer, peft_type_name
from safe_lora._unwrap import base_of, unwrap
from safe_lora._version import __version__

__all__ = ["RECEIPT_FORMAT", "AdapterRecord", "receipt", "record", "record_merged", "records", "summarise"]

#: The receipt's ``"format"`` field; changes when a field changes meaning or goes away.
RECEIPT_FORMAT = "safe_lora.receipt/1"

# The libraries whose versions decide what a load computes.
_LIBRARIES = ("peft", "torch", "transformers", "huggingface_hub", "safetensors")
# Module names listed in ``modes.training_modules.names`` only up to this many (else ``null``).
_FEW = 16


@dataclass(frozen=True)
class AdapterRecord:
    """Where one loaded adapter's bytes came from.

    Attributes:
        source: What the caller passed: a folder's path or a hub repo id.
        revision: The hub revision asked for (``"main"`` when none was); ``None`` for a local folder.
        commit: The hub commit the files came from; ``None`` for a local folder.
        subfolder: The adapter's folder inside the repo, if any.
        files: ``{file name: sha256}`` of every file read (config, weights, signature).
        config: The config loaded: the file's (or ``config=``), as written, before safe_lora prepared
            its copy for PEFT (dropout rates, patterns resolved).
        peft_config: The config object PEFT held for the adapter when it was recorded: an adapter
            since loaded again under the same name by other code holds another one, and is not this
            record's.
    """

    source: str
    revision: str | None
    commit: str | None
    subfolder: str | None
    files: dict[str, str] = field(default_factory=dict)
    config: PeftConfig | None = field(default=None, compare=False, repr=False)
    peft_config: PeftConfig | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class _Merged:
    """An adapter merged into a model's weights (``merge=True``): its record and what it was."""

    name: str
    record: AdapterRecord | None
    facts: dict[str, Any]


# Keyed weakly by the model: a model that goes away takes its records with it.
_RECORDS: weakref.WeakKeyDictionary[nn.Module, dict[str, AdapterRecord]] = weakref.WeakKeyDictionary()
_MERGED: weakref.WeakKeyDictionary[nn.Module, list[_Merged]] = weakref.WeakKeyDictionary()


def record(model: nn.Module, adapter_name: str, adapter: AdapterOnDisk) -> None:
    """Remember where ``adapter_name``'s bytes in ``model`` came from (replacing an earlier record)."""
    inner = unwrap(model)
    hub = adapter.source.hub
    configs = _configs(inner)
    entry = AdapterRecord(
        source=adapter.source.name,
        revision=hub.revision if hub is not None else None,
        commit=hub.commit if hub is not None else None,
        subfolder=hub.subfolder if hub is not None else None,
        files={name: file.sha256 for name, file in sorted(adapter.files.items())},
        config=adapter.config,
        peft_config=configs.get(adapter_name),
    )
    _RECORDS.setdefault(inner, {})[adapter_name] = entry


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """Every adapter's record in ``model``, by adapter name (empty for a model safe_lora did not load)."""
    return dict(_RECORDS.get(unwrap(model), {}))


def summarise(model: nn.Module, adapter_name: str) -> dict[str, Any]:
    """What ``model`` holds of ``adapter_name`` now: its config's facts, and the layers that carry it
    with the ranks and alphas PEFT resolved for them. Taken just before a merge
    (:func:`record_merged`), which removes the layers."""
    inner = unwrap(model)
    return {**_config_facts(_configs(inner).get(adapter_name)), **_layer_facts(inner, adapter_name)}


def record_merged(merged: nn.Module, peft_model: nn.Module, adapter_name: str, facts: dict[str, Any]) -> None:
    """Carry ``adapter_name``'s record from ``peft_model`` over to ``merged``, the model it was merged into.

    ``facts`` is :func:`summarise` of the adapter taken before the merge.
    """
    found = records(peft_model).get(adapter_name)
    _MERGED.setdefault(unwrap(merged), []).append(_Merged(adapter_name, found, facts))


def receipt(model: nn.Module) -> dict[str, Any]:
    """What ``model`` is: each adapter's source and file digests, the base, the versions, the modes.

    A JSON-ready dict (``json.dumps(receipt(model), sort_keys=True, allow_nan=False)`` works) for
    serving code to log next to its outputs: two loads of the same files into the same base, with the
    same library versions, give byte-identical JSON. Nothing is read from disk; nothing is changed.

    Fields:

    - ``format``: ``"safe_lora.receipt/1"``.
    - ``adapters``: by adapter name: ``source`` (the folder or hub repo id given; ``null`` for an
      adapter safe_lora did not load), ``revision``, ``commit`` and ``subfolder`` (hub loads),
      ``files`` (``{file name: sha256}`` of the bytes read), ``peft_type``, ``modules`` (layers that
      carry the adapter), ``r``, ``rank_pattern`` and ``ranks`` (every rank the layers hold), ``alpha``,
      ``alpha_pattern`` and ``alphas`` (likewise), ``target_modules``, ``modules_to_save`` and
      ``active``. The ranks and alphas are the config's as loaded (the file's, as written);
      ``ranks`` / ``alphas`` what PEFT resolved for the layers.
    - ``active_adapters``: the adapters that compute, in PEFT's order.
    - ``merged``: the adapters merged into the weights by ``merge=True``, in merge order: each
      adapter's fields as above (without ``active``) and its ``name``; the layer facts are those of
      just before the merge.
    - ``model``: the class of the object given (after unwrapping DDP / FSDP / ``torch.compile``).
    - ``base_model``: its ``class``, ``name_or_path`` and ``config_sha256`` (the sha256 of
      ``config.to_json_string()`` with sorted keys and no whitespace; ``null`` without a config).
    - ``versions``: safe_lora, peft, torch, transformers, huggingface_hub, safetensors (``null``: not
      installed).
    - ``modes``: ``training_modules`` (``count`` of modules in train mode, of ``total``, and their
      ``names`` when at most 16), ``trainable_parameters`` (elements with ``requires_grad``) and
      ``live_dropout`` (:func:`safe_lora.live_dropout`: ``name``, ``kind``, ``p``, ``adapter``).

    Args:
        model: A model from a safe_lora loader (also wrapped by DDP, FSDP, DeepSpeed or
            ``torch.compile``), a merged model from ``merge=True``, or any model -- PEFT's adapters
            that safe_lora did not load are listed with ``"source": null``.

    Returns:
        The receipt.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> model = load_for_inference(base, "org/adapter", expected_sha256=PINNED)  # doctest: +SKIP
        >>> logger.info("serving %s", json.dumps(receipt(model), sort_keys=True))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"receipt() takes a torch.nn.Module, found {type(model).__name__}.")
    inner = unwrap(model)
    base = base_of(inner)
    configs = _configs(inner)
    recorded = _RECORDS.get(inner, {})
    active = _active(inner, configs)
    merged: list[dict[str, Any]] = []
    for holder in dict.fromkeys((inner, base)):  # a merged model, or the merged base under a new load
        for item in _MERGED.get(holder, []):
            described = item.record.config if item.record is not None else None
            merged.append(
                {
                    "name": item.name,
                    **_provenance(item.record),
                    **item.facts,
                    **(_config_facts(described) if described is not None else {}),
                }
            )
    adapters: dict[str, Any] = {}
    for name in sorted(configs):
        entry = recorded.get(name)
        if entry is not None and entry.peft_config is not None and entry.peft_config is not configs[name]:
            entry = None  # the name was loaded again by other code since safe_lora recorded it
        described = entry.config if entry is not None and entry.config is not None else configs[name]
        adapters[name] = {
            **_provenance(entry),
            **_config_facts(described),
            **_layer_facts(inner, name),
            "active": name in active,
        }
    result = {
        "format": RECEIPT_FORMAT,
        "adapters": adapters,
        "active_adapters": [name for name in active if name in configs],
        "merged": merged,
        "model": _class_name(inner),
        "base_model": _base_facts(base),
        "versions": _versions(),
        "modes": _modes(model),
    }
    cleaned: dict[str, Any] = _jsonable(result)
    return cleaned


# --------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------


def _configs(inner: nn.Module) -> dict[str, PeftConfig]:
    """The adapters PEFT holds: a ``PeftModel``'s (or transformers' PEFT integration's) ``peft_config``."""
    held = getattr(inner, "peft_config", None)
    if not isinstance(held, Mapping):
        return {}
    return {str(name): config for name, config in held.items() if isinstance(config, PeftConfig)}


def _active(inner: nn.Module, configs: Mapping[str, PeftConfig]) -> list[str]:
    """The active adapters: the model's own answer, else what its tuner layers compute with."""
    if not configs:
        return []
    try:
        value: Any = getattr(inner, "active_adapters", None)
        if callable(value):  # transformers' integration: a method (which needs a newer PEFT than 0.21)
            value = value()
    except Exception:  # also PEFT's KeyError for a stale active name after the last adapter was deleted
        value = None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [str(name) for name in value]
    for module in inner.modules():
        if isinstance(module, BaseTunerLayer):
            return [str(name) for name in module.active_adapters]
    return []


def _provenance(entry: AdapterRecord | None) -> dict[str, Any]:
    if entry is None:
        return {"source": None, "revision": None, "commit": None, "subfolder": None, "files": {}}
    return {
        "source": entry.source,
        "revision": entry.revision,
        "commit": entry.commit,
        "subfolder": entry.subfolder,
        "files": dict(entry.files),
    }


def _config_facts(config: PeftConfig | None) -> dict[str, Any]:
    """The tuner and its settings as the config loaded says them (the file's, or ``config=``)."""
    targets = getattr(config, "target_modules", None)
    saved = getattr(config, "modules_to_save", None)
    alpha = getattr(config, "lora_alpha", getattr(config, "alpha", None))
    return {
        "peft_type": peft_type_name(config) if config is not None else None,
        "r": getattr(config, "r", None),
        "rank_pattern": dict(getattr(config, "rank_pattern", None) or {}),
        "alpha": alpha,
        "alpha_pattern": dict(getattr(config, "alpha_pattern", None) or {}),
        # PEFT turns a target list into a set: sorted, so that the receipt reads reproducibly.
        "target_modules": targets if targets is None or isinstance(targets, str) else sorted(targets),
        "modules_to_save": None if saved is None else sorted(saved),
    }


def _layer_facts(inner: nn.Module, name: str) -> dict[str, Any]:
    """The layers that carry adapter ``name``, and every rank and alpha PEFT resolved for them."""
    modules = 0
    ranks: set[Any] = set()
    alphas: set[Any] = set()
    for module in inner.modules():
        if not isinstance(module, BaseTunerLayer) or name not in _layer_adapters(module):
            continue
        modules += 1
        for attr, found in (("r", ranks), ("lora_alpha", alphas), ("alpha", alphas)):
            value = getattr(module, attr, None)
            if isinstance(value, Mapping) and name in value and _scalar(value[name]):
                found.add(value[name])
    return {"modules": modules, "ranks": sorted(ranks), "alphas": sorted(alphas)}


def _layer_adapters(layer: BaseTunerLayer) -> set[str]:
    """The adapter names a tuner layer holds tensors or settings for."""
    names: set[str] = set()
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        value: Any = getattr(layer, attr, None)
        if isinstance(value, Mapping) or hasattr(value, "keys"):
            names.update(map(str, value.keys()))
    return names


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _base_facts(base: nn.Module) -> dict[str, Any]:
    config = getattr(base, "config", None)
    name = getattr(base, "name_or_path", None)
    if not isinstance(name, str):
        name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    digest = None
    to_json = getattr(config, "to_json_string", None)
    if callable(to_json):
        canonical = json.dumps(
            json.loads(to_json()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return {
        "class": _class_name(base),
        "name_or_path": name if isinstance(name, str) and name else None,
        "config_sha256": digest,
    }


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"safe_lora": __version__}
    for library in _LIBRARIES:
        try:
            found[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            found[library] = None
    return found


def _modes(model: nn.Module) -> dict[str, Any]:
    from safe_lora import live_dropout

    inner = unwrap(model)
    named = list(inner.named_modules())
    training = [name for name, module in named if module.training]
    return {
        "training_modules": {
            "count": len(training),
            "total": len(named),
            "names": training if len(training) <= _FEW else None,
        },
        "trainable_parameters": sum(p.numel() for p in inner.parameters() if p.requires_grad),
        "live_dropout": [
            {"name": site.name, "kind": site.kind, "p": site.p, "adapter": site.adapter}
            for site in live_dropout(model)
        ],
    }


def _jsonable(value: Any) -> Any:
    """``value`` with only JSON types: tuples and sets as lists, enums by value, non-finite floats as
    strings (``"nan"``), other objects by ``str`` -- so ``json.dumps(allow_nan=False)`` never fails."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=repr)
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    return str(value)
