"""The one boundary to PEFT: every use of its private API and every fact tied to its version.

safe_lora is tested on the PEFT release range in :data:`TESTED_PEFT` (and declares it). Whatever
here is not PEFT's public, top-level API -- an underscore method, a module-level table, the way a
function matches a pattern, which tensors a tuner saves as integers -- may change in the next
release without notice; keeping it in this module means a PEFT upgrade is checked in one file, and
``tests/test_peft_boundary.py`` fails loudly when the installed PEFT no longer provides any of it.

The rest of safe_lora imports from PEFT only its top-level public names (``from peft import
PeftModel``) and the classes and tables re-exported here.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import peft
import torch
from peft import PeftConfig, PeftModel
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
    replicate_layers,
)
from peft.utils.constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND, UPCAST_DTYPES
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from safe_lora._meta import all_modules, on_meta, skeleton
from safe_lora._unwrap import base_of

__all__ = [
    "EMBEDDING_LAYER_NAMES",
    "INCLUDE_LINEAR_LAYERS_SHORTHAND",
    "INJECTION_MODES",
    "INTEGER_SLOTS",
    "MONTECLORA_SAMPLER_ATTR",
    "NOOP_RULES",
    "PATTERN_FIELDS",
    "PREPARE_HOTSWAP",
    "PROMPT_ENCODER_CHILD",
    "SAMPLE_AT_INFERENCE_ATTR",
    "SAVED_PREFIX",
    "STRUCTURAL_RATES",
    "TASK_CLASSES",
    "TESTED_PEFT",
    "TUNER_BASE_CHILD",
    "TUNER_LAYER_BASE_CHILD",
    "TUNER_PREFIX",
    "UPCAST_TO_FLOAT32",
    "WRAPPED_CHILDREN",
    "AuxiliaryTrainingWrapper",
    "BaseTuner",
    "BaseTunerLayer",
    "BufferDict",
    "NoOpRule",
    "PatternField",
    "Placement",
    "adapters_disabled",
    "all_linear_targets",
    "base_modules",
    "cast_adapter_dtype",
    "check_new_adapter_config",
    "check_target_module_exists",
    "complete_deferred",
    "config_class",
    "external_reads",
    "hotswap_write",
    "import_allowed",
    "init_keeps_base",
    "intercept_load_state_dict",
    "is_router",
    "layer_adapters",
    "layer_param_names",
    "legacy_tp_walk_skipped",
    "loading_context",
    "move_adapter_to_base_device",
    "move_is_noop",
    "other_adapters_hidden",
    "peft_model_class",
    "peft_type_name",
    "placement_kept",
    "refuses_inference_mode",
    "remap_keys",
    "replicate_layers",
    "replicated_depth",
    "rewrites_base",
    "set_adapters_disabled",
    "set_layer_active_adapters",
    "shapes_config",
    "switches_layer_by_layer",
    "tuner_class",
    "upcast_changes",
]

_V = TypeVar("_V")

# The PEFT releases safe_lora is tested with; pyproject.toml declares the same range.
TESTED_PEFT = ">=0.21,<0.22"

# How PEFT prefixes the keys it saves: "base_model.model.<module path>.<adapter tensor>", and
# "base_model.<tensor>" for tensors the tuner itself holds (VeRA's shared projections).
SAVED_PREFIX = "base_model.model."
TUNER_PREFIX = "base_model."

# The children of a tuner layer, tuner or auxiliary wrapper that are the wrapped model, not an
# adapter's own modules (``BaseTunerLayer.base_layer``, ``BaseTuner.model``,
# ``AuxiliaryTrainingWrapper.original_module``).
WRAPPED_CHILDREN = frozenset({"base_layer", "model", "original_module"})


def peft_type_name(config: PeftConfig) -> str:
    """The config's PEFT type as a plain name, e.g. ``"LORA"`` (``"unknown"`` when it has none)."""
    raw = getattr(config, "peft_type", "unknown")
    return str(getattr(raw, "value", raw))


def config_class(peft_type: str) -> Any | None:
    """PEFT's config class for a PEFT type name such as ``"LORA"``, or ``None``
    (``PEFT_TYPE_TO_CONFIG_MAPPING``)."""
    # Keys are PeftType members, a str enum: equal to their plain names.
    return next((cls for kind, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items() if kind == peft_type), None)


def known_peft_types() -> list[str]:
    """Every PEFT type name the installed PEFT can load, sorted."""
    return sorted(str(getattr(k, "value", k)) for k in PEFT_TYPE_TO_CONFIG_MAPPING)


def tuner_class(peft_type: str) -> Any | None:
    """PEFT's tuner (model) class for a PEFT type name such as ``"LORA"``, or ``None``."""
    return next((cls for kind, cls in PEFT_TYPE_TO_TUNER_MAPPING.items() if kind == peft_type), None)


def peft_model_class(config: PeftConfig) -> type[PeftModel]:
    """The ``PeftModel`` class ``PeftModel.from_pretrained`` builds for ``config`` (its task type's)."""
    cls: type[PeftModel] = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)  # type: ignore[arg-type]
    return cls


def layer_adapters(layer: BaseTunerLayer) -> set[str]:
    """The adapter names a tuner layer holds anything for: the keys of its per-adapter attributes
    (``adapter_layer_names`` and ``other_param_names``, public class attributes of PEFT's layers)."""
    names: set[str] = set()
    for attr in (*layer.adapter_layer_names, *layer.other_param_names):
        value: Any = getattr(layer, attr, None)
        if hasattr(value, "keys"):
            names.update(value.keys())
    return names


def layer_param_names(tuner_cls: Any) -> frozenset[str]:
    """The attribute names under which a tuner's layers (and their subclasses) hold adapter tensors
    (``adapter_layer_names`` and ``other_param_names`` of its ``tuner_layer_cls``)."""
    layer_cls = getattr(tuner_cls, "tuner_layer_cls", None)
    if layer_cls is None:
        return frozenset()
    names: set[str] = set()
    pending = [layer_cls]
    while pending:  # subclasses too: AdaLoRA's layers add lora_E to LoraLayer's names, say
        cls = pending.pop()
        names.update(getattr(cls, "adapter_layer_names", ()))
        names.update(getattr(cls, "other_param_names", ()))
        pending.extend(cls.__subclasses__())
    return frozenset(names)


# --------------------------------------------------------------------------------------------------
# Private API of PeftModel, BaseTuner and BaseTunerLayer
# --------------------------------------------------------------------------------------------------


def check_new_adapter_config(peft_model: PeftModel, config: PeftConfig, *, training: bool) -> None:
    """PEFT's own checks before ``PeftModel.load_adapter`` adds an adapter (``_check_new_adapter_config``)."""
    peft_model._check_new_adapter_config(config, is_trainable=training)


@contextmanager
def loading_context(peft_model: PeftModel, adapter_name: str) -> Iterator[None]:
    """The context ``PeftModel.load_adapter`` loads weights in: an inactive adaption-prompt adapter
    is cached outside the model and must be swapped in first (``BaseTuner._temporarily_active``)."""
    config = peft_model.peft_config[adapter_name]
    tuner: Any = peft_model.base_model
    with tuner._temporarily_active(adapter_name) if config.is_adaption_prompt else nullcontext():
        yield


def cast_adapter_dtype(peft_model: PeftModel, adapter_name: str, *, autocast: bool) -> None:
    """What ``PeftModel.__init__`` / ``add_adapter`` do last: upcast half-precision adapter tensors to
    float32 when ``autocast`` (``BaseTuner._cast_adapter_dtype``)."""
    tuner: Any = peft_model.base_model
    if hasattr(tuner, "_cast_adapter_dtype"):
        tuner._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=autocast)


def refuses_inference_mode(tuner: Any) -> bool:
    """Whether ``tuner.set_adapter`` refuses ``inference_mode=``: PEFT 0.21's ``AdaptionPromptModel``
    raises ``ValueError("inference_mode is not supported ...")`` for it
    (peft/tuners/adaption_prompt/model.py); callers then switch without it and put every
    ``requires_grad`` back themselves."""
    from peft.tuners.adaption_prompt import AdaptionPromptModel

    return isinstance(tuner, AdaptionPromptModel)


Placement = tuple[torch.device, torch.dtype]


def move_adapter_to_base_device(modules: Iterable[nn.Module], adapter_name: str) -> None:
    """Give ``adapter_name``'s tensors in every tuner layer among ``modules`` the device and (float)
    dtype of the layer's base weight, as PEFT's ``update_layer`` does on its default path and
    ``set_peft_model_state_dict`` after an assign load
    (``BaseTunerLayer._move_adapter_to_device_of_base_layer``, which leaves a layer without that
    adapter alone: ``modules`` need only hold those with it)."""
    for module in modules:
        if isinstance(module, BaseTunerLayer):
            module._move_adapter_to_device_of_base_layer(adapter_name)


def move_is_noop(modules: Iterable[nn.Module], placement: Placement) -> bool:
    """Whether :func:`move_adapter_to_base_device` provably changes nothing, when every parameter and
    buffer among ``modules`` has ``placement``'s device and every floating one its dtype: then a layer
    whose base gives that device and dtype as PEFT's target moves nothing (``Tensor.to`` and
    ``Module.to`` return what is already there). When every layer's does, PEFT's walk -- about 50 µs a
    layer -- can be skipped.
    """
    return placement_kept(modules, placement, upcast=False)


# What PEFT 0.21's cast_adapter_dtype turns into float32 (peft/tuners/tuners_utils.py): float16,
# bfloat16, and the float8 dtypes of peft.utils.UPCAST_DTYPES this torch has.
UPCAST_TO_FLOAT32: frozenset[torch.dtype] = frozenset(
    {torch.float16, torch.bfloat16}
    | {d for name in UPCAST_DTYPES if isinstance(d := getattr(torch, name, None), torch.dtype)}
)


def upcast_changes(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether :func:`cast_adapter_dtype` could change any of ``tensors``: PEFT's
    ``cast_adapter_dtype`` turns only :data:`UPCAST_TO_FLOAT32` into float32. Tensors all in another
    dtype are left as they are, so the call -- a walk of every module -- can be skipped."""
    return any(t.dtype in UPCAST_TO_FLOAT32 for t in tensors)


def placement_kept(modules: Iterable[nn.Module], placement: Placement, *, upcast: bool) -> bool:
    """Whether every tuner layer among ``modules`` leaves an adapter tensor at ``placement`` (a device
    and a floating dtype) there: PEFT's ``_move_adapter_to_device_of_base_layer`` gives it the base's
    device and floating dtype, then (``upcast``: PEFT's ``autocast_adapter_dtype``)
    ``cast_adapter_dtype`` turns :data:`UPCAST_TO_FLOAT32` into float32.

    Where the move changes the dtype and the upcast changes it back, only the placement is kept, not
    the objects: the caller must know the tensors are ones PEFT re-creates alike (see
    ``safe_lora._attach``).
    """
    for layer in modules:
        if not isinstance(layer, BaseTunerLayer):
            continue
        device, dtype = _base_target(layer)
        if device is not None and device != placement[0]:
            return False
        if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
            continue  # PEFT casts to the base's dtype only when it is a float
        final = torch.float32 if upcast and dtype in UPCAST_TO_FLOAT32 else dtype
        if final != placement[1]:
            return False
    return True


def _base_target(layer: BaseTunerLayer) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype ``_move_adapter_to_device_of_base_layer`` aims ``layer``'s adapter at: PEFT's
    own ``_get_base_layer_device_and_dtype`` of the base layer, a ``MultiheadAttention``'s ``out_proj``
    standing for it as in PEFT 0.21 (``None``: it moves nothing, or casts nothing)."""
    base = layer.get_base_layer()
    if isinstance(base, nn.MultiheadAttention):
        base = base.out_proj
    peft_layer: Any = layer  # PEFT leaves the helper unannotated
    device, dtype = peft_layer._get_base_layer_device_and_dtype(base)
    return device, dtype


@contextmanager
def legacy_tp_walk_skipped(peft_model: nn.Module, modules: Iterable[nn.Module]) -> Iterator[None]:
    """Around PEFT's ``get_peft_model_state_dict``: the same answer without its legacy
    tensor-parallel walk, when that walk provably finds nothing.

    PEFT 0.21 (peft/utils/save_and_load.py, ``_get_tp_info``) first collects the ``_tp_info`` its
    LoRA layers carry under the legacy TP integration: when the model has a ``_tp_plan`` -- which
    transformers gives every Llama, sharded or not -- it asks ``hasattr(module, "_tp_info")`` of every
    module, each a failing ``nn.Module.__getattr__`` (~2 ms on a 1,000-module model). PEFT sets
    ``_tp_info`` as a plain attribute, in the module's ``__dict__``; when no module among ``modules``
    (all of ``peft_model``'s) has one, that walk returns ``None`` -- as it does when the model has no
    ``_tp_plan``, which the block then shows PEFT on the ``PeftModel`` itself.
    """
    own = vars(peft_model)
    if "_tp_plan" in own or any("_tp_info" in vars(m) for m in modules):
        yield
        return
    own["_tp_plan"] = None
    try:
        yield
    finally:
        own.pop("_tp_plan", None)


def set_layer_active_adapters(layer: BaseTunerLayer, names: list[str]) -> None:
    """What ``BaseTunerLayer.set_adapter`` sets, without its ``requires_grad`` side effect."""
    layer._active_adapter = list(names)


def switches_layer_by_layer(peft_model: PeftModel) -> bool:
    """Whether PEFT switches ``peft_model``'s adapters off and on one layer at a time.

    PEFT 0.21's ``PeftModel.disable_adapter`` (peft/peft_model.py) calls the tuner's
    ``disable_adapter_layers`` / ``enable_adapter_layers``, which for ``BaseTuner``
    (peft/tuners/tuners_utils.py, ``_enable_adapter_layers``) call ``enable_adapters(flag)`` on every
    ``BaseTunerLayer`` and ``AuxiliaryTrainingWrapper`` -- each layer's own switch (LN tuning,
    modules_to_save, trainable tokens and UniLoRA override it). Prompt learning swaps the forward
    instead, adaption prompt swaps attention modules, X-LoRA overrides the tuner's switch: for those
    only PEFT's ``disable_adapter`` context manager knows what to do.
    """
    # One kind per model: prompt learning and adaption prompt never mix with other tuners.
    if any(c.is_prompt_learning or c.is_adaption_prompt for c in peft_model.peft_config.values()):
        return False
    tuner = type(peft_model.base_model)
    if not issubclass(tuner, BaseTuner):
        return False
    return all(
        getattr(tuner, method) is getattr(BaseTuner, method)
        for method in ("disable_adapter_layers", "enable_adapter_layers", "_enable_adapter_layers")
    )


def adapters_disabled(peft_model: PeftModel) -> bool:
    """``PeftModel._adapters_disabled``: set while PEFT's ``disable_adapter`` block runs; read by
    ``has_active_enabled_adapter``, which gates the forward hooks of aLoRA and mixed batches."""
    return bool(getattr(peft_model, "_adapters_disabled", False))


def set_adapters_disabled(peft_model: PeftModel, flag: bool) -> None:
    """Set ``PeftModel._adapters_disabled`` as PEFT's ``disable_adapter`` does (:func:`adapters_disabled`)."""
    peft_model._adapters_disabled = flag


# The children of a tuner layer / auxiliary wrapper that stand for the module it wraps: PEFT's
# ``merge_and_unload`` puts them in the wrapper's place, and the names PEFT matched at injection are
# the wrapper's (``lm_head.base_layer`` was ``lm_head``).
_STANDS_FOR_WRAPPER = frozenset({"base_layer", "original_module"})
_PER_ADAPTER = (nn.ModuleDict, nn.ParameterDict, BufferDict)


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for the base model's own modules and the tuner layers and wrappers around
    them, named as in the base model before PEFT wrapped it; never the adapters' own modules.

    A wrapped module is named as its wrapper (both are yielded under one name). The per-adapter
    containers of tuner layers and wrappers (``lora_A``, ``modules_to_save``, ...) are not entered,
    so the walk costs the same however many adapters the model holds.
    """
    stack: list[tuple[str, nn.Module]] = [("", base_of(model))]
    seen: set[int] = set()
    while stack:
        key, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield key, module
        wraps = isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        children = []
        for child_name, child in module._modules.items():
            if child is None or (wraps and isinstance(child, _PER_ADAPTER)):
                continue
            if wraps and child_name in _STANDS_FOR_WRAPPER:
                children.append((key, child))
            else:
                children.append((f"{key}.{child_name}" if key else child_name, child))
        stack.extend(reversed(children))


@contextmanager
def other_adapters_hidden(
    peft_model: PeftModel, adapter_name: str, *, injecting: bool = False
) -> Iterator[bool]:
    """A block in which PEFT's walks see ``adapter_name``'s entries only: the other adapters' entries
    of the per-adapter containers of tuner layers and auxiliary wrappers (``lora_A["other"]``,
    ``modules_to_save["other"]``, ...) are hidden, and put back on exit.

    For what PEFT computes for one adapter -- ``get_peft_model_state_dict``, the device move and dtype
    upcast of a new adapter -- the result is the same, at a cost that does not grow with the adapters
    already loaded. PEFT 0.21 (peft/utils/save_and_load.py, ``get_peft_model_state_dict``) builds the
    whole model's state dict, then drops every key that names another loaded adapter
    (``_filter_state_dict_for_adapter_name``: ``".<other>."`` in it, or ending in ``".<other>"``) --
    unless that leaves nothing, when it keeps them all; every key below an entry keyed ``<other>``
    names it. An entry PEFT sets or replaces for ``adapter_name`` inside the block (an upcast
    parameter) is kept on exit.

    With ``injecting``, the block is PEFT adding ``adapter_name`` (not yet in ``peft_config``): its
    walks over the adapters already loaded -- ``set_adapter``'s ``requires_grad`` switches, the
    trainable marking -- then see none, so the meta injection's cost does not grow with them; the
    new entries PEFT adds to shared containers are kept on exit, after the old ones, as PEFT orders
    them. What PEFT would have switched on the hidden adapters is the caller's to set (a loader
    restores every existing ``requires_grad`` anyway).

    Yields:
        Whether anything is hidden: not when there is nothing to hide, for a prompt-learning adapter
        (PEFT filters nothing by name then), or when PEFT's filter would leave nothing (an adapter
        named like a module of every key) -- then PEFT must see everything.
    """
    from peft.utils.save_and_load import _filter_state_dict_for_adapter_name

    unwanted = [name for name in peft_model.peft_config if name != adapter_name]
    prompt_learning = any(config.is_prompt_learning for config in peft_model.peft_config.values())
    if not unwanted or prompt_learning:
        yield False
        return
    others = set(unwanted)
    hidden: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    try:
        for _, module in base_modules(peft_model):
            if not isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                continue
            for child in module._modules.values():
                if not isinstance(child, _PER_ADAPTER):
                    continue
                state = vars(child)
                # A ParameterDict also keeps its keys apart (``_keys``): hidden too, so that ``in``,
                # ``keys()`` and ``items()`` agree with what is shown.
                for slot in ("_modules", "_parameters", "_buffers", "_keys"):
                    entries = state.get(slot)
                    if not entries:
                        continue
                    drop = entries.keys() & others
                    if drop:
                        state[slot] = {k: v for k, v in entries.items() if k not in drop}
                        hidden.append((state, slot, entries))
        if injecting:
            yield True
            return
        # PEFT's own filter, one key at a time: the first key it keeps settles that it keeps some.
        keeps = any(
            _filter_state_dict_for_adapter_name({k: v}, unwanted) for k, v in peft_model.state_dict().items()
        )
        if not keeps:
            _put_back(hidden)
            hidden = []
        yield keeps
    finally:
        _put_back(hidden)


def _put_back(hidden: list[tuple[dict[str, Any], str, dict[str, Any]]]) -> None:
    for state, slot, entries in reversed(hidden):
        shown = state[slot]
        for key, value in shown.items():  # what PEFT set inside the block
            if key not in entries or entries[key] is not value:
                entries[key] = value
        state[slot] = entries


# --------------------------------------------------------------------------------------------------
# Hot-swapping (peft/utils/hotswap.py)
# --------------------------------------------------------------------------------------------------

# The helper PEFT 0.21 names in its messages for swapping adapters of other ranks and alphas into a
# compiled model: it pads every LoRA Linear / Conv2d ``lora_A`` / ``lora_B`` to ``target_rank`` with
# zeros and turns every ``scaling`` value into a 0-dim tensor (``_pad_lora_weights``,
# ``_convert_scalings_to_tensor``), so that later swaps write into the same tensors.
PREPARE_HOTSWAP = "peft.utils.hotswap.prepare_model_for_compiled_hotswap"


def hotswap_write(destination: torch.Tensor, value: torch.Tensor, *, conv_groups: int = 1) -> None:
    """Write ``value`` into ``destination`` as PEFT's ``hotswap_adapter_from_state_dict`` does.

    PEFT 0.21 (peft/utils/hotswap.py): equal shapes are a plain ``copy_``; a smaller ``value`` (a
    lower rank in a tensor padded by ``prepare_model_for_compiled_hotswap``) is written into a zeroed
    destination, at the start of dimension 0 if that one is smaller, else of dimension 1 -- for the
    ``lora_A`` of a grouped convolution, one rank block per group
    (``_copy_grouped_conv2d_lora_a_weights``). ``value`` must already have ``destination``'s dtype and
    device, and fit it (the caller checked); nothing is allocated.
    """
    from peft.utils.hotswap import _copy_grouped_conv2d_lora_a_weights

    if destination.shape == value.shape:
        destination.copy_(value)
    elif destination.shape[0] > value.shape[0]:
        destination.fill_(0)
        if conv_groups > 1:
            _copy_grouped_conv2d_lora_a_weights(destination, value, conv_groups)
        else:
            destination[: value.shape[0]].copy_(value)
    else:
        destination.fill_(0)
        destination[:, : value.shape[1]].copy_(value)


def all_linear_targets(config: PeftConfig, model: nn.Module) -> PeftConfig:
    """A copy of ``config`` with ``target_modules="all-linear"`` resolved against ``model`` as PEFT's
    ``inject_adapter`` resolves it (``_maybe_include_all_linear_layers``)."""
    resolved: PeftConfig = _maybe_include_all_linear_layers(copy.deepcopy(config), model)
    return resolved


@contextmanager
def intercept_load_state_dict(
    peft_model: PeftModel, handler: Callable[[Mapping[str, Any], bool, bool], Any]
) -> Iterator[None]:
    """Route the ``load_state_dict`` call PEFT's ``set_peft_model_state_dict`` makes on the
    ``PeftModel`` to ``handler(state_dict, strict, assign)`` for the duration of the block.

    ``set_peft_model_state_dict`` (peft/utils/save_and_load.py) remaps the file's keys onto the
    model and then calls ``model.load_state_dict`` exactly once: an instance attribute shadows the
    method, on this object only, so no other model or thread is affected.
    """
    peft_model.__dict__["load_state_dict"] = handler
    try:
        yield
    finally:
        peft_model.__dict__.pop("load_state_dict", None)


def remap_keys(tensors: Mapping[str, _V], key_mapping: Mapping[str, str]) -> tuple[dict[str, _V], list[str]]:
    """The file's keys renamed by ``key_mapping`` as ``load_peft_weights(key_mapping=...)`` renames them.

    PEFT 0.21 (peft/utils/save_and_load.py, ``load_peft_weights``) strips the ``base_model.model.``
    (or ``base_model.``) prefix, applies the first pattern of ``key_mapping`` (``re.subn``) that
    replaces anything, and puts the prefix back; a key with neither prefix makes PEFT raise a bare
    ``ValueError`` ("This should not happen").

    Returns:
        ``(renamed, unprefixed)``: the tensors under their new keys, and the keys that have neither
        prefix (left out of ``renamed``), sorted.
    """
    renamed: dict[str, _V] = {}
    unprefixed: list[str] = []
    for key, value in tensors.items():
        prefix = next((p for p in (SAVED_PREFIX, TUNER_PREFIX) if key.startswith(p)), None)
        if prefix is None:
            unprefixed.append(key)
            continue
        rest = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, rest)
            if count:
                rest = new
                break
        renamed[prefix + rest] = value
    return renamed, sorted(unprefixed)


def import_allowed(library: str) -> tuple[bool, list[str]]:
    """Whether PEFT's Auto classes may import ``library`` for a non-transformers base (``auto_mapping``),
    and PEFT's allowlist (``peft.auto.get_default_import_allowlist`` / ``check_import_allowlist``)."""
    from peft import auto as peft_auto

    untyped: Any = peft_auto
    allowlist: list[str] = untyped.get_default_import_allowlist()
    return bool(untyped.check_import_allowlist(allowlist, library)), allowlist


# --------------------------------------------------------------------------------------------------
# Where randomness lives in PEFT's modules (read by safe_lora._dropout_find)
# --------------------------------------------------------------------------------------------------

# Which children of a PEFT module start a subtree that belongs to an adapter (its dropout is the
# adapter's, not the base model's):
# - a tuner layer (``BaseTunerLayer``): every child but the wrapped layer, ``base_layer``
#   (peft/tuners/tuners_utils.py, ``BaseTunerLayer.base_layer``);
# - a tuner (``BaseTuner``): every child but the base model, ``model`` (``BaseTuner.__init__``), and
#   a nested tuner (X-LoRA holds a LoRA tuner, peft/tuners/xlora/model.py): the X-LoRA classifier or
#   a Shadow backbone are adapter machinery;
# - a ``PeftModel``: only ``prompt_encoder``, the ModuleDict of p-tuning / prefix-tuning encoders
#   keyed by adapter name (peft/peft_model.py, ``PeftModel.add_adapter`` / ``_setup_prompt_encoder``).
TUNER_LAYER_BASE_CHILD = "base_layer"
TUNER_BASE_CHILD = "model"
PROMPT_ENCODER_CHILD = "prompt_encoder"

# PVeRA's layers keep ``sample_at_inference`` as an ``{adapter: bool}`` dict: each adapter samples
# its weights while the layer trains, and whatever the mode when True (peft/tuners/pvera/layer.py,
# ``PveraLayer.update_layer`` and ``forward``: ``if not (self.training or
# self.sample_at_inference[adapter_name])``).
SAMPLE_AT_INFERENCE_ATTR = "sample_at_inference"

# LoRA's MonteCLoRA variant adds a ``ModuleDict`` of samplers under this name to the tuner layer;
# while the layer trains, each perturbs ``lora_A`` with sampled noise (peft/tuners/lora/variants.py,
# ``MontecloraLinearVariant.init`` and ``forward``: ``if module.training: ... = sampler()``).
MONTECLORA_SAMPLER_ATTR = "lora_monteclora_sampler"


def is_router(cls: type) -> bool:
    """Whether ``cls`` is one of PEFT's routers, which sample while training.

    PEFT 0.21's Poly (peft/tuners/poly/router.py, ``Router`` / ``PolyRouter``) draws
    RelaxedBernoulli routing weights when ``self.training``; matched by name under ``peft.`` so a
    router another tuner adds the same way is caught too.
    """
    return cls.__name__.endswith("Router") and cls.__module__.startswith("peft.")


# --------------------------------------------------------------------------------------------------
# Facts about the tuners
# --------------------------------------------------------------------------------------------------

# Rates that decide whether Dropout modules exist at all inside an ``nn.Sequential`` (X-LoRA's
# classifier): turning one to or from 0 adds or removes modules and shifts every later index, so the
# saved keys would no longer fit. Maps the config field to the tuner attribute holding those modules.
STRUCTURAL_RATES = {"xlora_dropout_p": "internal_xlora_classifier"}

# LoRA initialisations that only touch the adapter's own tensors. Every other string (PiSSA, CorDA,
# OLoRA, LoftQ, LoRA-GA, and any a newer PEFT adds) is assumed to rewrite the base weight.
_ADAPTER_ONLY_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica"})


def init_keeps_base(init: object) -> bool:
    """Whether a LoRA ``init_lora_weights`` value leaves the base weights alone (``True``,
    ``False``, ``"gaussian"``, ...); PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite them."""
    return isinstance(init, bool) or (isinstance(init, str) and init.lower() in _ADAPTER_ONLY_INITS)


def rewrites_base(config: PeftConfig) -> bool:
    """Whether injecting ``config`` recomputes the targets' base weights (PiSSA, OLoRA, KaSA, ...)."""
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and not init_keeps_base(init):
        return True
    return getattr(config, "kasa_config", None) is not None


def shapes_config(config: PeftConfig) -> PeftConfig:
    """A copy of ``config`` that gives the same adapter shapes without computing from the base weights.

    LoRA's ``init_lora_weights`` strings that rewrite the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA)
    decide values, never shapes: ``r`` and the targets do (peft/tuners/lora/layer.py,
    ``update_layer``). Checking shapes with PEFT's default init instead runs nothing on the base's
    values, which on the meta device (and on quantized weights) such inits cannot do.
    """
    init = getattr(config, "init_lora_weights", None)
    if not isinstance(init, str) or init_keeps_base(init):
        return config
    shaped = copy.copy(config)
    shaped.init_lora_weights = True  # type: ignore[attr-defined]
    return shaped


# Config fields naming something outside the adapter that PEFT reads while it injects, whatever the
# adapter's files hold: MultitaskPromptEmbedding.__init__ loads the source-task prompts
# (safetensors' load_file or torch.load) for its three source-task inits; ShadowModel downloads and
# instantiates the shadow backbone (AutoModel.from_pretrained) unless it is "mirror".
_SOURCE_TASK_INITS = frozenset({"AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"})


def external_reads(config: PeftConfig) -> dict[str, str]:
    """``{field: value}`` for each resource outside the adapter that PEFT would read to inject it."""
    kind = peft_type_name(config)
    reads = {}
    if kind == "MULTITASK_PROMPT_TUNING":
        init = getattr(config, "prompt_tuning_init", None)
        path = getattr(config, "prompt_tuning_init_state_dict_path", None)
        if str(getattr(init, "name", init)) in _SOURCE_TASK_INITS and path is not None:
            reads["prompt_tuning_init_state_dict_path"] = str(path)
    if kind == "SHADOW":
        shadow = getattr(config, "shadow_model", "mirror")
        if shadow != "mirror":
            reads["shadow_model"] = str(shadow)
    return reads


# Index buffers PEFT saves as integers: SHiRA, SuperTuning, UniLoRA (save_indices), FRoD
# (save_projection), VBLoRA (save_only_topk_weights).
INTEGER_SLOTS = frozenset(
    {
        "shira_indices",
        "supertuning_indices",
        "unilora_indices_A",
        "unilora_indices_B",
        "frod_s_indices",
        "frod_s_size",
        "vblora_logits_A_topk_indices",
        "vblora_logits_B_topk_indices",
    }
)
# Adapter tensors of tuners whose layers declare no parameter names, and VBLoRA's top-k weights.
FLOAT_TENSOR_NAMES = frozenset(
    {
        "prompt_embeddings",
        "prefix_task_cols",
        "prefix_task_rows",
        "adaption_gate",
        "adaption_prompt",
        "trainable_tokens_delta",
        "vblora_logits_A_topk_weights",
        "vblora_logits_B_topk_weights",
    }
)

# LoRA factors: which dimension of each is the rank (A is (r, in, ...), B is (out, r, ...)), and the
# pairs that only exist together.
LORA_RANK_DIM = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))

# How each tuner's injection runs when every tensor -- the base model's included -- is on the meta
# device (see safe_lora._attach). Most tuners build their layers from shapes alone. These compute
# from tensor values while injecting, which the meta device cannot give:
# - UniLoRA counts indices (``torch.bincount``) and BOFT reads a value (``Tensor.item()``) of tensors
#   it creates itself: their injection runs with the base model's tensors on the meta device, but
#   without forcing new tensors there (PEFT's own ``low_cpu_mem_usage`` path: parameters on meta).
# - SHiRA draws its sparse mask (``torch.nonzero``) and FRoD decomposes the base weights: their
#   injection needs the real base tensors (again with parameters on meta).
InjectionMode = Literal["meta", "meta-params", "real-base"]
INJECTION_MODES: dict[str, InjectionMode] = {
    "UNILORA": "meta-params",
    "BOFT": "meta-params",
    "SHIRA": "real-base",
    "FROD": "real-base",
}


# --------------------------------------------------------------------------------------------------
# Fields PEFT matches as regular expressions against module names
# --------------------------------------------------------------------------------------------------

# How PEFT 0.21 applies a pattern ``p`` to a module name ``key`` (read from tuners_utils.py
# ``check_target_module_exists``, utils/other.py ``get_pattern_key``, the tuners' model.py):
# - "fullmatch": ``re.fullmatch(p, key)`` (a ``str`` target_modules / exclude_modules /
#   feedforward_modules);
# - "suffix": ``re.match(rf"(.*\.)?({p})$", key)`` (rank_pattern, alpha_pattern and the like);
# - "dotted-suffix": ``re.match(rf".*\.{p}$", key)`` (FourierFT's n_frequency_pattern, C3A's
#   block_size_pattern);
# - "search": ``re.search(p, key)`` (OSF's rank_pattern);
# - "segment": ``re.match(rf"(^|.*\.){p}($|\..*)", key)`` (each modules_to_save entry, to keep
#   adapters off the modules saved whole);
# - "layer": ``re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)`` (each layers_pattern entry,
#   locating the layer index that layers_to_transform selects).
Template = Literal["fullmatch", "suffix", "dotted-suffix", "search", "segment", "layer"]


@dataclass(frozen=True)
class PatternField:
    """A config field PEFT reads as regular expression(s).

    Attributes:
        name: The field, e.g. ``"rank_pattern"``.
        template: How PEFT applies each pattern to a module name (see above).
        kind: Where the patterns are: ``"str"`` (the field itself, when it is a string), ``"keys"``
            (the keys of a dict) or ``"items"`` (the entries of a list, or the string itself).
        peft_types: The tuners that read the field this way (empty: every tuner with the field).
        not_for: Tuners that have a field of that name but do not read it as patterns.
    """

    name: str
    template: Template
    kind: Literal["str", "keys", "items"]
    peft_types: frozenset[str] = field(default_factory=frozenset)
    not_for: frozenset[str] = field(default_factory=frozenset)

    def applies_to(self, peft_type: str) -> bool:
        return (not self.peft_types or peft_type in self.peft_types) and peft_type not in self.not_for


# Adaption prompt's target_modules names an attribute (``getattr(parent, "self_attn")``), not a pattern.
_NOT_MATCHED = frozenset({"ADAPTION_PROMPT"})

PATTERN_FIELDS: tuple[PatternField, ...] = (
    PatternField("target_modules", "fullmatch", "str", not_for=_NOT_MATCHED),
    PatternField("exclude_modules", "fullmatch", "str", not_for=_NOT_MATCHED),
    PatternField("feedforward_modules", "fullmatch", "str", frozenset({"IA3"})),
    PatternField("modules_to_save", "segment", "items"),
    PatternField("layers_pattern", "layer", "items"),
    PatternField("n_frequency_pattern", "dotted-suffix", "keys", frozenset({"FOURIERFT"})),
    PatternField("block_size_pattern", "dotted-suffix", "keys", frozenset({"C3A"})),
    PatternField("rank_pattern", "search", "keys", frozenset({"OSF"})),
    # Every other ``*_pattern`` dict (LoRA, LoHa, LoKr, HiRA, DeLoRA's lambda_pattern, WaveFT, ...)
    # goes through get_pattern_key. AdaLoRA's rank_pattern maps parameter names to rank masks
    # (adalora/layer.py, mask_using_rank_pattern): names, not patterns.
    PatternField("*_pattern", "suffix", "keys", not_for=frozenset({"ADALORA"})),
)


# Fields of module names PEFT compares with every module name (``check_target_module_exists``: an entry
# selects a module it equals, or whose name ends with "." + the entry).
_LITERAL_LISTS = ("target_modules", "exclude_modules")


def literal_lists(config: PeftConfig) -> list[str]:
    """The fields of ``config`` that are lists (or sets) of module names PEFT matches as dotted suffixes."""
    if peft_type_name(config) in _NOT_MATCHED:
        return []
    return [
        name
        for name in _LITERAL_LISTS
        if isinstance(getattr(config, name, None), (list, set, frozenset, tuple))
    ]


def pattern_fields(config: PeftConfig) -> list[tuple[PatternField, str]]:
    """``(how PEFT reads it, field name)`` for every field of ``config`` that holds patterns."""
    peft_type = peft_type_name(config)
    found: list[tuple[PatternField, str]] = []
    names = [f for f in vars(config) if not f.startswith("_")]
    for name in names:
        value = getattr(config, name, None)
        if not value:
            continue
        spec = next(
            (
                p
                for p in PATTERN_FIELDS
                if (
                    p.name == name
                    or (p.name == "*_pattern" and name.endswith("_pattern") and name != "layers_pattern")
                )
                and p.applies_to(peft_type)
            ),
            None,
        )
        if spec is None:
            continue
        if spec.kind == "str" and not isinstance(value, str):
            continue
        if spec.kind == "keys" and not isinstance(value, dict):
            continue
        found.append((spec, name))
    return found


def complete_deferred(
    peft_model: nn.Module, adapter_name: str, *, skip: AbstractSet[nn.Module] = frozenset()
) -> dict[str, list[str]]:
    """Build what PEFT defers while an adapter's tensors are on the meta device; return, for each
    module path where that cannot be done, the names of the tensors PEFT will create there.

    PEFT 0.21's MonteCLoRA variant (peft/tuners/lora/variants.py, ``MontecloraLinearVariant.init``)
    skips creating its sampler when ``lora_A`` is on the meta device and creates it at the first
    forward; its tensors are saved all the same. The sampler reads values while it is built (its
    ``Wishart`` checks its arguments with ``Tensor.item()``), so it cannot be built on meta. Its
    tensors' *names* do not depend on its sizes: they are read from a sampler PEFT builds with every
    size 1 (a few bytes, on a forked RNG); their shapes are checked when PEFT's default path builds
    the real one.
    """
    from peft.tuners.lora.variants import MontecloraLinearVariant

    config = getattr(peft_model, "peft_config", {}).get(adapter_name)
    if getattr(config, "monteclora_config", None) is None:
        return {}  # only a LoRA config with MonteCLoRA gives its layers a sampler: no walk needed
    deferred: dict[nn.Module, list[str]] = {}
    for module in all_modules(peft_model, skip=skip):
        if not isinstance(module, BaseTunerLayer):
            continue  # the attributes below are a LoRA layer's (and reading a missing one raises)
        configs = getattr(module, "_lora_monteclora_config", None)
        samplers = getattr(module, MONTECLORA_SAMPLER_ATTR, None)
        if not isinstance(configs, dict) or not isinstance(samplers, nn.ModuleDict):
            continue
        if adapter_name in configs and adapter_name not in samplers:
            try:
                with on_meta():
                    layer: Any = module  # a LoRA Linear: the only layer PEFT gives these attributes
                    samplers[adapter_name] = MontecloraLinearVariant._create_sampler(
                        layer, adapter_name, configs[adapter_name]
                    )
            except (RuntimeError, NotImplementedError):
                deferred[module] = _sampler_tensor_names(configs[adapter_name])
    if not deferred:
        return {}
    return {
        f"{name}.{MONTECLORA_SAMPLER_ATTR}": deferred[module]
        for name, module in peft_model.named_modules()
        if module in deferred
    }


def _sampler_tensor_names(monteclora_config: Any) -> list[str]:
    from peft.tuners.lora.monteclora import MontecloraSampler

    with torch.random.fork_rng(devices=[]):
        tiny = MontecloraSampler(
            in_features=1,
            out_features=1,
            num_samples=1,
            use_entropy=monteclora_config.use_entropy,
            buffer_size=1,
            device="cpu",
            dtype=torch.float32,
        )
    return sorted(name for name, _ in (*tiny.named_parameters(), *tiny.named_buffers()))


def replicated_depth(config: PeftConfig) -> int | None:
    """How many layers LoRA's ``layer_replication`` builds (``replicate_layers``: one per index of every
    ``[start, end)`` range), or ``None`` without replication."""
    layer_map = getattr(config, "layer_replication", None)
    if not layer_map:
        return None
    return sum(max(0, int(end) - int(start)) for start, end in layer_map)


def module_names_matched(model: nn.Module, config: PeftConfig) -> list[str]:
    """The module names PEFT's ``inject_adapter`` matches ``config``'s patterns against.

    That is ``model.named_modules()`` after the tuner's ``_prepare_model``; in PEFT 0.21 only LoRA's
    changes the structure, replicating layers for ``layer_replication`` (``replicate_layers``), which
    here runs on a structural copy of ``model`` whose tensors are all on the meta device -- nothing
    of ``model`` is touched and nothing is allocated.
    """
    layer_map = getattr(config, "layer_replication", None)
    if not layer_map:
        return [name for name, _ in model.named_modules()]
    copy_ = skeleton(model, plain=True)  # names only: no parameter class needs to survive a deepcopy
    replicate_layers(copy_, layer_map)
    return [name for name, _ in copy_.named_modules()]


# --------------------------------------------------------------------------------------------------
# No-op rules: when a tuner's saved tensors alone show that loading it changes nothing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoOpRule:
    """How to tell from a tuner's saved tensors alone that it changes nothing.

    A factor is ``"slot"`` (the tensor is the slot), ``"slot.leaf"`` (e.g. ``"lora_B.weight"``) or
    ``"slot.*"`` (any leaf), matched against the key after the module path.

    Attributes:
        terms: Each term is a product of factors; in each module, every term present must have a
            factor that is all zero (LoRA's ``lora_B`` as it is initialised).
        ones: Factors that must be all one (multiplicative identities: IA3's scale, BOFT's ``s``).
        neutral: Slots whose values do not matter once the terms are zero (input factors, shared
            random projections, routers).
    """

    terms: tuple[tuple[str, ...], ...] = ()
    ones: tuple[str, ...] = ()
    neutral: tuple[str, ...] = ()
    slots: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        specs = [f for term in self.terms for f in term] + list(self.ones) + list(self.neutral)
        object.__setattr__(self, "slots", frozenset(s.split(".", 1)[0] for s in specs))

    def factor(self, slot: str, leaf: str) -> str | None:
        """The factor (or neutral slot) a tensor at ``slot`` / ``leaf`` is, or ``None`` if unknown."""
        if slot in self.neutral:
            return slot
        for spec in (*(f for term in self.terms for f in term), *self.ones):
            name, _, want = spec.partition(".")
            if name == slot and (want == leaf or want == "*"):
                return spec
        return None


_GLORA_TERMS = tuple(
    term
    for x in "ABCDE"
    for term in ((f"glora_{x}.Xd", f"glora_{x}.Xu"), (f"glora_{x}.X",), (f"glora_{x}.zeros",))
)

# Read from each tuner's layer code in peft/tuners/*/layer.py (init and forward). Tuners without a
# rule that can be judged from the file alone are left out: DoRA (the magnitude must equal the base
# weight's norm), HRA, OSF, PSOFT, FRoD, DeFT, AdaMSS (they reparametrise the base weight), LN
# tuning and modules_to_save (whole copies), trainable tokens (new embedding rows), VBLoRA,
# SHADOW, X-LoRA and the prompt-learning methods (they always change the input).
NOOP_RULES: dict[str, NoOpRule] = {
    # result + B(A(x)) * s (+ B's bias); embeddings: A is the zero-initialised one
    "LORA": NoOpRule(
        terms=(("lora_A.weight", "lora_B.weight"), ("lora_B.bias",), ("lora_embedding_A", "lora_embedding_B"))
    ),
    "ADALORA": NoOpRule(terms=(("lora_A", "lora_B", "lora_E"),)),  # B @ (A * E); E starts at zero
    "IA3": NoOpRule(ones=("ia3_l",)),  # the output (or input) scaled by l; l starts at one
    # (w1a @ w1b) * (w2a @ w2b), optionally with Tucker cores: every factor multiplies
    "LOHA": NoOpRule(terms=(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),)),
    # kron(w1 | w1_a @ w1_b, w2 | w2_a @ w2_b | t2 x w2_a x w2_b)
    "LOKR": NoOpRule(
        terms=(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),)
    ),
    "VERA": NoOpRule(terms=(("vera_lambda_b", "vera_lambda_d"),), neutral=("vera_A", "vera_B")),
    # lambda_d feeds a sampled latent (noise even at zero): only lambda_b silences it
    "PVERA": NoOpRule(terms=(("pvera_lambda_b",),), neutral=("pvera_lambda_d", "pvera_A", "pvera_B")),
    "RANDLORA": NoOpRule(
        terms=(("randlora_lambda", "randlora_gamma"),), neutral=("randlora_A", "randlora_B")
    ),
    "FOURIERFT": NoOpRule(terms=(("fourierft_spectrum",),)),
    "WAVEFT": NoOpRule(terms=(("waveft_spectrum",),)),
    "C3A": NoOpRule(terms=(("c3a_kernel",),)),
    "HIRA": NoOpRule(terms=(("hira_A", "hira_B"), ("hira_embedding_A", "hira_embedding_B"))),
    "GRALORA": NoOpRule(
        terms=(("gralora_A", "gralora_B"), ("gralora_A_general.weight", "gralora_B_general.weight"))
    ),
    "POLY": NoOpRule(terms=(("poly_lora_A", "poly_lora_B"),), neutral=("poly_router",)),
    "LILY": NoOpRule(terms=(("lily_A.weight", "lily_B.weight"),), neutral=("lily_router",)),
    "DELORA": NoOpRule(terms=(("delora_A", "delora_B", "delora_lambda"),), neutral=("delora_w_norm",)),
    "MISS": NoOpRule(terms=(("miss_block",),)),  # x-blocks @ miss, or W @ miss + miss ("bat")
    "PEANUT": NoOpRule(
        terms=(("peanut_B.weight",),), neutral=("peanut_A", "peanut_encoders", "peanut_decoders")
    ),
    "SHIRA": NoOpRule(terms=(("shira_weight",),), neutral=("shira_indices",)),
    "SUPERTUNING": NoOpRule(
        terms=(("supertuning_values",), ("supertuning_lora_A.weight", "supertuning_lora_B.weight")),
        neutral=("supertuning_indices",),
    ),
    # R = sum_i v_i P_i between B and A; the v vectors are shared by the whole model
    "TINYLORA": NoOpRule(terms=(("tinylora_v.*",),), neutral=("tinylora_A", "tinylora_B", "tinylora_P")),
    # A and B are gathered from the shared theta_d
    "UNILORA": NoOpRule(
        terms=(("unilora_theta_d",),),
        neutral=("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    ),
    "BEFT": NoOpRule(terms=(("beft_bias",),)),
    "GLORA": NoOpRule(terms=_GLORA_TERMS),  # W + W*A + B, b + b*D + E + W@C
    # rotations: a zero skew-symmetric generator is the identity
    "BOFT": NoOpRule(terms=(("boft_R",),), ones=("boft_s",)),
    "OFT": NoOpRule(terms=(("oft_R.weight",), ("oft_embedding_R.weight",))),
    "ROAD": NoOpRule(terms=(("road_theta",),), ones=("road_alpha",)),
    "ADAPTION_PROMPT": NoOpRule(terms=(("adaption_gate",),), neutral=("adaption_prompt",)),
}


# --------------------------------------------------------------------------------------------------
# The transformers Auto class PEFT's AutoPeftModelFor* picks for each task type (peft/auto.py)
# --------------------------------------------------------------------------------------------------

TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def installed_peft() -> str:
    """The installed PEFT's version string."""
    return str(peft.__version__)
