"""Attach an adapter to a model: inject on the meta device, check, then allocate; undo on any failure.

One load, in the order that keeps a hostile file cheap and the caller's model safe:

1. **Inject on the meta device.** Every parameter and buffer of the model is swapped for a meta twin
   (:class:`~safe_lora._meta.MetaTwins`) and PEFT's own injection runs inside ``torch.device("meta")``:
   the real module tree gets PEFT's adapter layers, but nothing is allocated and no value is read or
   written -- whatever size the config claims. PEFT's ``get_peft_model_state_dict`` then says which
   keys, shapes and dtypes the adapter has, and :func:`safe_lora._fit.fit_findings` compares them with
   the weights file. A disagreement is refused here, in milliseconds.
2. **Allocate what the file fills.** The real tensors go back, every adapter tensor is created empty
   (no random initialisation to overwrite, and the caller's RNG untouched), given the device and dtype
   PEFT's default path gives (``_move_adapter_to_device_of_base_layer``, ``_cast_adapter_dtype``), and
   PEFT's ``set_peft_model_state_dict`` copies the file in -- each key checked before it lands.
3. **Or PEFT's default path.** When the file does not fill every tensor the injection made (a missing
   key with ``strict=False``, an init that rewrites the base weights, tensors PEFT derives at
   injection), the injection is undone and PEFT's own default path runs: inject, initialise, load.

Either way the result is bit-identical to ``PeftModel.from_pretrained``'s, and every failure --
ours, PEFT's, or a ``KeyboardInterrupt`` -- is undone by the caller's :class:`~safe_lora._rollback.Snapshot`.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Container, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from torch import nn

from safe_lora._checks import AdapterOnDisk, Finding, raise_first
from safe_lora._fit import Expected, expected_state, fit_findings
from safe_lora._meta import MetaTwins, all_modules, on_meta, shielded, tensor_slots
from safe_lora._patterns import resolve_patterns
from safe_lora._peft import (
    INJECTION_MODES,
    STRUCTURAL_RATES,
    WRAPPED_CHILDREN,
    BaseTunerLayer,
    BufferDict,
    InjectionMode,
    all_linear_targets,
    cast_adapter_dtype,
    check_new_adapter_config,
    check_target_module_exists,
    complete_deferred,
    intercept_load_state_dict,
    loading_context,
    module_names_matched,
    move_adapter_to_base_device,
    move_is_noop,
    other_adapters_hidden,
    peft_model_class,
    peft_type_name,
    placement_kept,
    remap_keys,
    rewrites_base,
    shapes_config,
    upcast_changes,
)
from safe_lora._readers import dtype_name
from safe_lora._rollback import Snapshot, holds_quantized
from safe_lora._source import CONFIG_NAME
from safe_lora._unwrap import base_of
from safe_lora.errors import AdapterConfigError, AdapterWeightsError, _fmt_keys

__all__ = ["AttachOptions", "Injected", "attach", "inject_checked"]


@dataclass
class AttachOptions:
    """How PEFT is asked to load: ``PeftModel.from_pretrained``'s keywords that reach the load.

    Attributes:
        low_cpu_mem_usage: PEFT's assign path (tensors created on meta, the file's assigned).
        autocast_adapter_dtype: Upcast half-precision adapter tensors to float32 (PEFT's default).
        key_mapping: Renames of the file's keys (``load_peft_weights(key_mapping=...)``).
        torch_device: The device the file's tensors are read to before they are copied in.
        dispatch: ``device_map`` / ``max_memory`` / ``offload_*``: handed to PEFT's ``load_adapter``.
    """

    low_cpu_mem_usage: bool = False
    autocast_adapter_dtype: bool = True
    key_mapping: dict[str, str] | None = None
    torch_device: str | None = None
    dispatch: dict[str, Any] = field(default_factory=dict)


@dataclass
class Injected:
    """An adapter injected on the meta device and checked against the file; nothing allocated yet.

    Attributes:
        peft_model: The model with the adapter's layers, its tensors still on the meta device.
        twins: The meta twins standing in for the model's real tensors (``None`` in ``real-base`` mode).
        expected: What the adapter's state dict holds (keys, shapes, dtypes), by PEFT.
        findings: What the check against the model found (warnings only: errors were raised).
        warnings: What PEFT warned while injecting, to replay once the load succeeded.
        mode: How the injection ran (see :data:`safe_lora._peft.INJECTION_MODES`).
        deferred: Module paths (``"<path>."``) of structure PEFT builds later (MonteCLoRA's sampler).
    """

    peft_model: PeftModel
    twins: MetaTwins | None
    expected: Expected
    findings: list[Finding]
    warnings: list[warnings.WarningMessage]
    mode: InjectionMode
    deferred: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Step 1: inject on the meta device and check
# --------------------------------------------------------------------------------------------------


def prepare_for_model(config: PeftConfig, model: nn.Module, *, where: str) -> PeftConfig:
    """``config`` with its regular-expression fields decided, under a time bound, over the module names
    PEFT will match on ``model`` (see :mod:`safe_lora._patterns`).

    Raises:
        AdapterConfigError: A pattern is invalid or does not finish in time.
    """
    return resolve_patterns(config, module_names_matched(base_of(model), config), where=where)


def inject_checked(
    target: nn.Module,
    adapter: AdapterOnDisk,
    config: PeftConfig,
    *,
    name: str,
    training: bool,
    strict: bool,
    options: AttachOptions,
    snapshot: Snapshot,
) -> Injected:
    """Inject ``config`` into ``target`` with every tensor on the meta device and check the result
    against the weights file; raise the first refusal.

    ``target`` is a base model (a ``PeftModel`` is built around it, as ``from_pretrained`` does) or a
    ``PeftModel`` (the adapter is added, as ``load_adapter`` does). The caller holds ``snapshot``
    and restores it on any exception.

    Raises:
        AdapterConfigError: PEFT cannot apply the config to this model.
        AdapterWeightsError: The file's keys, shapes or dtypes do not fit what PEFT creates.
    """
    where = adapter.source.where(CONFIG_NAME)
    header, renamed_from = _compared_header(target, adapter, config, options)
    findings: list[Finding] = []
    # The strictest way the tuner's injection can run (see INJECTION_MODES); when PEFT fails there, a
    # less strict one: a meta-only failure (a value read, an op without a meta kernel) then succeeds,
    # while a config PEFT refuses fails in every mode, with PEFT's own error.
    modes: list[InjectionMode] = ["meta", "meta-params", "real-base"]
    first = INJECTION_MODES.get(peft_type_name(config), "meta")
    failure: Exception | None = None
    for mode in modes[modes.index(first) :]:
        if mode == "real-base":
            _protect_in_place_targets(target, config, snapshot)
        # The adapters already loaded keep their own tensors: injecting another one neither reads nor
        # writes them (the requires_grad PEFT flips on them is the snapshot's to put back).
        twins = MetaTwins(target, skip=snapshot.sealed) if mode != "real-base" else None
        try:
            with _recorded_warnings() as recorded:
                try:
                    # Adding to a PeftModel: PEFT's walks over the adapters already loaded (switching
                    # their requires_grad, which the snapshot puts back anyway) see none of them, so
                    # the meta injection does not grow with them.
                    hide = (
                        other_adapters_hidden(target, name, injecting=True)
                        if mode == "meta" and isinstance(target, PeftModel)
                        else nullcontext()
                    )
                    with on_meta() if mode == "meta" else nullcontext(), hide:
                        peft_model = _inject(
                            target,
                            copy.deepcopy(shapes_config(config)),
                            name,
                            training=training,
                            low_cpu=mode != "meta",
                            options=options,
                        )
                    built_later = complete_deferred(peft_model, name, skip=snapshot.sealed)
                    deferred = tuple(f"{prefix}." for prefix in built_later)
                    expected = expected_state(peft_model, name, file_keys=set(header))
                    expected.deferred = {
                        f"{prefix}.{tensor}"  # module paths of a PeftModel are saved keys' prefixes
                        for prefix, tensors in built_later.items()
                        for tensor in tensors
                    }
                except Exception as exc:  # PEFT raises ValueError/TypeError/KeyError/RuntimeError/...
                    failure = exc
                    if twins is not None:
                        twins.restore(target)
                    snapshot.restore()
                    continue
            findings += fit_findings(
                header,
                expected,
                where=adapter.weights_path,
                strict=strict,
                vocab_size=_vocab(target),
                key_mapping=options.key_mapping,
                renamed_from=renamed_from,
            )
            raise_first(findings)
        except BaseException:
            # The snapshot restores the modules it captured; the twins may also sit in modules it
            # only sealed (the adapters loaded before), so they are put back first, everywhere.
            if twins is not None:
                twins.restore(target)
            raise
        return Injected(peft_model, twins, expected, findings, recorded, mode, deferred)
    assert failure is not None
    base = base_of(target)
    raise AdapterConfigError(
        f"Adapter config does not fit this model in {where!r}: {type(failure).__name__}: {failure} — "
        "expected "
        f"a config PEFT can apply to {type(base).__name__} (target modules that exist in it, valid field "
        f"values) — check that this adapter was trained on this base model architecture, or fix the "
        f"config (e.g. 'target_modules').",
        path=where,
    ) from failure


def _vocab(model: nn.Module) -> int | None:
    get = getattr(base_of(model), "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except Exception:  # a model without a text embedding
        return None
    return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None


def _key_mapping(target: nn.Module, config: PeftConfig, options: AttachOptions) -> dict[str, str]:
    if options.key_mapping is not None:
        return dict(options.key_mapping)
    if config.is_prompt_learning:
        return {}
    # What PeftModel.from_pretrained passes for models whose checkpoints were renamed by transformers.
    return dict(getattr(base_of(target), "_checkpoint_conversion_mapping", None) or {})


def _compared_header(
    target: nn.Module, adapter: AdapterOnDisk, config: PeftConfig, options: AttachOptions
) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's header under the keys PEFT will load them as (a key mapping applied), and for
    each key the caller's ``key_mapping=`` renamed, the file's own key (empty without one)."""
    mapping = _key_mapping(target, config, options)
    if not mapping:
        return dict(adapter.header), {}
    renamed, unprefixed = remap_keys(adapter.header, mapping)
    if unprefixed:
        raise AdapterWeightsError(
            f"Adapter weights cannot be renamed by key_mapping= in {adapter.weights_path!r}: "
            f"{_fmt_keys(unprefixed)} start with neither 'base_model.model.' nor 'base_model.' — expected "
            f"the keys save_pretrained writes — re-save the adapter, or drop key_mapping=.",
            path=adapter.weights_path,
            unexpected_keys=unprefixed,
        )
    if options.key_mapping is None:  # the model's own conversion mapping: not the caller's to fix
        return renamed, {}
    originals = remap_keys({k: k for k in adapter.header}, mapping)[0]
    return renamed, {new: old for new, old in originals.items() if new != old}


def _inject(
    target: nn.Module, config: PeftConfig, name: str, *, training: bool, low_cpu: bool, options: AttachOptions
) -> PeftModel:
    """Build the ``PeftModel`` (or add the adapter) exactly as PEFT's loading entry points do."""
    if isinstance(target, PeftModel):
        check_new_adapter_config(target, config, training=training)
        target.add_adapter(
            name, config, low_cpu_mem_usage=low_cpu, autocast_adapter_dtype=options.autocast_adapter_dtype
        )
        if training:
            target.set_requires_grad(name)
        return target
    cls = peft_model_class(config)  # the same class choice as PeftModel.from_pretrained
    return cls(
        target, config, name, autocast_adapter_dtype=options.autocast_adapter_dtype, low_cpu_mem_usage=low_cpu
    )


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3: allocate and load
# --------------------------------------------------------------------------------------------------


def attach(
    target: nn.Module,
    adapter: AdapterOnDisk,
    config: PeftConfig,
    *,
    name: str,
    training: bool,
    strict: bool,
    options: AttachOptions,
    snapshot: Snapshot,
    rates_after_load: Mapping[str, float] | None = None,
) -> tuple[PeftModel, list[Finding]]:
    """Load ``adapter`` into ``target`` (a base model or a ``PeftModel``) under ``snapshot``.

    ``config`` is the prepared copy (:func:`prepare_for_model`); ``rates_after_load`` are the
    structural dropout rates set on the built modules instead (X-LoRA's classifier). ``snapshot`` was
    taken of ``target`` as it is now (for a second adapter of one load: a snapshot with the first
    one's as ``outer``): between attempts the load is undone to it, and "a tensor this load created"
    means one it does not know.

    Returns:
        ``(peft_model, findings)``: the model, and the warnings found (a base-model mismatch, keys left
        out with ``strict=False``) for the caller to emit.

    Raises:
        AdapterConfigError, AdapterWeightsError: The adapter does not fit; the caller restores
            ``snapshot``.
    """
    assert adapter.weights is not None
    # What a load may write in place (quantized target weights, inits that rewrite the base) is backed
    # up first, on the structure as it is, whichever path then loads it.
    _protect_in_place_targets(target, config, snapshot)
    with torch.random.fork_rng(devices=_rng_devices()):
        injected = inject_checked(
            target,
            adapter,
            config,
            name=name,
            training=training,
            strict=strict,
            options=options,
            snapshot=snapshot,
        )
        tensors = _tensors(adapter, options)
        # The real tensors go back before anything else: the snapshot restores only the modules it
        # captured, and the twins may also sit in the adapters loaded before (which it only seals).
        written = injected.twins.written() if injected.twins is not None else []
        # Every module but the adapters loaded before (an injection does not build into them), walked
        # once for putting the real tensors back and for the load.
        modules = all_modules(injected.peft_model, skip=snapshot.sealed)
        if injected.twins is not None:
            injected.twins.restore(injected.peft_model, modules=modules)
        loaded = None
        fast = (
            injected.mode == "meta"
            and not options.low_cpu_mem_usage
            and not options.dispatch
            and not rewrites_base(config)
            and not written  # an init computed new base weights while the twins stood in
            and not injected.deferred  # PEFT would build it at the first forward, afresh
            and getattr(base_of(target), "hf_device_map", None) is None
        )
        if fast:
            loaded = _load_materialized(
                injected,
                adapter,
                tensors,
                modules,
                name=name,
                strict=strict,
                options=options,
                snapshot=snapshot,
            )
        if loaded is None:
            snapshot.restore()
            loaded = _load_default(
                target,
                adapter,
                config,
                tensors,
                expected=injected.expected,
                name=name,
                training=training,
                strict=strict,
                options=options,
                snapshot=snapshot,
            )
    peft_model, replay, dropped = loaded
    _set_rates_after_load(peft_model, name, rates_after_load or {})
    for w in replay:
        if not str(w.message).startswith(_OWN_WARNINGS):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    findings = [f for f in injected.findings if f.severity == "warning" and f.code != "keys-partial"]
    expected = injected.expected
    missing = sorted(set(expected.shapes) - set(adapter.header))
    unexpected = sorted(set(dropped) | {k for k in adapter.header if not expected.known(k)})
    if not strict and (missing or unexpected):
        findings.append(
            Finding(
                "warning",
                "keys-partial",
                f"Loaded adapter {name!r} from {adapter.source.label} with strict=False: missing keys (left "
                "at "
                f"their initial values): [{_fmt_keys(missing)}]; unexpected keys (ignored): "
                f"[{_fmt_keys(unexpected)}].",
                tuple(missing + unexpected),
                warning=UserWarning,
            )
        )
    return peft_model, findings


def _rng_devices() -> list[int]:
    # The CUDA generators too, when CUDA is in use: PEFT's default path initialises on the adapter's
    # device. Asking for them without CUDA initialised would initialise it.
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []  # type: ignore[no-untyped-call]


def _tensors(adapter: AdapterOnDisk, options: AttachOptions) -> dict[str, torch.Tensor]:
    assert adapter.weights is not None
    tensors = adapter.weights.tensors
    if options.key_mapping:
        tensors, _ = remap_keys(tensors, options.key_mapping)
    if options.torch_device is not None:
        # What load_peft_weights(device=...) does: read the file to that device first.
        tensors = {k: v.to(options.torch_device) for k, v in tensors.items()}
    return tensors


_Loaded = tuple[PeftModel, list[warnings.WarningMessage], list[str]]


def _load_materialized(
    injected: Injected,
    adapter: AdapterOnDisk,
    tensors: dict[str, torch.Tensor],
    modules: list[nn.Module],
    *,
    name: str,
    strict: bool,
    options: AttachOptions,
    snapshot: Snapshot,
) -> _Loaded | None:
    """Step 2: adapter tensors allocated empty (the real ones are back), the file copied in. ``None``
    when the file does not fill every tensor the injection made: then only PEFT's own path gives PEFT's
    values.

    The device and dtype of each tensor are PEFT's own (:func:`_allocate_as_peft_places`).
    """
    peft_model, expected = injected.peft_model, injected.expected
    # One walk of ``modules`` (all but the adapters loaded before): where the new tensors sit (PEFT's
    # move and upcast replace entries, never add any), what is still on the meta device, and where
    # the other tensors are.
    known = snapshot.known_tensor_ids()
    scan = _scan(peft_model, modules, known=known)
    if scan.meta_left or not all(tensor.is_meta for _, _, tensor in scan.new):
        return None  # a tensor made from real values, or one left on meta: PEFT's path must make it
    with _recorded_warnings() as recorded:
        reals = _allocate_as_peft_places(
            peft_model, modules, scan, snapshot, known, name=name, options=options
        )
        if reals is None:
            return None
        with (
            loading_context(peft_model, name),
            _shielded(peft_model, snapshot) as unshield,
            _guarded_load(
                peft_model,
                adapter,
                tensors,
                snapshot,
                refuse_stray=strict,
                expected=expected,
                before=unshield,
            ) as report,
        ):
            set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
    unfilled = [t for t in reals if id(t) not in report.loaded_ids]
    # Keys PEFT saves along and ignores when loading (an embedding wrapper's duplicates) may land
    # nowhere; a key of the adapter's own, or of structure PEFT builds later, may not.
    nowhere = [k for k in report.nowhere if k not in expected.optional]
    if unfilled or nowhere or report.calls != 1:
        return None  # a tensor left empty, or a key for structure PEFT builds later (MonteCLoRA)
    return peft_model, [*injected.warnings, *recorded], report.dropped


def _like(tensor: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as ``tensor`` is: a parameter of the same class and ``requires_grad``, with its
    attributes (PEFT and bitsandbytes keep some on parameters); a plain tensor as it is."""
    if not isinstance(tensor, nn.Parameter):
        return data
    made = torch.Tensor._make_subclass(type(tensor), data, tensor.requires_grad)
    if vars(tensor):
        vars(made).update(vars(tensor))
    return made


# A module's own dicts of children and tensors: the walk of the module tree reads them.
_MODULE_TREE = frozenset({"_modules", "_parameters", "_buffers"})


@dataclass(frozen=True)
class _Scan:
    """What one walk of the modules an injection built into found.

    Attributes:
        new: ``(slot, key, tensor)`` for every tensor the load created: ``slot[key]`` is where it sits
            (a module's ``_parameters`` or ``_buffers``); one shared by two modules is listed twice.
        meta_left: A tensor that existed before is on the meta device, or a tuner layer keeps a meta
            tensor in a plain attribute (those are not listed in ``new``).
        devices: The devices of the tensors that existed before.
        float_dtypes: Their floating-point and complex dtypes.
    """

    new: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]]
    meta_left: bool
    devices: set[torch.device] = field(default_factory=set)
    float_dtypes: set[torch.dtype] = field(default_factory=set)


def _scan(peft_model: nn.Module, modules: list[nn.Module], *, known: AbstractSet[int]) -> _Scan:
    """The new tensors among ``modules`` (those whose ids ``known`` lacks), and whether any other tensor
    is on the meta device -- a parameter or buffer, or a tensor a tuner layer keeps in a plain attribute
    (FourierFT's and WaveFT's indices, new entries of an existing layer's dict when an adapter is
    added), also in what the tuner keeps outside the module tree. Plain loops: this runs on every load."""
    new: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []
    devices: set[torch.device] = set()
    dtypes: set[torch.dtype] = set()
    meta = _Scan(new, meta_left=True)
    for module in modules:
        for slot in tensor_slots(module):
            if slot:
                for key, tensor in slot.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in known:
                        new.append((slot, key, tensor))
                        continue
                    if tensor.is_meta:
                        return meta
                    devices.add(tensor.device)
                    dtypes.add(tensor.dtype)
        if isinstance(module, BaseTunerLayer):
            for key, value in vars(module).items():
                if key in _MODULE_TREE:
                    continue  # the walk above reads those
                if isinstance(value, torch.Tensor):
                    if value.is_meta:
                        return meta
                elif isinstance(value, dict):
                    for item in value.values():
                        if isinstance(item, torch.Tensor) and item.is_meta:
                            return meta
    # Modules a tuner keeps outside the module tree: AdaptionPrompt caches the adapted attentions of
    # the adapters that are not active (``_cached_adapters``), where no walk above reaches.
    tuner = getattr(peft_model, "base_model", None)
    for key, value in vars(tuner).items() if isinstance(tuner, nn.Module) else ():
        if isinstance(value, dict) and key not in _MODULE_TREE:
            for item in value.values():
                for held in item if isinstance(item, (list, tuple)) else (item,):
                    if isinstance(held, nn.Module) and any(t.is_meta for t in held.parameters()):
                        return meta
    floats = {d for d in dtypes if d.is_floating_point or d.is_complex}
    return _Scan(new, meta_left=False, devices=devices, float_dtypes=floats)


def _round_trip_kept(
    modules: list[nn.Module],
    scan: _Scan,
    captured: Container[nn.Module],
    known: AbstractSet[int],
    *,
    name: str,
    made_on: torch.device,
    upcast: bool,
) -> bool:
    """Whether PEFT's move and upcast give every new tensor back the device and dtype it has, and
    re-create it alike: then it can be allocated as it is.

    The move gives each adapter tensor of a tuner layer its base's device and float dtype; the upcast
    then turns half precision back into float32 (:func:`~safe_lora._peft.placement_kept` says whether
    that ends where it began). Along the way ``Module.to`` keeps a parameter object and the upcast
    replaces it by a plain ``nn.Parameter`` with the same ``requires_grad``: alike only for plain
    parameters without attributes of their own, held by modules (a ``ParameterDict`` entry is re-made
    as ``ParameterDict`` makes it; a buffer is moved but never upcast). And the move reaches all of an
    adapter entry: every tensor there must be one of these (no module or tensor that existed before
    inside a new module, but the base it wraps).
    """
    dtypes = {t.dtype for _, _, t in scan.new}
    if len(dtypes) != 1 or not scan.new:
        return False
    dtype = next(iter(dtypes))
    if not dtype.is_floating_point:
        return False
    for _, _, tensor in scan.new:
        if type(tensor) is not nn.Parameter or vars(tensor):
            return False
    if not placement_kept(modules, (made_on, dtype), upcast=upcast):
        return False
    new_params = {id(slot) for slot, _, _ in scan.new}
    for module in modules:
        fresh = module not in captured
        is_container = isinstance(module, _PER_ADAPTER)
        if id(module._parameters) in new_params and isinstance(module, nn.ParameterDict):
            return False  # ParameterDict re-makes its entries
        if fresh or is_container:
            for child_name, child in module._modules.items():
                if child is None or child not in captured:
                    continue
                if is_container and child_name == name:
                    return False  # an existing module as this adapter's entry
                if fresh and child_name not in WRAPPED_CHILDREN:
                    return False  # an existing module inside a new one, and not the base it wraps
            for slot in tensor_slots(module):
                for key, held in slot.items():
                    if held is not None and id(held) in known and (fresh or key == name):
                        return False
    return True


_PER_ADAPTER = (nn.ModuleDict, nn.ParameterDict, BufferDict)


def _allocate_as_peft_places(
    peft_model: PeftModel,
    modules: list[nn.Module],
    scan: _Scan,
    snapshot: Snapshot,
    known: AbstractSet[int],
    *,
    name: str,
    options: AttachOptions,
) -> list[torch.Tensor] | None:
    """Put an empty tensor where each meta tensor the injection made sits, on the device and in the
    dtype PEFT's default path gives it; return them (``None`` when PEFT's path must decide).

    PEFT's default path makes a new adapter's tensors on the default device, moves them to the base
    layer's device and float dtype, then upcasts half precision to float32
    (``_move_adapter_to_device_of_base_layer``, ``cast_adapter_dtype``). Each tensor is allocated as
    it is where those two provably leave it so: every tensor already has the one device and float
    dtype each layer's base gives and nothing is in half precision
    (:func:`~safe_lora._peft.move_is_noop`), or the move's cast is one the upcast undoes
    (:func:`_round_trip_kept`: a bf16 base's float32 adapter). Otherwise both run on 0-element
    stand-ins, and each tensor is allocated where and as they left it: run on full tensors, a bf16
    base's adapter would be converted twice (fp32 -> bf16 -> fp32), which cost more than PEFT's whole
    load of a 1B model; run on stand-ins, they cost ~100 µs a layer.
    """
    made_on = torch.get_default_device()
    upcast = options.autocast_adapter_dtype and upcast_changes(t for _, _, t in scan.new)
    news = {t.dtype for _, _, t in scan.new if t.is_floating_point() or t.is_complex()}
    devices, floats = scan.devices | {made_on}, scan.float_dtypes | news
    placement = (next(iter(devices)), next(iter(floats))) if len(devices) == 1 and len(floats) == 1 else None
    made: dict[int, torch.Tensor] = {}
    reals: list[torch.Tensor] = []
    if (not upcast and placement is not None and move_is_noop(modules, placement)) or _round_trip_kept(
        modules,
        scan,
        snapshot.modules,
        known,
        name=name,
        made_on=made_on,
        upcast=options.autocast_adapter_dtype,
    ):
        for slot, key, tensor in scan.new:
            real = made.get(id(tensor))
            if real is None:
                real = made[id(tensor)] = _like(tensor, torch.empty(tensor.shape, dtype=tensor.dtype))
            slot[key] = real
            reals.append(real)
        return reals
    stand_ins: dict[int, torch.Tensor] = {}  # a tensor two layers share gets one stand-in
    for slot, key, tensor in scan.new:
        stand_in = stand_ins.get(id(tensor))
        if stand_in is None:
            stand_in = stand_ins[id(tensor)] = _like(tensor, torch.empty(0, dtype=tensor.dtype))
        slot[key] = stand_in
    # What PEFT's default path does after creating the tensors, on the stand-ins. None of the
    # adapter's tensors sits in the adapters loaded before (whose own modules the snapshot does not
    # walk, and which PEFT does not touch): the tuner layers that hold them are among the others.
    with other_adapters_hidden(peft_model, name):
        move_adapter_to_base_device(modules, name)
    # PEFT's injection already upcast the adapter (on the meta tensors the stand-ins copy): only what
    # the move turned to half precision is left for it to do.
    if options.autocast_adapter_dtype and upcast_changes(
        t for s, k, _ in scan.new if (t := s.get(k)) is not None
    ):
        with other_adapters_hidden(peft_model, name):
            cast_adapter_dtype(peft_model, name, autocast=True)
    for slot, key, tensor in scan.new:
        stand_in = slot.get(key)
        if stand_in is None or stand_in.numel():
            return None  # not where it was made: only PEFT's own path knows what it is
        real = made.get(id(stand_in))
        if real is None:
            real = made[id(stand_in)] = _like(
                stand_in, torch.empty(tensor.shape, dtype=stand_in.dtype, device=stand_in.device)
            )
        slot[key] = real
        reals.append(real)
    return reals


def _shielded(peft_model: nn.Module, snapshot: Snapshot) -> AbstractContextManager[Callable[[], None]]:
    """:func:`~safe_lora._meta.shielded` for the quantized weights, around PEFT's state-dict walk; when
    the snapshot found no quantized weight there is nothing to shield, and no walk to make."""
    if snapshot.quantized:
        return shielded(peft_model, holds_quantized)
    return nullcontext(_nothing)


def _nothing() -> None:
    pass


def _load_default(
    target: nn.Module,
    adapter: AdapterOnDisk,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    *,
    expected: Expected,
    name: str,
    training: bool,
    strict: bool,
    options: AttachOptions,
    snapshot: Snapshot,
) -> _Loaded:
    """Step 3: PEFT's own path, as ``PeftModel.from_pretrained`` runs it, every key guarded."""
    _protect_in_place_targets(target, config, snapshot)
    with _recorded_warnings() as recorded:
        peft_model = _inject(
            target,
            copy.deepcopy(config),
            name,
            training=training,
            low_cpu=options.low_cpu_mem_usage,
            options=options,
        )
        if options.dispatch or getattr(base_of(peft_model), "hf_device_map", None) is not None:
            _load_dispatched(peft_model, adapter, name=name, training=training, options=options)
            return peft_model, recorded, []
        with (
            loading_context(peft_model, name),
            _shielded(peft_model, snapshot) as unshield,
            _guarded_load(
                peft_model,
                adapter,
                tensors,
                snapshot,
                refuse_stray=strict,
                expected=expected,
                before=unshield,
            ) as report,
        ):
            set_peft_model_state_dict(
                peft_model, tensors, adapter_name=name, low_cpu_mem_usage=options.low_cpu_mem_usage
            )
        cast_adapter_dtype(peft_model, name, autocast=options.autocast_adapter_dtype)
        # Prompt learning's state is loaded into the prompt encoder apart from load_state_dict
        # (set_peft_model_state_dict, _load_adapter_state_dict): its keys name no tensor there.
        nowhere = (
            [] if config.is_prompt_learning else [k for k in report.nowhere if k not in expected.optional]
        )
        if nowhere and strict:
            # Keys for which PEFT built nothing (MonteCLoRA's sampler on PEFT's low_cpu_mem_usage
            # path): PEFT would drop them silently.
            raise AdapterWeightsError(
                f"Adapter weights do not match the config in {adapter.weights_path!r}: "
                f"{len(nowhere)} unexpected key(s) nothing consumes: {_fmt_keys(nowhere)} — a "
                "partial load silently does less than it should — load it without low_cpu_mem_usage=True, "
                "or "
                f"pass strict=False to load what fits with a warning.",
                path=adapter.weights_path,
                unexpected_keys=nowhere,
            )
        if options.low_cpu_mem_usage:
            _refuse_meta(peft_model, adapter, name)
    return peft_model, recorded, [*report.dropped, *nowhere]


def _load_dispatched(
    peft_model: PeftModel, adapter: AdapterOnDisk, *, name: str, training: bool, options: AttachOptions
) -> None:
    """Device maps and offloading: PEFT's ``load_adapter`` places the weights. It reads a folder, so it
    gets a private copy of the very bytes that were checked -- never the original files again."""
    folder = Path(tempfile.mkdtemp(prefix="safe-lora-"))
    try:
        for file_name, file in adapter.files.items():
            (folder / file_name).write_bytes(file.data)
        kwargs: dict[str, Any] = dict(options.dispatch)
        if options.key_mapping:
            kwargs["key_mapping"] = options.key_mapping
        if options.torch_device is not None:
            kwargs["torch_device"] = options.torch_device
        peft_model.load_adapter(
            os.fspath(folder),
            name,
            is_trainable=training,
            low_cpu_mem_usage=options.low_cpu_mem_usage,
            autocast_adapter_dtype=options.autocast_adapter_dtype,
            **kwargs,
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _refuse_meta(peft_model: PeftModel, adapter: AdapterOnDisk, name: str) -> None:
    """With ``low_cpu_mem_usage=True`` PEFT creates tensors on the meta device and some code paths
    never give them storage (layer replication, 8-bit DoRA, X-LoRA's classifier): such a model
    loads "fine" and fails at its first forward. Refuse it instead."""
    left = sorted(
        n
        for n, tensor in (*peft_model.named_parameters(), *peft_model.named_buffers())
        if tensor.device.type == "meta"
    )
    if left:
        where = adapter.source.label
        raise AdapterConfigError(
            f"Adapter {name!r} from {where} did not load with low_cpu_mem_usage=True: PEFT left {len(left)} "
            f"tensor(s) on the meta device ({_fmt_keys(left)}) — expected every tensor to hold the file's or "
            f"the base's values — load it without low_cpu_mem_usage=True.",
            path=adapter.source.where(CONFIG_NAME),
        )


def _set_rates_after_load(peft_model: PeftModel, name: str, wanted: Mapping[str, float]) -> None:
    """Give the Dropout modules of a structural rate (X-LoRA's classifier) the rate asked for."""
    for field_name, rate in wanted.items():
        holder = getattr(peft_model.base_model, STRUCTURAL_RATES[field_name], None)
        if isinstance(holder, nn.Module):
            for module in holder.modules():
                if isinstance(module, nn.Dropout):
                    module.p = rate
        setattr(peft_model.peft_config[name], field_name, rate)


# --------------------------------------------------------------------------------------------------
# What PEFT may write in place, and what it warns
# --------------------------------------------------------------------------------------------------


def _targets(model: nn.Module, config: PeftConfig) -> list[nn.Module]:
    """The modules PEFT will adapt for ``config``, by PEFT's own matching; every module if unsure."""
    inner = base_of(model)
    modules = [(k, m) for k, m in inner.named_modules() if k and not isinstance(m, BaseTunerLayer)]
    try:
        probe = all_linear_targets(config, inner)
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


# PEFT warnings that safe_lora replaces by its own refusal or warning (never shown twice).
_OWN_WARNINGS = ("Found missing adapter keys",)


@contextmanager
def _recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record what PEFT warns while it works; the caller replays it once the load succeeded.

    A refused load raises one typed error instead of a trail of PEFT's warnings about a model that no
    longer exists. The caller's filters decide what is recorded, as they would decide what PEFT shows:
    forcing "always" here would also make Python read the source file of every warning PEFT (or
    transformers) raises into its line cache, megabytes that stay.
    """
    with warnings.catch_warnings(record=True) as caught:
        yield caught


class _Misfit(Exception):
    """A file key would land where it must not, or does not fit, before anything is written."""

    def __init__(
        self,
        landed: list[str],
        wrong_dtype: dict[str, str],
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        super().__init__("misfit")
        self.landed = landed
        self.wrong_dtype = wrong_dtype
        self.mismatched = mismatched


@dataclass
class _LoadReport:
    """What the guarded ``load_state_dict`` saw."""

    dropped: list[str] = field(default_factory=list)  # file keys left out (strict=False)
    nowhere: list[str] = field(default_factory=list)  # file keys that name no tensor of the model
    loaded_ids: set[int] = field(default_factory=set)
    calls: int = 0


@contextmanager
def _guarded_load(
    peft_model: PeftModel,
    adapter: AdapterOnDisk,
    tensors: Mapping[str, torch.Tensor],
    snapshot: Snapshot,
    *,
    refuse_stray: bool,
    expected: Expected,
    before: Callable[[], None] = lambda: None,
) -> Iterator[_LoadReport]:
    """Check every key PEFT is about to load, before the first value moves.

    PEFT's ``set_peft_model_state_dict`` remaps the file's keys and calls ``load_state_dict`` on the
    ``PeftModel`` once (:func:`safe_lora._peft.intercept_load_state_dict`). A key may only land in a
    tensor this load created -- or in an existing one PEFT saves on purpose (a bias with
    ``bias="all"``, a resized embedding), whose values are backed up first. Anything else (a key that
    would overwrite a base weight, say) is refused, or left out with ``strict=False``; shapes and
    integer-vs-float dtypes must fit. ``before`` runs first, when PEFT calls ``load_state_dict``.
    """
    report = _LoadReport()
    file_key = {id(v): k for k, v in tensors.items()}
    original = peft_model.load_state_dict
    # Keys PEFT saves on purpose for tensors that existed before (a bias with bias="all", embedding
    # layers saved whole), as the injection on the meta device found them: asking the real model
    # would walk its state_dict(), which re-packs bitsandbytes weights in place.
    optional = set(expected.shapes) | expected.optional

    def load_state_dict(state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        before()  # e.g. the real quantized weights back, shielded from the key-mapping walk
        report.calls += 1
        keep: dict[str, Any] = {}
        landed: list[str] = []
        wrong_dtype: dict[str, str] = {}  # key -> the file's dtype, safetensors' spelling
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # key -> (file, model)
        unplaced: list[str] = []
        placed: set[str] = set()
        for key, value in state_dict.items():
            tensor, new = snapshot.resolve(peft_model, key)
            shown = file_key.get(id(value), key)
            if tensor is None:
                keep[key] = value  # nothing there: PEFT's result reports it as unexpected
                if id(value) in file_key:  # a key PEFT's conversions made up is not the file's
                    unplaced.append(shown)
                continue
            if not new:
                if shown not in optional:
                    landed.append(shown)
                    continue
                snapshot.backup(tensor)
            elif isinstance(value, torch.Tensor):
                if value.is_floating_point() != tensor.is_floating_point() and tensor.device.type != "meta":
                    wrong_dtype[shown] = dtype_name(value.dtype)
                    continue
                if tuple(value.shape) != tuple(tensor.shape):
                    mismatched[shown] = (tuple(value.shape), tuple(tensor.shape))
                    continue
            keep[key] = value
            report.loaded_ids.add(id(tensor))
            placed.add(shown)
        # A file's tensor that lands under no key at all. (PEFT's transformers conversion also makes
        # up keys of its own -- lm_head.weight again as lm_head.modules_to_save.weight -- that name
        # nothing and that PEFT ignores; they are not the file's.)
        report.nowhere.extend(shown for shown in unplaced if shown not in placed)
        if wrong_dtype or mismatched or (landed and refuse_stray):
            raise _Misfit(landed, wrong_dtype, mismatched)
        report.dropped.extend(landed)
        return original(keep, strict=strict, assign=assign)

    try:
        with intercept_load_state_dict(peft_model, load_state_dict):
            yield report
    except _Misfit as misfit:
        keys = sorted([*misfit.landed, *misfit.wrong_dtype, *misfit.mismatched])
        raise AdapterWeightsError(
            f"Adapter weights do not fit this model in {adapter.weights_path!r}: {_fmt_keys(keys)} would "
            "land in "
            "tensors the adapter does not own, or do not fit them — re-save the adapter with "
            "save_pretrained.",
            path=adapter.weights_path,
            unexpected_keys=misfit.landed,
            mismatched_keys=misfit.mismatched,
            wrong_dtypes=misfit.wrong_dtype,
        ) from misfit
    except (RuntimeError, KeyError) as exc:
        # PEFT could not place a file key (a modules_to_save weight missing from the file, a shape
        # torch refuses).
        raise AdapterWeightsError(
            f"Adapter weights could not be loaded from {adapter.weights_path!r}: {type(exc).__name__}: {exc} "
            "— "
            f"re-save the adapter with save_pretrained, or load it into the base model it was trained on.",
            path=adapter.weights_path,
        ) from exc
