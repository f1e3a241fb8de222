"""The load functions: resolve -> config copy -> read and check the file -> inject -> load -> prove
the fit -> set mode.

What can be checked on disk (folder, config, pickle, safetensors header, NaN/inf) is checked for
every adapter before the caller's model is touched. The rest (targets that match nothing, keys
and shapes against the injected adapter, mergeability) runs under a :class:`Snapshot` of the model,
so that any failure -- ours, PEFT's, or a KeyboardInterrupt -- leaves the caller's model exactly as
it was.

Fidelity comes first: the injection and the load run PEFT's own code with PEFT's own defaults
(``low_cpu_mem_usage=False``: adapter tensors are created, initialised -- base-rewriting inits such
as PiSSA or KaSA included -- and the file's values copied in), so the model is bit-identical to
``PeftModel.from_pretrained``'s. The only differences are the documented ones: the dropout rates of
the config copy, every module's mode, ``requires_grad``.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from safe_lora._config import (
    HUB_KWARGS,
    STRUCTURAL_RATES,
    AdapterFiles,
    locate_adapter,
    peft_type_name,
    prepared_copy,
    rewrites_base,
    structural_overrides,
)
from safe_lora._merge import merge as merge_adapter
from safe_lora._rollback import Snapshot, holds_quantized, rollback_on_error
from safe_lora._validate import (
    Expected,
    HeaderEntry,
    base_model_evidence,
    base_of,
    check_dtypes,
    check_finite,
    compare,
    expected_keys,
    iter_tensors,
    read_header,
    read_pickle,
    warn_if_noop,
)
from safe_lora.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterWeightsError,
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
    # Rates set on the built modules after the load rather than in the config (STRUCTURAL_RATES).
    rates_after_load: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# PEFT's keyword arguments
# --------------------------------------------------------------------------------------------------

# Every keyword ``PeftModel.from_pretrained`` / ``load_adapter`` take (and the ``**kwargs`` they
# document), and where each goes. Anything else is refused by name: nothing is dropped silently.
# Handled by the direct load path (the file is read once):
_DIRECT_KWARGS = frozenset({"low_cpu_mem_usage", "autocast_adapter_dtype"})
# Set on the config copy, as PEFT does:
_CONFIG_KWARGS = frozenset({"ephemeral_gpu_offload"})
# Handed to PEFT's own ``load_adapter`` (device placement, offloading, renamed keys), which then
# reads the file itself:
_PEFT_LOAD_KWARGS = frozenset(
    {
        "key_mapping",
        "torch_device",
        "device_map",
        "max_memory",
        "offload_folder",
        "offload_dir",
        "offload_index",
    }
)
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
    direct: dict[str, Any] = field(default_factory=dict)
    peft_load: dict[str, Any] = field(default_factory=dict)
    ephemeral_gpu_offload: bool | None = None

    @property
    def low_cpu_mem_usage(self) -> bool:
        # PEFT's default: adapter tensors are created and initialised, then the file's values are
        # copied in. The assign path (True) rounds the file's fp32 values to a half-precision
        # base's dtype and defers some inits to the first forward, so it is taken only on request.
        return bool(self.direct.get("low_cpu_mem_usage", False))

    @property
    def autocast_adapter_dtype(self) -> bool:
        return bool(self.direct.get("autocast_adapter_dtype", True))


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
            options.config = value
        elif key in HUB_KWARGS:
            options.hub[key] = value
        elif key in _DIRECT_KWARGS:
            options.direct[key] = value
        elif key in _CONFIG_KWARGS:
            options.ephemeral_gpu_offload = bool(value)
        elif key in _PEFT_LOAD_KWARGS:
            if value is not None:
                options.peft_load[key] = value
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
                    *HUB_KWARGS,
                    *_DIRECT_KWARGS,
                    *_CONFIG_KWARGS,
                    *_PEFT_LOAD_KWARGS,
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
# On disk
# --------------------------------------------------------------------------------------------------


def _name_or_path(model: nn.Module) -> str:
    base = base_of(model)
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", "")
    return str(name or "")


def read_checked_weights(
    files: AdapterFiles, config: PeftConfig, *, training: bool, instead: str
) -> tuple[Path, dict[str, HeaderEntry], dict[str, torch.Tensor]]:
    """Read the weights file and check it as every load does before a model is touched.

    Args:
        files: Where the adapter is (:func:`~safe_lora._config.locate_adapter`).
        config: The adapter's config.
        training: Whether the load is for training (prompt-learning adapters cannot be).
        instead: The call to suggest for a prompt-learning adapter, e.g. ``"load_for_inference"``.

    Returns:
        ``(weights, header, tensors)``: the weights file, every key's dtype and shape, and the
        tensors themselves.

    Raises:
        AdapterConfigError: A prompt-learning adapter loaded for training.
        AdapterNotFoundError: No weights file.
        AdapterWeightsError: Unreadable, NaN/inf values, or dtypes the adapter cannot hold.
        UnsafeAdapterError: A pickle that ``weights_only`` refuses.
    """
    if training and config.is_prompt_learning:
        raise AdapterConfigError(
            f"Cannot load a {peft_type_name(config)} adapter for training: PEFT can only load "
            f"prompt-learning adapters frozen — use {instead}, or train a fresh adapter with "
            f"get_peft_model.",
            path=files.folder,
        )
    if files.weights is None:
        raise AdapterNotFoundError(
            f"Adapter weights not found in {os.fspath(files.folder)!r}: expected adapter_model.safetensors "
            f"— re-save the adapter with save_pretrained.",
            path=files.folder / "adapter_model.safetensors",
        )
    if files.weights_format == "safetensors":
        header = read_header(files.weights)
        tensors = dict(iter_tensors(files.weights))
    else:  # the caller opted in to pickle; weights_only still refuses arbitrary objects
        tensors = read_pickle(files.weights)
        header = {k: HeaderEntry(str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
    check_finite(files.weights, tensors.items())
    check_dtypes(files.weights, config, header)
    return files.weights, header, tensors


def _plan(
    model: nn.Module,
    source: AdapterSource,
    *,
    name: str,
    training: bool,
    dropout: float | None,
    allow_pickle: bool,
    options: _Options,
) -> _Plan:
    """Everything that can be checked on disk: folder, config, weights file and its header."""
    config = options.config
    if config is not None and not isinstance(config, PeftConfig):
        raise TypeError(f"config= must be a peft.PeftConfig, found {type(config).__name__}.")
    # A hub id is downloaded here: the config first (read and checked), then the weights file.
    files, saved = locate_adapter(source, allow_pickle=allow_pickle, config=config, **options.hub)
    folder = files.folder
    prepared = prepared_copy(saved, dropout=dropout, inference_mode=not training)
    rates_after_load = structural_overrides(saved, dropout)
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
    weights, header, tensors = read_checked_weights(
        files, prepared, training=training, instead="load_for_inference"
    )
    warn_if_noop(prepared, tensors, name=name, path=folder)

    trained_on = getattr(prepared, "base_model_name_or_path", None) or ""
    loading_into = _name_or_path(model)
    # Names alone prove nothing (a local mirror or a copied folder is the same base): warn only when
    # the recorded base's config or the adapter's shapes disagree with this model.
    evidence = base_model_evidence(model, prepared, header, trained_on=trained_on, loading_into=loading_into)
    if evidence:
        warnings.warn(
            f"Adapter {name!r} was trained on {trained_on!r}, which is not the {loading_into!r} it is "
            f"loaded into: {'; '.join(evidence)} — the outputs may be meaningless — load the base model "
            f"the adapter was trained on.",
            BaseModelMismatchWarning,
            stacklevel=4,
        )
    return _Plan(
        name=name,
        files=files,
        weights=weights,
        config=prepared,
        header=header,
        tensors=tensors,
        rates_after_load=rates_after_load,
    )


# --------------------------------------------------------------------------------------------------
# What PEFT may write in place
# --------------------------------------------------------------------------------------------------


def _targets(model: nn.Module, config: PeftConfig) -> list[nn.Module]:
    """The modules PEFT will adapt for ``config``, by PEFT's own matching; every module if unsure."""
    inner = base_of(model)
    modules = [(k, m) for k, m in inner.named_modules() if k and not isinstance(m, BaseTunerLayer)]
    try:
        probe = _maybe_include_all_linear_layers(copy.deepcopy(config), inner)
        parameters = tuple(getattr(probe, "target_parameters", None) or ())
        if getattr(probe, "target_modules", None) is None and not parameters:
            return [m for _, m in modules]  # PEFT picks defaults per architecture: be generous
        return [
            module
            for key, module in modules
            if check_target_module_exists(probe, key)
            or any(f"{key}.{name}".endswith(parameters) for name in module._parameters)
        ]
    except Exception:  # an unusual config PEFT will judge itself: protect everything
        return [m for _, m in modules]


def _protect_in_place_targets(model: nn.Module, config: PeftConfig, snapshot: Snapshot) -> None:
    """Back up the values of the tensors the injection may write in place -- and only those.

    A plain LoRA on a float base writes no existing tensor, so nothing is copied. A base-rewriting
    init writes its targets' weights; quantized weights are rebuilt by several PEFT code paths.
    """
    rewrites = rewrites_base(config)
    if not (rewrites or snapshot.quantized):
        return  # the common load: nothing to copy, and no need to match targets
    for module in _targets(model, config):
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and (rewrites or holds_quantized(tensor)):
                snapshot.backup(tensor)


# --------------------------------------------------------------------------------------------------
# Injecting, loading and proving
# --------------------------------------------------------------------------------------------------


# PEFT warnings that safe_lora replaces by its own refusal or warning (never shown twice).
_OWN_WARNINGS = ("Found missing adapter keys",)


@contextmanager
def _peft_warnings() -> Iterator[Callable[[], None]]:
    """Record what PEFT warns while it works; the caller replays it once the load succeeded.

    A refused load raises one typed error instead of a trail of PEFT's warnings about a model
    that no longer exists; a successful one passes every warning on, unchanged. The caller's
    filters decide what is recorded, as they would decide what PEFT shows: forcing "always" here
    would also make Python read the source file of every warning PEFT (or transformers) raises
    into its line cache, megabytes that stay.
    """
    with warnings.catch_warnings(record=True) as caught:
        recorded: list[warnings.WarningMessage] = caught

        def replay() -> None:
            for w in recorded:
                if not str(w.message).startswith(_OWN_WARNINGS):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)

        yield replay


class _Misfit(Exception):
    """A file key would land where it must not, or does not fit, before anything is written."""

    def __init__(self, landed: list[str], wrong_dtype: list[str], mismatched: list[str]) -> None:
        super().__init__("misfit")
        self.landed = landed
        self.wrong_dtype = wrong_dtype
        self.mismatched = mismatched


@dataclass
class _LoadReport:
    """What the guarded ``load_state_dict`` saw."""

    dropped: list[str] = field(default_factory=list)  # file keys left out (strict=False)
    loaded_ids: set[int] = field(default_factory=set)
    calls: int = 0


@contextmanager
def _guarded_load(
    peft_model: PeftModel,
    plan: _Plan,
    snapshot: Snapshot,
    *,
    refuse_stray: bool,
    expected: Callable[[], Expected],
) -> Iterator[_LoadReport]:
    """Check every key PEFT is about to load, before the first value moves.

    PEFT's ``set_peft_model_state_dict`` remaps the file's keys and calls ``load_state_dict`` on the
    ``PeftModel``; that call is intercepted for the duration of the load (on the instance only).
    A key may only land in a tensor this load created -- or in an existing one PEFT saves on
    purpose (a bias with ``bias="all"``, a resized embedding), whose values are backed up first.
    Anything else (a key that would overwrite a base weight, say) is refused, or left out with
    ``strict=False``; shapes and integer-vs-float dtypes must fit.
    """
    report = _LoadReport()
    file_key = {id(v): k for k, v in plan.tensors.items()}
    original = peft_model.load_state_dict
    optional: set[str] | None = None

    def load_state_dict(state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        nonlocal optional
        report.calls += 1
        keep: dict[str, Any] = {}
        landed, wrong_dtype, mismatched = [], [], []
        for key, value in state_dict.items():
            tensor, new = snapshot.resolve(peft_model, key)
            name = file_key.get(id(value), key)
            if tensor is None:
                keep[key] = value  # nothing there: PEFT's result reports it as unexpected
                continue
            if not new:
                if optional is None:
                    full = expected()
                    optional = set(full.shapes) | full.optional()
                if name not in optional:
                    landed.append(name)
                    continue
                snapshot.backup(tensor)
            elif isinstance(value, torch.Tensor):
                if value.is_floating_point() != tensor.is_floating_point() and tensor.device.type != "meta":
                    wrong_dtype.append(name)
                    continue
                if tuple(value.shape) != tuple(tensor.shape):
                    mismatched.append(name)
                    continue
            keep[key] = value
            report.loaded_ids.add(id(tensor))
        if wrong_dtype or mismatched or (landed and refuse_stray):
            raise _Misfit(landed, wrong_dtype, mismatched)
        report.dropped.extend(landed)
        return original(keep, strict=strict, assign=assign)

    peft_model.__dict__["load_state_dict"] = load_state_dict  # an instance attribute shadows the method
    try:
        yield report
    finally:
        peft_model.__dict__.pop("load_state_dict", None)


def _attach(
    target: nn.Module,
    plan: _Plan,
    *,
    training: bool,
    strict: bool,
    options: _Options,
    snapshot: Snapshot,
) -> PeftModel:
    """Inject ``plan``'s adapter into ``target``, load it, and prove the file fit exactly.

    ``target`` is a base model (a ``PeftModel`` is built around it, as ``from_pretrained`` does) or
    a ``PeftModel`` (the adapter is added, as ``load_adapter`` does). The caller holds the rollback
    (``snapshot``): whatever raises here is undone there.
    """
    config = copy.deepcopy(plan.config)  # PEFT adjusts the config it injects with
    _protect_in_place_targets(target, config, snapshot)
    with _peft_warnings() as replay:
        peft_model = _inject(target, config, plan, training=training, options=options)

        def expected() -> Expected:
            return expected_keys(peft_model, plan.name)

        try:
            with _guarded_load(peft_model, plan, snapshot, refuse_stray=strict, expected=expected) as report:
                result = _load_weights(peft_model, plan, training=training, options=options)
        except _Misfit as misfit:
            _refuse(plan, expected(), misfit)
            raise AssertionError("unreachable") from misfit  # _refuse always raises
        except (RuntimeError, KeyError) as exc:
            # PEFT could not place a file key (a modules_to_save weight missing from the file, a
            # shape torch refuses): name the keys as the file does, or pass PEFT's error on.
            compare(plan.header, expected(), path=plan.weights, strict=True)
            raise AdapterWeightsError(
                f"Adapter weights could not be loaded from {os.fspath(plan.weights)!r}: "
                f"{type(exc).__name__}: {exc} — re-save the adapter with save_pretrained, or load it "
                f"into the base model it was trained on.",
                path=plan.weights,
            ) from exc

        missing, unexpected = _verdict(peft_model, plan, result, report, snapshot, strict=strict)
        if options.low_cpu_mem_usage:
            _refuse_meta(peft_model, plan)
    _set_rates_after_load(peft_model, plan)
    replay()
    if missing or unexpected:
        warnings.warn(
            f"Loaded adapter {plan.name!r} from {os.fspath(plan.files.folder)!r} with strict=False: "
            f"missing keys (left at their initial values): [{_fmt_keys(missing)}]; "
            f"unexpected keys (ignored): [{_fmt_keys(unexpected)}].",
            UserWarning,
            stacklevel=4,
        )
    return peft_model


def _refuse_meta(peft_model: PeftModel, plan: _Plan) -> None:
    """With ``low_cpu_mem_usage=True`` PEFT creates tensors on the meta device and some code paths
    never give them storage (layer replication, 8-bit DoRA, X-LoRA's classifier): such a model
    loads "fine" and fails at its first forward. Refuse it instead."""
    left = sorted(
        name
        for name, tensor in (*peft_model.named_parameters(), *peft_model.named_buffers())
        if tensor.device.type == "meta"
    )
    if left:
        raise AdapterConfigError(
            f"Adapter {plan.name!r} from {os.fspath(plan.files.folder)!r} did not load with "
            f"low_cpu_mem_usage=True: PEFT left {len(left)} tensor(s) on the meta device "
            f"({_fmt_keys(left)}) — expected every tensor to hold the file's or the base's values — "
            f"load it without low_cpu_mem_usage=True.",
            path=plan.files.folder,
        )


def _set_rates_after_load(peft_model: PeftModel, plan: _Plan) -> None:
    """Give the Dropout modules of a structural rate (X-LoRA's classifier) the rate asked for."""
    for field_name, rate in plan.rates_after_load.items():
        holder = getattr(peft_model.base_model, STRUCTURAL_RATES[field_name], None)
        if isinstance(holder, nn.Module):
            for module in holder.modules():
                if isinstance(module, nn.Dropout):
                    module.p = rate
        setattr(peft_model.peft_config[plan.name], field_name, rate)


def _inject(
    target: nn.Module, config: PeftConfig, plan: _Plan, *, training: bool, options: _Options
) -> PeftModel:
    """Build the ``PeftModel`` (or add the adapter) exactly as PEFT's loading entry points do."""
    try:
        if isinstance(target, PeftModel):
            target._check_new_adapter_config(config, is_trainable=training)
            target.add_adapter(
                plan.name,
                config,
                low_cpu_mem_usage=options.low_cpu_mem_usage,
                autocast_adapter_dtype=options.autocast_adapter_dtype,
            )
            if training:
                target.set_requires_grad(plan.name)
            return target
        # The same class choice as PeftModel.from_pretrained, so task wrappers match.
        from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

        cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # type: ignore[arg-type]
        peft_model: PeftModel = cls(
            target,
            config,
            plan.name,
            autocast_adapter_dtype=options.autocast_adapter_dtype,
            low_cpu_mem_usage=options.low_cpu_mem_usage,
        )
        return peft_model
    except Exception as exc:  # PEFT raises ValueError/TypeError/KeyError/RuntimeError for bad configs
        base = base_of(target)
        raise AdapterConfigError(
            f"Adapter config does not fit this model in {os.fspath(plan.files.folder)!r}: {exc} — "
            f"expected a config PEFT can apply to {type(base).__name__} (target modules that exist in "
            f"it, valid field values) — check that this adapter was trained on this base model "
            f"architecture, or fix the config (e.g. 'target_modules').",
            path=plan.files.folder,
        ) from exc


def _load_weights(peft_model: PeftModel, plan: _Plan, *, training: bool, options: _Options) -> Any:
    """Load ``plan.tensors`` into the injected adapter, as ``PeftModel.load_adapter`` does.

    The direct path hands the tensors already read (and checked) to PEFT's own
    ``set_peft_model_state_dict`` -- what ``load_adapter`` does after reading the file -- so the
    file is read once. Device maps, key mappings and device placement take ``load_adapter`` itself.
    """
    config = peft_model.peft_config[plan.name]
    tuner: Any = peft_model.base_model
    renamed = (
        {}
        if config.is_prompt_learning
        else getattr(base_of(peft_model), "_checkpoint_conversion_mapping", None) or {}
    )
    peft_load = dict(options.peft_load)
    if renamed and "key_mapping" not in peft_load:
        peft_load["key_mapping"] = renamed  # what PeftModel.from_pretrained does for renamed models
    if peft_load or getattr(base_of(peft_model), "hf_device_map", None) is not None:
        return peft_model.load_adapter(
            os.fspath(plan.files.folder), plan.name, is_trainable=training, **options.direct, **peft_load
        )
    context = tuner._temporarily_active(plan.name) if config.is_adaption_prompt else nullcontext()
    with context:
        result = set_peft_model_state_dict(
            peft_model,
            plan.tensors,
            adapter_name=plan.name,
            low_cpu_mem_usage=options.low_cpu_mem_usage,
        )
    if hasattr(tuner, "_cast_adapter_dtype"):
        tuner._cast_adapter_dtype(
            adapter_name=plan.name, autocast_adapter_dtype=options.autocast_adapter_dtype
        )
    return result


def _verdict(
    peft_model: PeftModel,
    plan: _Plan,
    result: Any,
    report: _LoadReport,
    snapshot: Snapshot,
    *,
    strict: bool,
) -> tuple[list[str], list[str]]:
    """Prove the file fit exactly; ``(missing, unexpected)`` to warn about with ``strict=False``.

    The cheap signals -- keys PEFT could not place, created tensors left unloaded, keys left out --
    are exact when silent; only when one speaks does the full comparison of the file against what
    ``save_pretrained`` would write run, to decide and to name the keys.
    """
    unloaded = False
    for key in getattr(result, "missing_keys", []):
        if f".{plan.name}." not in f".{key}.":
            continue  # PEFT keys every tensor of an adapter by its name; the rest is the base's
        tensor, new = snapshot.resolve(peft_model, key)
        if tensor is not None and new and id(tensor) not in report.loaded_ids:
            unloaded = True
            break
    if report.calls and not (unloaded or report.dropped or getattr(result, "unexpected_keys", [])):
        return [], []
    missing, unexpected = compare(
        plan.header, expected_keys(peft_model, plan.name), path=plan.weights, strict=strict
    )
    return missing, sorted(set(unexpected) | set(report.dropped))


def _refuse(plan: _Plan, expected: Expected, misfit: _Misfit) -> None:
    """Raise the typed error for a misfit the guard found (the file's own keys named)."""
    if misfit.wrong_dtype:
        keys = sorted(misfit.wrong_dtype)
        raise AdapterWeightsError(
            f"Adapter weights have the wrong dtype in {os.fspath(plan.weights)!r}: {_fmt_keys(keys)} hold "
            f"integer or bool values where the adapter's tensors are floating point — the file is "
            f"corrupt or was written by another tool; re-save the adapter with save_pretrained.",
            path=plan.weights,
            unexpected_keys=keys,
        )
    # Shapes and keys: the full comparison names them as the file does.
    compare(plan.header, expected, path=plan.weights, strict=True)
    keys = sorted(misfit.landed + misfit.mismatched)
    raise AdapterWeightsError(
        f"Adapter weights do not fit this model in {os.fspath(plan.weights)!r}: {_fmt_keys(keys)} would "
        f"overwrite tensors the adapter does not own — re-save the adapter with save_pretrained.",
        path=plan.weights,
        unexpected_keys=keys,
    )


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


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
    options = _split_kwargs(peft_kwargs)
    if options.config is not None and len(sources) > 1:
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
            options=options,
        )
        for name, source in sources.items()
    ]

    with rollback_on_error(model) as snapshot:
        target: nn.Module = model
        for plan in plans:
            target = _attach(
                target, plan, training=training, strict=strict, options=options, snapshot=snapshot
            )
        assert isinstance(target, PeftModel)
        peft_model = target
        if active != peft_model.active_adapter:
            peft_model.set_adapter(active, inference_mode=not training)
        result: nn.Module = peft_model
        if merge:
            with _peft_warnings() as replay:
                result = merge_adapter(peft_model, active)
            replay()
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

    The model is bit-identical to ``PeftModel.from_pretrained(model, adapter).eval()`` (same PEFT
    code, same defaults), except for what is documented here: dropout rates, modes, gradients.

    Args:
        model: The base model (e.g. from ``AutoModelForCausalLM.from_pretrained``).
        adapter: A folder written by ``save_pretrained``, a hub repo id, or a ``{name: folder}``
            mapping to load several adapters onto one base.
        adapter_name: The name of a single adapter inside the ``PeftModel``.
        active: With a mapping, the adapter to activate (default: the first).
        dropout: The rate every dropout of the adapter's config is set to (on a copy); ``0.0``
            removes the dropout layers altogether, ``None`` keeps the saved rates.
        merge: Return the plain base model with the active adapter merged into its weights
            (``merge_and_unload``), after every layer was shown to merge.
        strict: Refuse missing or unexpected adapter keys; ``False`` warns and loads what fits.
        allow_pickle: Allow ``adapter_model.bin`` (pickle) when there is no safetensors file.
        **peft_kwargs: ``PeftModel.from_pretrained``'s keywords (``config=``, ``revision=``,
            ``subfolder=``, ``autocast_adapter_dtype=``, ``low_cpu_mem_usage=``,
            ``ephemeral_gpu_offload=``, ``torch_device=``, ...). A ``config`` object is copied, never
            modified. An unknown keyword raises ``TypeError``.

    Returns:
        The ``PeftModel`` (or, with ``merge=True``, the merged base model) with every module in
        eval mode and every parameter ``requires_grad=False``.

    Raises:
        AdapterNotFoundError: The folder, its config or its weights do not exist.
        AdapterConfigError: The config is unreadable, of an unknown type, or targets nothing here.
        AdapterWeightsError: The weights are corrupt, non-finite, or do not fit the config and model.
        UnsafeAdapterError: Only pickle weights exist and ``allow_pickle`` is false.
        AdapterMergeError: ``merge=True`` for a tuner or layer that cannot merge.

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
        **peft_kwargs: ``PeftModel.from_pretrained``'s keywords; a ``config`` object is copied.

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
