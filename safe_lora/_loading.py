"""The load functions: resolve -> config copy -> read and check the file -> inject -> load -> prove
the fit -> set mode.

What can be checked on disk (folder, config, pickle, safetensors header, NaN/inf) is checked for
every adapter before the caller's model is touched. The rest (targets that match nothing, keys
and shapes against the injected adapter, mergeability) runs under a snapshot of the module tree,
taken by reference, so that any failure -- ours, PEFT's, or a KeyboardInterrupt -- leaves the
caller's model exactly as it was, without a second copy of any weights.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from torch import nn

from safe_lora._config import (
    HUB_KWARGS,
    AdapterFiles,
    find_files,
    prepared_copy,
    read_config,
    resolve_adapter,
)
from safe_lora._modes import ModeSnapshot
from safe_lora._validate import (
    HeaderEntry,
    check_dtypes,
    check_finite,
    check_mergeable,
    compare,
    expected_keys,
    iter_tensors,
    read_header,
    read_pickle,
    warn_if_noop,
)
from safe_lora.errors import (
    AdapterConfigError,
    AdapterExistsError,
    AdapterNotFoundError,
    BaseModelMismatchWarning,
    UnknownAdapterError,
    _fmt_keys,
)

AdapterSource = str | os.PathLike[str]
Adapters = AdapterSource | Mapping[str, AdapterSource]


@dataclass
class _Plan:
    """One adapter, resolved and read from disk; nothing about the model yet."""

    name: str
    files: AdapterFiles
    weights: Path
    config: PeftConfig
    header: dict[str, HeaderEntry]
    # Read once for the NaN/inf check and handed to PEFT, so the file is not read twice.
    tensors: dict[str, torch.Tensor]


class _TreeSnapshot:
    """The state of every module and parameter, cheap to take (references only) and to restore.

    Restoring each module's ``__dict__`` brings back its children, parameters, buffers, hooks,
    ``training`` flag and attributes, which undoes any injection PEFT did; parameter tensors are
    the same objects, so their values never needed copying.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(m, {k: _shallow(v) for k, v in vars(m).items()}) for m in model.modules()]
        self._grads = [(p, p.requires_grad) for p in model.parameters()]

    def tensors_replaced(self) -> bool:
        """Whether any parameter or buffer of a captured module is now a different tensor object.

        Loading assigns each tensor it consumes, so this is how a file key that landed in a base
        (or another adapter's) weight shows, at the cost of a glance at each module's dicts.
        """
        for module, saved in self._modules:
            for slot in ("_parameters", "_buffers"):
                now: dict[str, Any] = module.__dict__.get(slot, {})
                for key, tensor in saved.get(slot, {}).items():
                    if now.get(key) is not tensor:
                        return True
        return False

    def restore(self) -> None:
        for module, saved in self._modules:
            module.__dict__.clear()
            module.__dict__.update({k: _shallow(v) for k, v in saved.items()})
        for param, requires_grad in self._grads:
            param.requires_grad_(requires_grad)


def _shallow(value: Any) -> Any:
    # .copy() keeps the type (OrderedDict for hooks) and is far cheaper than copy.copy here:
    # this runs for every attribute of every module on each load.
    return value.copy() if isinstance(value, (dict, set, list)) else value


@contextmanager
def _rollback_on_error(model: nn.Module) -> Iterator[_TreeSnapshot]:
    snapshot = _TreeSnapshot(model)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise


def _name_or_path(model: nn.Module) -> str:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", "")
    return str(name or "")


def _plan(
    model: nn.Module,
    source: AdapterSource,
    *,
    name: str,
    training: bool,
    dropout: float | None,
    allow_pickle: bool,
    config: PeftConfig | None,
    hub_kwargs: dict[str, Any],
) -> _Plan:
    """Everything that can be checked on disk: folder, config, weights file and its header."""
    folder = resolve_adapter(source, **hub_kwargs)
    files = find_files(folder, allow_pickle=allow_pickle)
    if config is not None and not isinstance(config, PeftConfig):
        raise TypeError(f"config= must be a peft.PeftConfig, found {type(config).__name__}.")
    saved = config if config is not None else read_config(folder)
    prepared = prepared_copy(saved, dropout=dropout, inference_mode=not training)
    if training and prepared.is_prompt_learning:
        raise AdapterConfigError(
            f"Cannot load a {_peft_type(prepared)} adapter for training: PEFT can only load "
            f"prompt-learning adapters frozen — use load_for_inference, or train a fresh adapter "
            f"with get_peft_model.",
            path=folder,
        )
    if files.weights is None:
        raise AdapterNotFoundError(
            f"Adapter weights not found in {os.fspath(folder)!r}: expected adapter_model.safetensors — "
            f"re-save the adapter with save_pretrained.",
            path=folder / "adapter_model.safetensors",
        )
    if files.weights_format == "safetensors":
        header = read_header(files.weights)
        tensors = dict(iter_tensors(files.weights))
    else:  # the caller opted in to pickle; weights_only still refuses arbitrary objects
        tensors = read_pickle(files.weights)
        header = {k: HeaderEntry(str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    check_finite(files.weights, tensors.items())
    # Bad-input checks (see _validate): dtypes the adapter cannot hold; an adapter that changes nothing.
    check_dtypes(files.weights, prepared, header)
    warn_if_noop(prepared, tensors, name=name, path=files.folder)

    trained_on = getattr(prepared, "base_model_name_or_path", None) or ""
    loading_into = _name_or_path(model)
    if trained_on and loading_into and trained_on != loading_into:
        warnings.warn(
            f"Adapter {name!r} was trained on {trained_on!r} but is loaded into {loading_into!r} — "
            f"keys and shapes are checked, but the outputs may be meaningless if the weights differ — "
            f"load the base model the adapter was trained on.",
            BaseModelMismatchWarning,
            stacklevel=4,
        )
    return _Plan(
        name=name, files=files, weights=files.weights, config=prepared, header=header, tensors=tensors
    )


def _peft_type(config: PeftConfig) -> str:
    raw = getattr(config, "peft_type", "unknown")
    return str(getattr(raw, "value", raw))


def _attach(
    target: nn.Module,
    plan: _Plan,
    *,
    training: bool,
    strict: bool,
    rest: dict[str, Any],
    snapshot: _TreeSnapshot,
) -> PeftModel:
    """Inject ``plan``'s adapter into ``target``, load it, and prove the file fit exactly.

    ``target`` is a base model (a ``PeftModel`` is built around it) or a ``PeftModel`` (the adapter
    is added). The caller holds the rollback (``snapshot``): whatever raises here is undone there.
    """
    kwargs = dict(rest)
    # With every key present, PEFT can create the adapter tensors empty and assign the loaded ones
    # instead of random-initialising weights it would overwrite. With strict=False missing keys
    # keep their initial values, so they must be real.
    kwargs.setdefault("low_cpu_mem_usage", strict)
    config = copy.deepcopy(plan.config)  # PEFT adjusts the config it injects with
    try:
        with warnings.catch_warnings():
            # Raised as typed errors below, or irrelevant to the caller (PEFT's notes on targets).
            warnings.simplefilter("ignore")
            if isinstance(target, PeftModel):
                peft_model = target
                peft_model.add_adapter(plan.name, config, low_cpu_mem_usage=kwargs["low_cpu_mem_usage"])
            else:
                peft_model = _new_peft_model(target, config, plan.name, kwargs)
    except Exception as exc:  # PEFT raises ValueError/TypeError/KeyError/RuntimeError for bad configs
        base = target.get_base_model() if isinstance(target, PeftModel) else target
        raise AdapterConfigError(
            f"Adapter config does not fit this model in {os.fspath(plan.files.folder)!r}: {exc} — "
            f"expected a config PEFT can apply to {type(base).__name__} (target modules that exist in "
            f"it, valid field values) — check that this adapter was trained on this base model "
            f"architecture, or fix the config (e.g. 'target_modules').",
            path=plan.files.folder,
        ) from exc

    # The exact comparison (file keys and shapes vs. what the injected adapter holds) costs a walk
    # of PEFT's state-dict machinery, ~8% of a load. On the fast path -- strict, tensors assigned
    # -- PEFT's own load result plus a check that no existing tensor was replaced prove the same
    # thing for free, and the comparison runs only to name what went wrong.
    fast = strict and bool(kwargs["low_cpu_mem_usage"])
    missing: list[str] = []
    unexpected: list[str] = []
    if not fast:
        # Before any weight moves: a file key that fits nothing would otherwise land in a base
        # weight (PEFT loads e.g. "base_model.model.fc2.weight" into the base model silently).
        missing, unexpected = compare(
            plan.header, expected_keys(peft_model, plan.name), path=plan.weights, strict=strict
        )
    if training and target is peft_model:
        peft_model.set_requires_grad(plan.name)  # PeftModel(...) did this for the first adapter
    if not peft_model.peft_config[plan.name].is_prompt_learning:
        # What PeftModel.from_pretrained does for models whose state-dict keys were renamed.
        renamed = getattr(peft_model.get_base_model(), "_checkpoint_conversion_mapping", {})
        kwargs.setdefault("key_mapping", renamed)
    try:
        incomplete = _load_weights(peft_model, plan, training=training, kwargs=kwargs, skip=unexpected)
    except RuntimeError:
        if fast:  # PEFT refuses shapes that do not fit: name them as the file does (raises)
            compare(plan.header, expected_keys(peft_model, plan.name), path=plan.weights, strict=True)
        raise
    if fast and (incomplete or snapshot.tensors_replaced()):
        compare(plan.header, expected_keys(peft_model, plan.name), path=plan.weights, strict=True)
    if missing or unexpected:
        warnings.warn(
            f"Loaded adapter {plan.name!r} from {os.fspath(plan.files.folder)!r} with strict=False: "
            f"missing keys (left at their initial values): [{_fmt_keys(missing)}]; "
            f"unexpected keys (ignored): [{_fmt_keys(unexpected)}].",
            UserWarning,
            stacklevel=4,
        )
    return peft_model


# The keyword arguments the direct path below handles itself; any other (a device, GPU offload,
# mismatched sizes, ...) goes through PeftModel.load_adapter, which reads the file again.
_DIRECT_KWARGS = {"low_cpu_mem_usage", "autocast_adapter_dtype", "key_mapping"}


def _load_weights(
    peft_model: PeftModel, plan: _Plan, *, training: bool, kwargs: dict[str, Any], skip: list[str]
) -> bool:
    """Load ``plan.tensors`` into the injected adapter; True when PEFT reports keys that did not fit.

    The direct path hands the tensors already read (and checked) to PEFT's own
    ``set_peft_model_state_dict`` -- what ``load_adapter`` does after reading the file -- so the
    file is read once, and ``skip`` (keys found unexpected with strict=False) is really left out
    rather than loaded wherever PEFT would put it. Device maps, adaption prompts and extra
    options take ``load_adapter``.
    """
    config = peft_model.peft_config[plan.name]
    direct = (
        set(kwargs) <= _DIRECT_KWARGS
        and not kwargs.get("key_mapping")
        and not config.is_adaption_prompt
        and getattr(peft_model.get_base_model(), "hf_device_map", None) is None
    )
    with warnings.catch_warnings():
        # PEFT's "Found missing adapter keys" is reported by name by the caller, or refused.
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        if not direct:
            loaded = peft_model.load_adapter(
                os.fspath(plan.files.folder), plan.name, is_trainable=training, **kwargs
            )
            return bool(loaded.missing_keys or loaded.unexpected_keys)
        tensors = {k: v for k, v in plan.tensors.items() if k not in skip} if skip else plan.tensors
        result: Any = set_peft_model_state_dict(
            peft_model, tensors, adapter_name=plan.name, low_cpu_mem_usage=kwargs["low_cpu_mem_usage"]
        )
    tuner: Any = peft_model.base_model
    if hasattr(tuner, "_cast_adapter_dtype"):
        autocast = kwargs.get("autocast_adapter_dtype", True)
        tuner._cast_adapter_dtype(plan.name, autocast_adapter_dtype=autocast)
    # load_state_dict lists every base key as missing; only this adapter's keys matter. A false
    # alarm (e.g. a shared tensor) only costs the exact comparison the caller then runs.
    marker = f".{plan.name}."
    return bool(result.unexpected_keys) or any(marker in f".{k}." for k in result.missing_keys)


def _new_peft_model(model: nn.Module, config: PeftConfig, name: str, kwargs: dict[str, Any]) -> PeftModel:
    # The same class choice as PeftModel.from_pretrained, so task wrappers match.
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # type: ignore[arg-type]
    return cls(
        model,
        config,
        name,
        autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True),
        low_cpu_mem_usage=kwargs["low_cpu_mem_usage"],
    )


def _split_kwargs(peft_kwargs: dict[str, Any]) -> tuple[PeftConfig | None, dict[str, Any], dict[str, Any]]:
    """``(config, hub kwargs, the rest for PEFT)``; the caller's dict is not changed."""
    rest = dict(peft_kwargs)
    for forbidden in ("is_trainable", "model_id"):
        if forbidden in rest:
            raise TypeError(
                f"{forbidden}= is decided by safe_lora — use load_for_training or load_for_inference instead."
            )
    config = rest.pop("config", None)
    hub = {k: rest.pop(k) for k in HUB_KWARGS if k in rest}
    return config, hub, rest


def _normalise(adapter: Adapters, adapter_name: str) -> dict[str, AdapterSource]:
    if isinstance(adapter, Mapping):
        if not adapter:
            raise ValueError("No adapters given: expected a non-empty {name: path} mapping.")
        return dict(adapter)
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
    peft_kwargs: dict[str, Any],
) -> nn.Module:
    if isinstance(model, PeftModel):
        raise TypeError(
            "load_for_inference/load_for_training take the base model, found a PeftModel — "
            "to add an adapter to it, use safe_lora.load_adapter."
        )
    sources = _normalise(adapter, adapter_name)
    active = next(iter(sources)) if active is None else active
    if active not in sources:
        raise UnknownAdapterError(
            f"Unknown active adapter: expected one of {sorted(sources)}, found active={active!r} — "
            f"pass one of those names.",
            name=active,
            available=sources,
        )
    config, hub, rest = _split_kwargs(peft_kwargs)
    if config is not None and len(sources) > 1:
        raise TypeError("config= applies to a single adapter; pass one adapter path, not a mapping.")

    # Everything on disk is checked for every adapter before the first one touches the model.
    plans = [
        _plan(
            model,
            source,
            name=name,
            training=training,
            dropout=dropout,
            allow_pickle=allow_pickle,
            config=config,
            hub_kwargs=hub,
        )
        for name, source in sources.items()
    ]

    with _rollback_on_error(model) as snapshot:
        target: nn.Module = model
        for plan in plans:
            target = _attach(target, plan, training=training, strict=strict, rest=rest, snapshot=snapshot)
        assert isinstance(target, PeftModel)
        peft_model = target
        if active != peft_model.active_adapter:
            peft_model.set_adapter(active, inference_mode=not training)
        result: nn.Module = peft_model
        if merge:
            check_mergeable(peft_model, active)
            result = peft_model.merge_and_unload()
        _set_mode(result, training=training)
    return result


def _set_mode(model: nn.Module, *, training: bool) -> None:
    # Every module, not just the root: a base model in eval under a train-mode PeftModel is the
    # "mixed tree" this library exists to prevent.
    model.train(training)
    if not training:
        for param in model.parameters():
            if param.requires_grad:  # reading is cheap; the setter is not
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
    **peft_kwargs: Any,
) -> nn.Module:
    """Load a PEFT adapter for inference: deterministic, frozen, validated before anything changes.

    Args:
        model: The base model (e.g. from ``AutoModelForCausalLM.from_pretrained``).
        adapter: A folder written by ``save_pretrained``, a cached hub repo id, or a
            ``{name: folder}`` mapping to load several adapters onto one base.
        adapter_name: The name of a single adapter inside the ``PeftModel``.
        active: With a mapping, the adapter to activate (default: the first).
        dropout: The rate every dropout of the adapter's config is set to (on a copy); ``0.0``
            removes the dropout layers altogether, ``None`` keeps the saved rates.
        merge: Return the plain base model with the active adapter merged into its weights.
        strict: Refuse missing or unexpected adapter keys; ``False`` warns and loads what fits.
        allow_pickle: Allow ``adapter_model.bin`` (pickle) when there is no safetensors file.
        **peft_kwargs: Passed on to ``PeftModel.from_pretrained`` (``config=``, ``revision=``,
            ``subfolder=``, ``autocast_adapter_dtype=``, ...). A ``config`` object is copied, never
            modified.

    Returns:
        The ``PeftModel`` (or, with ``merge=True``, the merged base model) with every module in
        eval mode and every parameter ``requires_grad=False``.

    Raises:
        AdapterNotFoundError: The folder, its config or its weights do not exist.
        AdapterConfigError: The config is unreadable, of an unknown type, or targets nothing here.
        AdapterWeightsError: The weights are corrupt, non-finite, or do not fit the config and model.
        UnsafeAdapterError: Only pickle weights exist and ``allow_pickle`` is false.
        AdapterMergeError: ``merge=True`` for a tuner that cannot merge.

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
    **peft_kwargs: Any,
) -> PeftModel:
    """Load a PEFT adapter to continue training it: every module in train mode, adapter trainable.

    Args:
        model: The base model. It may come in eval mode (as ``from_pretrained`` returns it); every
            module of the result is in train mode all the same.
        adapter: A folder written by ``save_pretrained``, a cached hub repo id, or a
            ``{name: folder}`` mapping.
        adapter_name: The name of a single adapter inside the ``PeftModel``.
        active: With a mapping, the adapter to activate (default: the first).
        dropout: When not ``None``, the rate every dropout of the adapter's config is set to (on a copy).
        strict: Refuse missing or unexpected adapter keys; ``False`` warns and loads what fits.
        allow_pickle: Allow ``adapter_model.bin`` (pickle) when there is no safetensors file.
        **peft_kwargs: Passed on to ``PeftModel.from_pretrained``; a ``config`` object is copied.

    Returns:
        The ``PeftModel`` in train mode, the adapter's parameters ``requires_grad=True`` and the
        base model's frozen.

    Raises:
        AdapterNotFoundError, AdapterConfigError, AdapterWeightsError, UnsafeAdapterError: As for
            :func:`load_for_inference`; the model is left exactly as it was.

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
        peft_kwargs=peft_kwargs,
    )
    assert isinstance(result, PeftModel)
    return result


def load_adapter(
    model: PeftModel,
    adapter: AdapterSource,
    *,
    adapter_name: str,
    dropout: float | Literal["auto"] | None = "auto",
    strict: bool = True,
    allow_pickle: bool = False,
    **peft_kwargs: Any,
) -> PeftModel:
    """Load one more adapter into a model from :func:`load_for_inference` / :func:`load_for_training`.

    The same checks as single loading run first; then the adapter is added without disturbing
    anything else: every module's mode, the active adapter(s) and every existing parameter's
    ``requires_grad`` stay as they were (PEFT's own ``load_adapter`` switches the whole model to
    eval). In an inference model the new adapter gets zero dropout and no gradients; in a training
    model it is trainable, like the first one.

    Args:
        model: A ``PeftModel`` holding at least one adapter.
        adapter: A folder written by ``save_pretrained`` or a cached hub repo id.
        adapter_name: The new adapter's name; must not be taken.
        dropout: ``"auto"`` zeroes dropout in an inference model and keeps the saved rates in a
            training model; a float or ``None`` as for :func:`load_for_inference`.
        strict: Refuse missing or unexpected adapter keys.
        allow_pickle: Allow ``adapter_model.bin`` when there is no safetensors file.
        **peft_kwargs: Passed on to ``PeftModel.load_adapter``; a ``config`` object is copied.

    Returns:
        ``model``, with the adapter added (not activated: use :func:`use_adapter`).

    Raises:
        AdapterExistsError: ``adapter_name`` is already taken.
        AdapterNotFoundError, AdapterConfigError, AdapterWeightsError, UnsafeAdapterError: As for
            :func:`load_for_inference`; the model is left exactly as it was.

    Example:
        >>> model = load_for_inference(base, {"chat": "out/chat"})  # doctest: +SKIP
        >>> load_adapter(model, "out/sql", adapter_name="sql")  # doctest: +SKIP
        >>> with use_adapter(model, "sql"):  # doctest: +SKIP
        ...     model.generate(**batch)
    """
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"load_adapter adds to a PeftModel, found {type(model).__name__} — load the first adapter "
            f"with load_for_inference or load_for_training."
        )
    if adapter_name in model.peft_config:
        raise AdapterExistsError(
            f"Adapter name taken: the model already holds {sorted(model.peft_config)} — pass a new "
            f"adapter_name, or delete the old one with model.delete_adapter({adapter_name!r}).",
            name=adapter_name,
            available=model.peft_config,
        )
    training = not all(getattr(c, "inference_mode", False) for c in model.peft_config.values())
    if dropout == "auto":
        dropout = None if training else 0.0
    config, hub, rest = _split_kwargs(peft_kwargs)
    plan = _plan(
        model,
        adapter,
        name=adapter_name,
        training=training,
        dropout=dropout,
        allow_pickle=allow_pickle,
        config=config,
        hub_kwargs=hub,
    )
    active = list(model.active_adapters)
    modes = ModeSnapshot(model)
    with _rollback_on_error(model) as snapshot:
        _attach(model, plan, training=training, strict=strict, rest=rest, snapshot=snapshot)
        _activate(model, active)
        # New modules take the root's mode; everything that existed gets its own flag back.
        model.train(modes.flags[0][1])
        for name, param in model.named_parameters():
            if f".{adapter_name}." in f".{name}.":
                param.requires_grad_(training)
        modes.restore()
    return model


def _activate(model: PeftModel, names: list[str]) -> None:
    """Make exactly ``names`` active without PEFT's side effect of switching gradients on."""
    if len(names) == 1:
        model.set_adapter(names[0], inference_mode=True)
    else:
        tuner: Any = model.base_model
        tuner.set_adapter(names, inference_mode=True)
