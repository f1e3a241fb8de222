"""The load functions: find -> read and check on disk -> inject on meta and check -> load -> set mode.

What can be checked on disk (the files, pinned digests and signatures, the config, the weights and
their values) is checked for every adapter before the caller's model is touched
(:func:`safe_lora._checks.read_adapter`). What needs the model -- the keys, shapes and dtypes PEFT
would create, learnt by injecting on the meta device -- is checked before anything is allocated
(:mod:`safe_lora._attach`), under a :class:`~safe_lora._rollback.Snapshot` that puts the model back
exactly as it was on any failure: ours, PEFT's, or a ``KeyboardInterrupt``.

Fidelity comes first: the injection and the load run PEFT's own code, so the model is bit-identical
to ``PeftModel.from_pretrained``'s. The only differences are the documented ones: the dropout rates
of the config copy, every module's mode, ``requires_grad``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from peft import PeftConfig, PeftModel
from torch import nn

from safe_lora._attach import AttachOptions, attach, prepare_for_model
from safe_lora._checks import AdapterOnDisk, DiskOptions, Finding, emit, raise_first, read_adapter
from safe_lora._config import prepared_copy, structural_overrides
from safe_lora._fit import evidence_findings
from safe_lora._merge import merge as merge_adapter
from safe_lora._meta import all_modules
from safe_lora._peft import BaseTunerLayer, peft_type_name
from safe_lora._provenance import record, record_merged, summarise
from safe_lora._rollback import Snapshot, rollback_on_error
from safe_lora._source import CONFIG_NAME, HUB_KWARGS, open_source
from safe_lora._unwrap import base_of, compiled, unwrap
from safe_lora.errors import AdapterExistsError, UnknownAdapterError

__all__ = ["load_for_inference", "load_for_training"]

AdapterPath = str | os.PathLike[str]
Adapters = AdapterPath | Mapping[str, AdapterPath]
Sha256 = str | Mapping[str, str]


# --------------------------------------------------------------------------------------------------
# PEFT's keyword arguments
# --------------------------------------------------------------------------------------------------

# Every keyword ``PeftModel.from_pretrained`` / ``load_adapter`` take (and the ``**kwargs`` they
# document), and where each goes. Anything else is refused by name: nothing is dropped silently.
_ATTACH_KWARGS = frozenset({"low_cpu_mem_usage", "autocast_adapter_dtype", "key_mapping", "torch_device"})
# Handed to PEFT's own ``load_adapter`` for device maps and offloading.
_DISPATCH_KWARGS = frozenset({"device_map", "max_memory", "offload_folder", "offload_dir", "offload_index"})
# Accepted because safe_lora already does what they ask: safetensors is the only format it reads
# unless ``allow_pickle=True``.
_NOOP_KWARGS = frozenset({"use_safetensors"})
_DECIDED_KWARGS = {
    "is_trainable": "use load_for_training or load_for_inference instead",
    "model_id": "pass the adapter as the second argument",
    "model": "pass the model as the first argument",
}
# Accepted only with the value that keeps safe_lora's guarantees.
_REFUSED_VALUES = {
    "ignore_mismatched_sizes": (
        False,
        "safe_lora refuses weights whose shapes do not fit (AdapterWeightsError names them); drop the option",
    ),
}


@dataclass
class _Options:
    """The caller's PEFT keyword arguments, sorted by where they go."""

    config: PeftConfig | None = None
    hub: dict[str, Any] = field(default_factory=dict)
    attach: AttachOptions = field(default_factory=AttachOptions)
    ephemeral_gpu_offload: bool | None = None


def _split_kwargs(peft_kwargs: dict[str, Any]) -> _Options:
    """Sort the caller's PEFT keyword arguments; the caller's dict is not changed.

    Raises:
        TypeError: A keyword safe_lora decides itself, or one PEFT does not take, naming it.
    """
    options = _Options()
    for key, value in peft_kwargs.items():
        if key in _DECIDED_KWARGS:
            raise TypeError(f"{key}= is decided by safe_lora — {_DECIDED_KWARGS[key]}.")
        if key == "config":
            if value is not None and not isinstance(value, PeftConfig):
                raise TypeError(f"config= must be a peft.PeftConfig, found {type(value).__name__}.")
            options.config = value
        elif key in HUB_KWARGS:
            options.hub[key] = value
        elif key in _ATTACH_KWARGS:
            if key == "torch_device" and value is not None:
                _check_device(value)
            if key == "key_mapping" and value is not None:
                _check_key_mapping(value)
            if value is not None:
                setattr(options.attach, key, dict(value) if key == "key_mapping" else value)
        elif key in _DISPATCH_KWARGS:
            if value is not None:
                options.attach.dispatch[key] = value
        elif key == "ephemeral_gpu_offload":
            options.ephemeral_gpu_offload = bool(value)
        elif key in _NOOP_KWARGS:
            continue
        elif key in _REFUSED_VALUES:
            allowed, why = _REFUSED_VALUES[key]
            if value != allowed:
                raise TypeError(f"{key}={value!r} is not supported: {why}.")
        else:
            known = sorted(
                {
                    "config",
                    "ephemeral_gpu_offload",
                    *HUB_KWARGS,
                    *_ATTACH_KWARGS,
                    *_DISPATCH_KWARGS,
                    *_NOOP_KWARGS,
                    *_REFUSED_VALUES,
                }
            )
            raise TypeError(
                f"Unexpected keyword argument {key}=: expected one of PeftModel.from_pretrained's "
                f"keywords {known} — remove it, or set it on a config object passed as config=."
            )
    return options


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def _check_key_mapping(value: object) -> None:
    """``key_mapping=`` as PEFT reads it: ``{regular expression: replacement}``, each pattern valid."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError(
            f"key_mapping= must be a dict of {{pattern: replacement}} strings, found {value!r} — pass e.g. "
            f"{{'^model.language_model': 'model'}}."
        )
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(
                f"key_mapping= holds an invalid regular expression {pattern!r}: {exc} — expected what "
                f"Python's re accepts (PEFT applies each with re.subn) — fix the pattern."
            ) from exc


def _check_device(value: Any) -> None:
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"torch_device={value!r} is not a device torch knows ({exc}) — expected e.g. 'cpu', 'cuda:0' or "
            f"'mps' — pass one of those, or drop torch_device=."
        ) from exc


def check_type(name: str, value: Any, expected: type | tuple[type, ...], spelled: str) -> None:
    """Raise ``TypeError`` naming the argument and the type it must have (``bool`` is no ``float``)."""
    if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
        ok = False
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise TypeError(f"{name}= must be {spelled}, found {type(value).__name__} {value!r:.80}.")


def check_dropout(dropout: Any) -> None:
    """``dropout`` must be ``None`` or a number in [0, 1)."""
    if dropout is None:
        return
    check_type("dropout", dropout, (float, int), "a float in [0, 1) or None")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1) or None, found {dropout!r} — pass e.g. dropout=0.0.")


def _check_model(model: Any, what: str) -> nn.Module:
    """The module to load into: a model (not a PeftModel), through ``torch.compile``'s wrapper.

    Raises:
        TypeError: Not an ``nn.Module``, a ``PeftModel``, or wrapped for parallel training.
        AdapterExistsError: The model already carries adapter layers from an earlier load.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the base model), found {type(model).__name__}.")
    inner = unwrap(model)
    if inner is not model and not compiled(model):
        raise TypeError(
            f"{what} takes the base model before it is wrapped for parallel training, found "
            f"{type(model).__name__} — DDP / FSDP / DeepSpeed register the parameters when they wrap a "
            f"model, so an adapter added inside would not be trained or synchronised: load the adapter "
            f"first, then wrap."
        )
    if isinstance(inner, PeftModel):
        raise TypeError(
            f"{what} takes the base model, found a PeftModel — to add an adapter to it, use "
            f"safe_lora.load_adapter."
        )
    held = getattr(inner, "peft_config", None)
    if isinstance(held, dict) or any(isinstance(m, BaseTunerLayer) for m in inner.modules()):
        names = sorted(held) if isinstance(held, dict) else []
        raise AdapterExistsError(
            f"Base model already carries adapter layers {names or ''}: {what} wraps the base in place, as "
            f"PEFT does, so an earlier load already changed it (and loading again would change the model "
            f"that load returned) — expected a base without adapters — add the adapter to the model the "
            f"earlier load returned with safe_lora.load_adapter, or pass a fresh base.",
            name="",
            available=names,
        )
    return inner


# --------------------------------------------------------------------------------------------------
# One adapter: checked on disk
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """One adapter, read and checked on disk; nothing about the model yet."""

    name: str
    adapter: AdapterOnDisk
    config: PeftConfig  # the prepared copy
    rates_after_load: dict[str, float]


def plan_adapter(
    adapter: AdapterPath | AdapterOnDisk,
    *,
    name: str,
    training: bool,
    dropout: float | None,
    strict: bool,
    allow_pickle: bool,
    options: _Options,
    expected_sha256: Sha256 | None,
    signed_by: Any,
    instead: str,
) -> _Plan:
    """Everything that can be checked on disk, for one adapter; raise the first refusal.

    ``adapter`` may be an :class:`~safe_lora._checks.AdapterOnDisk` already read and checked (as
    :mod:`safe_lora.auto` does before it loads the base): then nothing is read twice.
    """
    if not isinstance(adapter, AdapterOnDisk):
        source = open_source(adapter, **options.hub)
        adapter = read_adapter(
            source,
            DiskOptions(
                allow_pickle=allow_pickle,
                training=training,
                strict=strict,
                key_rules=False,  # the exact check against the model decides (safe_lora._fit)
                config=options.config,
                expected_sha256=expected_sha256,
                signed_by=signed_by,
                instead=instead,
                name=name,
            ),
        )
    raise_first(adapter.findings)
    emit(adapter.findings)
    for file in adapter.files.values():
        file.hash_in_background()  # for the receipt, while PEFT injects
    if not options.attach.dispatch:
        # Only PEFT's own device-map loading reads the file again (from a private copy of its bytes);
        # every other path loads the parsed tensors.
        adapter.release_weight_bytes()
    assert adapter.config is not None
    prepared = prepared_copy(adapter.config, dropout=dropout, inference_mode=not training)
    if options.ephemeral_gpu_offload is not None:
        runtime = getattr(prepared, "runtime_config", None)
        if runtime is None:
            if options.ephemeral_gpu_offload:
                raise TypeError(
                    f"ephemeral_gpu_offload=True is not supported by {peft_type_name(prepared)} adapters — "
                    f"PEFT would ignore it; remove it."
                )
        else:
            runtime.ephemeral_gpu_offload = options.ephemeral_gpu_offload
    return _Plan(name, adapter, prepared, structural_overrides(adapter.config, dropout))


def attach_plan(
    target: nn.Module, plan: _Plan, *, training: bool, strict: bool, options: _Options, snapshot: Any
) -> tuple[PeftModel, list[Finding]]:
    """Load one planned adapter into ``target`` (a base model or a ``PeftModel``) under ``snapshot``.

    Evidence that ``target`` is not the adapter's base is emitted at once, before the load is tried:
    it explains a refusal that follows.
    """
    emit(evidence_findings(base_of(target), plan.config, plan.adapter.header, name=plan.name))
    config = prepare_for_model(plan.config, target, where=plan.adapter.source.where(CONFIG_NAME))
    return attach(
        target,
        plan.adapter,
        config,
        name=plan.name,
        training=training,
        strict=strict,
        options=options.attach,
        snapshot=snapshot,
        rates_after_load=plan.rates_after_load,
    )


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _normalise(adapter: Any, adapter_name: str) -> dict[str, Any]:
    if isinstance(adapter, Mapping):
        if not adapter:
            raise ValueError("No adapters given: expected a non-empty {name: path} mapping.")
        for name in adapter:
            check_type("adapter (a mapping's key)", name, str, "an adapter name (str)")
        return dict(adapter)
    if not isinstance(adapter, (str, os.PathLike, AdapterOnDisk)):
        raise TypeError(
            f"adapter must be a folder path, a hub repo id or a {{name: path}} mapping, found "
            f"{type(adapter).__name__} — pass the folder save_pretrained wrote, e.g. 'out/my-adapter'."
        )
    return {adapter_name: adapter}


def _load(
    model: nn.Module,
    adapter: Adapters,
    *,
    adapter_name: str,
    active: str | None,
    training: bool,
    dropout: float | None,
    merge: bool,
    strict: bool,
    allow_pickle: bool,
    expected_sha256: Sha256 | None,
    signed_by: Any,
    peft_kwargs: dict[str, Any],
    instead: str = "load_for_inference",
) -> nn.Module:
    what = "load_for_training" if training else "load_for_inference"
    check_type("adapter_name", adapter_name, str, "a str")
    check_type("strict", strict, bool, "True or False")
    check_type("merge", merge, bool, "True or False")
    check_type("allow_pickle", allow_pickle, bool, "True or False")
    check_dropout(dropout)
    if active is not None:
        check_type("active", active, str, "an adapter name (str) or None")
    target = _check_model(model, what)
    sources = _normalise(adapter, adapter_name)
    active = next(iter(sources)) if active is None else active
    if active not in sources:
        raise UnknownAdapterError(
            f"Unknown active adapter: expected one of {sorted(sources)}, found active={active!r} — "
            f"pass one of those names.",
            name=active,
            available=sources,
        )
    options = _split_kwargs(peft_kwargs)
    if options.config is not None and len(sources) > 1:
        raise TypeError("config= applies to a single adapter; pass one adapter path, not a mapping.")
    if expected_sha256 is not None and len(sources) > 1 and not isinstance(expected_sha256, Mapping):
        raise TypeError(
            "expected_sha256= as one digest pins a single adapter's weights file; with a mapping of "
            "adapters, load them one by one, or pin each with load_adapter."
        )

    # Everything on disk is checked for every adapter before the first one touches the model.
    plans = [
        plan_adapter(
            source,
            name=name,
            training=training,
            dropout=dropout,
            strict=strict,
            allow_pickle=allow_pickle,
            options=options,
            expected_sha256=expected_sha256,
            signed_by=signed_by,
            instead=instead,
        )
        for name, source in sources.items()
    ]

    findings: list[Finding] = []
    with rollback_on_error(target) as outer:
        current: nn.Module = target
        for index, plan in enumerate(plans):
            # Each adapter's own snapshot: the model with the adapters before it (backups reach outer).
            snapshot = outer if index == 0 else Snapshot(current, outer=outer)
            current, found = attach_plan(
                current, plan, training=training, strict=strict, options=options, snapshot=snapshot
            )
            findings += found
        assert isinstance(current, PeftModel)
        peft_model = current
        if active != peft_model.active_adapter:
            peft_model.set_adapter(active, inference_mode=not training)
        result: nn.Module = peft_model
        if merge:
            merged_facts = summarise(peft_model, active)  # the layers are gone after the merge
            result = merge_adapter(peft_model, active)
        _set_mode(result, training=training)

    for plan in plans:
        record(peft_model, plan.name, plan.adapter)
    if merge:
        record_merged(result, peft_model, active, merged_facts)  # the receipt of the model returned
    emit(findings)
    return result


def _set_mode(model: nn.Module, *, training: bool) -> None:
    # Every module, not just the root: a base model in eval under a train-mode PeftModel is the
    # "mixed tree" this library exists to prevent.
    model.train(training)
    if not training:
        for module in all_modules(model):  # flat: parameters() nests a generator per level
            for param in module._parameters.values():
                if param is not None and param.requires_grad:  # reading is cheap; the setter is not
                    param.requires_grad_(False)


@overload
def load_for_inference(
    model: nn.Module,
    adapter: Adapters,
    *,
    adapter_name: str = ...,
    active: str | None = ...,
    dropout: float | None = ...,
    merge: Literal[False] = ...,
    strict: bool = ...,
    allow_pickle: bool = ...,
    expected_sha256: Sha256 | None = ...,
    signed_by: Any = ...,
    **peft_kwargs: Any,
) -> PeftModel: ...
@overload
def load_for_inference(
    model: nn.Module,
    adapter: Adapters,
    *,
    adapter_name: str = ...,
    active: str | None = ...,
    dropout: float | None = ...,
    merge: Literal[True],
    strict: bool = ...,
    allow_pickle: bool = ...,
    expected_sha256: Sha256 | None = ...,
    signed_by: Any = ...,
    **peft_kwargs: Any,
) -> nn.Module: ...
def load_for_inference(
    model: nn.Module,
    adapter: Adapters,
    *,
    adapter_name: str = "default",
    active: str | None = None,
    dropout: float | None = 0.0,
    merge: bool = False,
    strict: bool = True,
    allow_pickle: bool = False,
    expected_sha256: Sha256 | None = None,
    signed_by: Any = None,
    **peft_kwargs: Any,
) -> nn.Module:
    """Load a PEFT adapter for inference: deterministic, frozen, checked before anything changes.

    The model is bit-identical to ``PeftModel.from_pretrained(model, adapter).eval()`` (same PEFT
    code, same defaults), except for what is documented here: dropout rates, modes, gradients. Like
    PEFT, the base model is wrapped in place: pass a fresh base to each load.

    Args:
        model: The base model (e.g. from ``AutoModelForCausalLM.from_pretrained``); a
            ``torch.compile`` of one is loaded into the original module (compile after loading).
        adapter: A folder written by ``save_pretrained`` (or the path of a file in it), a hub repo id,
            or a ``{name: folder}`` mapping to load several adapters onto one base.
        adapter_name: The name of a single adapter inside the ``PeftModel``.
        active: With a mapping, the adapter to activate (default: the first).
        dropout: The rate every dropout of the adapter's config is set to (on a copy); ``0.0``
            removes the dropout layers altogether, ``None`` keeps the saved rates.
        merge: Return the plain base model with the active adapter merged into its weights
            (``merge_and_unload``), after every layer was shown to merge.
        strict: Refuse missing or unexpected adapter keys; ``False`` warns and loads what fits.
        allow_pickle: Allow ``adapter_model.bin`` (pickle) when there is no safetensors file.
        expected_sha256: Pin the bytes: the weights file's sha256 (hex, as ``sha256sum`` and the
            Hub's file page show it, in either case), or ``{file name: sha256}`` for any file read,
            the config included. Checked over the very bytes that are parsed; a pin on a file that is
            not read is refused, a malformed one (not 64 hex digits, an empty mapping) is a
            ``ValueError`` / ``TypeError`` before anything is read.
        signed_by: Require an OpenSSF model-signing signature (``model.sig`` beside the files) by this
            key: a path to a PEM public key, or a ``model_signing.verifying.Config``
            (``pip install 'safe-lora[signing]'``). The signature is read and verified first; every
            file read must be in its manifest with the sha256 of the bytes read.
        **peft_kwargs: ``PeftModel.from_pretrained``'s keywords (``config=``, ``revision=``,
            ``subfolder=``, ``token=``, ``autocast_adapter_dtype=``, ``low_cpu_mem_usage=``,
            ``key_mapping=``, ``torch_device=``, ...). A ``config`` object is copied, never modified.
            An unknown keyword raises ``TypeError``.

    Returns:
        The ``PeftModel`` (or, with ``merge=True``, the merged base model) with every module in
        eval mode and every parameter ``requires_grad=False``.

    Raises:
        TypeError: An argument of the wrong type, or a keyword PEFT does not take.
        AdapterNotFoundError: The folder, its config or its weights do not exist.
        AdapterConfigError: The config is unreadable, of an unknown type, or targets nothing here.
        AdapterWeightsError: The weights are corrupt, non-finite, or do not fit the config and model.
        AdapterIntegrityError: A file's sha256 is not the pinned one or the Hub's record, or the
            signature does not cover it.
        UnsafeAdapterError: Only pickle weights exist and ``allow_pickle`` is false.
        AdapterMergeError: ``merge=True`` for a tuner or layer that cannot merge.
        AdapterExistsError: The base already carries adapter layers from an earlier load.

    Example:
        >>> model = load_for_inference(base, "out/my-adapter")  # doctest: +SKIP
        >>> model(**batch).logits  # the same on every call  # doctest: +SKIP
    """
    return _load(
        model,
        adapter,
        adapter_name=adapter_name,
        active=active,
        training=False,
        dropout=dropout,
        merge=merge,
        strict=strict,
        allow_pickle=allow_pickle,
        expected_sha256=expected_sha256,
        signed_by=signed_by,
        peft_kwargs=peft_kwargs,
    )


def load_for_training(
    model: nn.Module,
    adapter: Adapters,
    *,
    adapter_name: str = "default",
    active: str | None = None,
    dropout: float | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    expected_sha256: Sha256 | None = None,
    signed_by: Any = None,
    **peft_kwargs: Any,
) -> PeftModel:
    """Load a PEFT adapter to continue training it: every module in train mode, adapter trainable.

    The tensors are bit-identical to ``PeftModel.from_pretrained(model, adapter, is_trainable=True)``'s.

    Args:
        model: The base model. It may come in eval mode (as ``from_pretrained`` returns it); every
            module of the result is in train mode all the same.
        adapter: A folder written by ``save_pretrained``, a hub repo id, or a ``{name: folder}``
            mapping.
        adapter_name: The name of a single adapter inside the ``PeftModel``.
        active: With a mapping, the adapter to activate (default: the first).
        dropout: When not ``None``, the rate every dropout of the adapter's config is set to (on a copy).
        strict: Refuse missing or unexpected adapter keys; ``False`` warns and loads what fits.
        allow_pickle: Allow ``adapter_model.bin`` (pickle) when there is no safetensors file.
        expected_sha256: As for :func:`load_for_inference`.
        signed_by: As for :func:`load_for_inference`.
        **peft_kwargs: ``PeftModel.from_pretrained``'s keywords; a ``config`` object is copied.

    Returns:
        The ``PeftModel`` in train mode, the adapter's parameters ``requires_grad=True`` and the
        base model's frozen.

    Raises:
        TypeError, AdapterNotFoundError, AdapterConfigError, AdapterWeightsError, AdapterIntegrityError,
            UnsafeAdapterError, AdapterExistsError: As for :func:`load_for_inference`; the model is left
            exactly as it was.

    Example:
        >>> model = load_for_training(base, "out/my-adapter")  # doctest: +SKIP
        >>> with deterministic_lora(model):  # validation with adapter dropout off  # doctest: +SKIP
        ...     val_loss = model(**val_batch).loss
    """
    result = _load(
        model,
        adapter,
        adapter_name=adapter_name,
        active=active,
        training=True,
        dropout=dropout,
        merge=False,
        strict=strict,
        allow_pickle=allow_pickle,
        expected_sha256=expected_sha256,
        signed_by=signed_by,
        peft_kwargs=peft_kwargs,
        instead="load_for_inference",
    )
    assert isinstance(result, PeftModel)
    return result
