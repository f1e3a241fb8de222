"""``load_adapter(..., replace=True)``: new weights swapped into a loaded adapter, in place -- or a
refusal that changes nothing.

The order is PEFT's ``hotswap_adapter`` made transactional: every check first -- the tuner, the
config (targets, ranks and variant named as such, whatever the keys say), PEFT's own mapping of the
file's keys onto the adapter's tensors, their shapes -- then the writes, undone exactly if anything
interrupts them half way.

On a model prepared with PEFT's ``prepare_model_for_compiled_hotswap(model, target_rank=R)`` the
LoRA tensors are zero-padded to rank ``R`` and every ``scaling`` is a 0-dim tensor: an adapter of any
rank up to ``R`` and any alpha is then written into the same tensors, padded exactly as PEFT pads,
and its scalings into the same scaling tensors, so a ``torch.compile``d model does not recompile.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from torch import nn

from safe_lora._config import dropout_rates
from safe_lora._fit import expected_state
from safe_lora._loading import _Plan
from safe_lora._meta import MetaTwins
from safe_lora._patterns import pattern_key, resolve_patterns
from safe_lora._peft import (
    LORA_RANK_DIM,
    PREPARE_HOTSWAP,
    WRAPPED_CHILDREN,
    AuxiliaryTrainingWrapper,
    BaseTunerLayer,
    BufferDict,
    all_linear_targets,
    base_modules,
    check_target_module_exists,
    hotswap_write,
    init_keeps_base,
    intercept_load_state_dict,
    peft_type_name,
)
from safe_lora._rollback import tensor_at
from safe_lora._unwrap import base_of
from safe_lora.errors import AdapterConfigError, AdapterWeightsError, _fmt_keys

__all__ = ["replace"]


# --------------------------------------------------------------------------------------------------
# The configs
# --------------------------------------------------------------------------------------------------

# Fields a replacement may change: bookkeeping, and the dropout rates (they follow the adapter's kind,
# as for a new adapter).
_BOOKKEEPING = frozenset(
    {
        "inference_mode",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "runtime_config",
        "auto_mapping",
    }
)
# Fields that decide which modules are adapted: compared by the modules they select on this model
# (PEFT rewrites them in the loaded config: "all-linear" into names, a list into a set).
_TARGET_FIELDS = frozenset(
    {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "target_parameters"}
)
# For LoRA, compared layer by layer against the loaded tensors and scalings instead of as written:
# alpha is free (the scalings are rewritten), the rank must fit the tensors.
_LORA_ALPHA = frozenset({"lora_alpha", "alpha_pattern"})
_LORA_RANK = frozenset({"r", "rank_pattern"})
# Compared through the keys of the file (PEFT adds a task's head to the loaded config's list).
_BY_KEYS = frozenset({"modules_to_save"})


def _comparable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, list, tuple)) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _field_changes(old: PeftConfig, new: PeftConfig, *, lora: bool) -> list[tuple[str, str]]:
    """``(field, "field: loaded X, new Y")`` for the fields written differently that a replacement in
    place cannot honour, sorted; targets and (for LoRA) ranks and alphas are compared elsewhere."""
    free = _BOOKKEEPING | _TARGET_FIELDS | _BY_KEYS | set(dropout_rates(old)) | set(dropout_rates(new))
    if lora:
        free |= _LORA_ALPHA | _LORA_RANK
    changed = []
    for f in dataclasses.fields(old):
        if f.name in free:
            continue
        a, b = _comparable(getattr(old, f.name, None)), _comparable(getattr(new, f.name, None))
        if f.name == "init_lora_weights" and init_keeps_base(a) and init_keeps_base(b):
            continue  # the init is overwritten by the loaded values, unless it rewrote the base
        if a != b:
            changed.append((f.name, f"{f.name}: loaded {a!r}, new {b!r}"))
    return sorted(changed)


def _targeted(model: PeftModel, config: PeftConfig, names: list[tuple[str, nn.Module]]) -> set[str]:
    """The module names ``config`` adapts on ``model``, by PEFT's own matching (``all-linear``
    resolved as PEFT resolves it on a model that already holds adapters)."""
    probe = all_linear_targets(config, base_of(model))
    parameters = tuple(getattr(probe, "target_parameters", None) or ())
    return {
        key
        for key, module in names
        if key
        and (
            check_target_module_exists(probe, key)
            or any(f"{key}.{p}".endswith(parameters) for p in module._parameters if parameters)
        )
    }


def _target_change(model: PeftModel, old: PeftConfig, new: PeftConfig) -> str | None:
    """``"targets: ..."`` when ``new`` adapts other modules than ``old`` on this model, else ``None``."""
    if all(_comparable(getattr(old, f, None)) == _comparable(getattr(new, f, None)) for f in _TARGET_FIELDS):
        return None
    names = list(base_modules(model))
    try:
        before, after = _targeted(model, old, names), _targeted(model, new, names)
    except Exception:  # a config PEFT cannot match here: the keys of the file will speak
        return None
    if before == after:
        return None
    only_new, only_old = sorted(after - before), sorted(before - after)
    parts = []
    if only_new:
        parts.append(f"only new: [{_fmt_keys(only_new)}]")
    if only_old:
        parts.append(f"only loaded: [{_fmt_keys(only_old)}]")
    return f"targets: loaded adapts {len(before)} module(s), new {len(after)} ({', '.join(parts)})"


# --------------------------------------------------------------------------------------------------
# Where the adapter lives
# --------------------------------------------------------------------------------------------------

_CONTAINERS = (nn.ModuleDict, nn.ParameterDict, BufferDict)


@dataclasses.dataclass
class _Slot:
    """One tensor of the adapter: the tuner layer (or wrapper, or tuner) holding it, and where."""

    tensor: torch.Tensor
    owner: nn.Module
    container: str  # e.g. "lora_A"
    leaf: str  # the tensor's name inside the entry ("weight"), "" when the entry is the tensor


@dataclasses.dataclass
class _Holding:
    """Where adapter ``name`` lives in a model, found in one walk of it."""

    layers: list[tuple[str, nn.Module]]  # (name in the base model, tuner layer holding the adapter)
    slots: dict[int, _Slot]  # every parameter and buffer of the adapter, by identity
    merged: bool


def _holds(layer: nn.Module, name: str) -> bool:
    """Whether a tuner layer holds anything of adapter ``name``: what
    :func:`safe_lora._peft.layer_adapters` lists, looked up without listing (this runs per layer)."""
    cls: Any = type(layer)
    modules: dict[str, Any] = layer._modules
    state = vars(layer)
    for attr in cls.adapter_layer_names:
        holder = modules.get(attr)
        if holder is not None and name in holder:
            return True
    for attr in cls.other_param_names:
        holder = state.get(attr)
        if isinstance(holder, dict) and name in holder:
            return True
    return False


def _entry_tensors(entry: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter and buffer of an adapter's entry, by hand: entries are
    mostly single layers, and ``named_parameters()`` costs more than the walk for each of them."""
    found: list[tuple[str, torch.Tensor]] = []
    pending: list[tuple[str, nn.Module]] = [("", entry)]
    while pending:
        prefix, module = pending.pop()
        for slot in (module._parameters, module._buffers):
            for leaf, tensor in slot.items():
                if tensor is not None:
                    found.append((prefix + leaf, tensor))
        pending.extend(
            (f"{prefix}{key}.", child) for key, child in module._modules.items() if child is not None
        )
    return found


def _holding(model: PeftModel, name: str) -> _Holding:
    holding = _Holding([], {}, False)
    owners: list[nn.Module] = [model.base_model]
    for key, module in base_modules(model):
        layer: Any = module  # a tuner layer is an nn.Module *and* a BaseTunerLayer
        if isinstance(layer, BaseTunerLayer):
            owners.append(module)
            if _holds(module, name):
                holding.merged = holding.merged or name in layer.merged_adapters
                holding.layers.append((key, module))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            owners.append(module)
    slots = holding.slots
    for owner in owners:
        for child_name, child in owner._modules.items():
            if child_name in WRAPPED_CHILDREN or not isinstance(child, _CONTAINERS) or name not in child:
                continue
            entry = child[name]
            if isinstance(entry, torch.Tensor):
                slots[id(entry)] = _Slot(entry, owner, child_name, "")
                continue
            for leaf, tensor in _entry_tensors(entry):
                slots[id(tensor)] = _Slot(tensor, owner, child_name, leaf)
    return holding


def _prepared(layer: nn.Module, name: str) -> bool:
    """Whether PEFT's ``prepare_model_for_compiled_hotswap`` turned the layer's scaling into a tensor."""
    scaling = getattr(layer, "scaling", None)
    return isinstance(scaling, dict) and isinstance(scaling.get(name), torch.Tensor)


def _capacity(layer: nn.Module, name: str) -> int | None:
    """The rank the layer's LoRA tensors hold for ``name`` (padded on a prepared model)."""
    for container in ("lora_A", "lora_embedding_A"):
        holder = getattr(layer, container, None)
        if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and name in holder:
            entry = holder[name]
            tensor = entry if isinstance(entry, torch.Tensor) else getattr(entry, "weight", None)
            if isinstance(tensor, torch.Tensor):
                return int(tensor.shape[LORA_RANK_DIM[container]])
    rank = getattr(layer, "r", {}).get(name) if isinstance(getattr(layer, "r", None), dict) else None
    return int(rank) if isinstance(rank, int) else None


# --------------------------------------------------------------------------------------------------
# LoRA: ranks and scalings, layer by layer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _LoraLayer:
    """What the new config asks of one LoRA layer."""

    key: str
    layer: nn.Module
    rank: int  # the new adapter's rank here
    capacity: int | None  # what the loaded tensors hold
    prepared: bool
    alpha: float
    scaling: float  # PEFT's formula: alpha / rank, or alpha / sqrt(rank) with rsLoRA


def _lora_layers(holding: _Holding, name: str, config: PeftConfig) -> list[_LoraLayer]:
    r_default: int = getattr(config, "r", 8)
    alpha_default: float = getattr(config, "lora_alpha", 8)
    # The patterns decided once over the layers' names, with a time bound (PEFT's get_pattern_key
    # would match them with none), against the names PEFT matched them with at injection.
    resolved = resolve_patterns(config, [key for key, _ in holding.layers])
    rank_pattern: dict[str, int] = dict(getattr(resolved, "rank_pattern", None) or {})
    alpha_pattern: dict[str, float] = dict(getattr(resolved, "alpha_pattern", None) or {})
    rslora = bool(getattr(config, "use_rslora", False))
    found = []
    for key, layer in holding.layers:
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or name not in scaling:
            continue
        rank = rank_pattern.get(pattern_key(rank_pattern, key), r_default)
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, key), alpha_default)
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        found.append(
            _LoraLayer(key, layer, rank, _capacity(layer, name), _prepared(layer, name), alpha, scale)
        )
    return found


def _rank_changes(layers: list[_LoraLayer]) -> list[str]:
    """How the new ranks do not fit the loaded tensors: a different rank (unprepared) or one above the
    padded rank (prepared), grouped by (loaded, new)."""
    groups: dict[tuple[bool, int | None, int], list[str]] = {}
    for item in layers:
        if item.capacity is None:
            continue
        if item.rank == item.capacity or (item.prepared and item.rank < item.capacity):
            continue
        groups.setdefault((item.prepared, item.capacity, item.rank), []).append(item.key)
    changes = []
    everywhere = len(layers)
    for (prepared, capacity, rank), keys in sorted(groups.items(), key=lambda g: g[0][1:]):
        where = "" if len(keys) == everywhere else f" in {_fmt_keys(keys)}"
        if prepared:
            changes.append(f"r: new {rank}, above the rank {capacity} the model was prepared for{where}")
        else:
            changes.append(f"r: loaded {capacity}, new {rank}{where}")
    return changes


# --------------------------------------------------------------------------------------------------
# PEFT's mapping of the file's keys
# --------------------------------------------------------------------------------------------------


class _Remapped(Exception):
    """Carries the state dict PEFT was about to load, so that nothing is loaded."""

    def __init__(self, state_dict: dict[str, Any]) -> None:
        super().__init__("remapped")
        self.state_dict = state_dict


def _peft_mapping(model: PeftModel, tensors: dict[str, torch.Tensor], name: str) -> dict[str, Any]:
    """The file's keys as PEFT maps them onto the model for ``name`` -- PEFT's own mapping (tuner
    renames, modules_to_save, transformers conversions), run up to the point where it would load."""

    def capture(state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        raise _Remapped(dict(state_dict))

    try:
        with intercept_load_state_dict(model, capture):
            set_peft_model_state_dict(model, tensors, adapter_name=name)
    except _Remapped as done:
        return done.state_dict
    raise AssertionError("PEFT's set_peft_model_state_dict did not call load_state_dict")  # pragma: no cover


# PEFT's mapping of a file's key set onto adapter ``name`` of a model -- model key -> file key --
# kept when it only renames (every value PEFT would load is the file's own tensor). The next
# checkpoint of a run has the same keys, and PEFT's remapping walks the whole model (a state_dict()
# included): the largest part of a replacement's cost. A kept mapping is held to the same checks as
# a fresh one on every use, and PEFT's is asked again whenever it fails them.
_MAPPINGS: weakref.WeakKeyDictionary[PeftModel, dict[tuple[str, frozenset[str]], dict[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def _mapping(
    model: PeftModel, tensors: dict[str, torch.Tensor], name: str, *, fresh: bool
) -> tuple[dict[str, tuple[str, Any]], bool, bool]:
    """``({model key: (file key, value)}, renames_only, was_kept)``: the kept mapping unless ``fresh``."""
    kept = None if fresh else _MAPPINGS.get(model, {}).get((name, frozenset(tensors)))
    if kept is not None:
        return {model_key: (file_key, tensors[file_key]) for model_key, file_key in kept.items()}, True, True
    file_key = {id(v): k for k, v in tensors.items()}
    mapped: dict[str, tuple[str, Any]] = {}
    renames = True
    for model_key, value in _peft_mapping(model, tensors, name).items():
        source = file_key.get(id(value))
        if source is None:  # a value PEFT made or converted: the mapping is more than renaming
            renames = False
        mapped[model_key] = (source or model_key, value)
    return mapped, renames, False


def _keep_mapping(
    model: PeftModel, tensors: dict[str, torch.Tensor], name: str, mapped: dict[str, Any]
) -> None:
    kept = _MAPPINGS.setdefault(model, {})
    kept.clear()  # one file layout per model is what a serving loop swaps; no growth
    kept[(name, frozenset(tensors))] = {model_key: file_key for model_key, (file_key, _) in mapped.items()}


# --------------------------------------------------------------------------------------------------
# Fitting the file's tensors into the adapter's
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Write:
    destination: torch.Tensor
    value: torch.Tensor
    conv_groups: int = 1


@dataclasses.dataclass
class _Fit:
    writes: list[_Write] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    wrong_dtypes: dict[str, str] = dataclasses.field(default_factory=dict)
    # Tensors of the adapter no key fills, and of those the keys save_pretrained writes: a tensor PEFT
    # does not save (AdaLoRA's ranknum, set from r) keeps its value, as a fresh load leaves it at its.
    unfilled: list[torch.Tensor] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.mismatched or self.wrong_dtypes or self.missing)


def _paddable(slot: _Slot, value: torch.Tensor, name: str) -> bool:
    """Whether ``value`` fits ``slot`` zero-padded along the rank: a LoRA factor of a layer prepared
    by PEFT's ``prepare_model_for_compiled_hotswap``, the rank no larger, every other size the same."""
    dim = LORA_RANK_DIM.get(slot.container)
    if dim is None or slot.leaf not in ("weight", "") or not _prepared(slot.owner, name):
        return False
    have, want = tuple(value.shape), tuple(slot.tensor.shape)
    return (
        len(have) == len(want)
        and have[dim] <= want[dim]
        and all(h == w for i, (h, w) in enumerate(zip(have, want, strict=True)) if i != dim)
    )


def _conv_groups(slot: _Slot) -> int:
    """PEFT's condition for the grouped copy of a convolution's ``lora_A`` (peft/utils/hotswap.py)."""
    if slot.container != "lora_A" or not isinstance(slot.owner, BaseTunerLayer):
        return 1
    base = slot.owner.get_base_layer()
    return int(base.groups) if isinstance(base, nn.Conv2d) else 1


def _fit(
    model: PeftModel,
    holding: _Holding,
    mapped: dict[str, tuple[str, Any]],
    name: str,
    header: Mapping[str, Any],
) -> _Fit:
    fit = _Fit()
    filled: set[int] = set()
    for model_key, (file_key, value) in mapped.items():
        tensor, _, _ = tensor_at(model, model_key)
        slot = holding.slots.get(id(tensor)) if tensor is not None else None
        if slot is None or not isinstance(value, torch.Tensor):
            fit.unexpected.append(file_key)
            continue
        if value.is_floating_point() != slot.tensor.is_floating_point():
            fit.wrong_dtypes[file_key] = str(value.dtype).removeprefix("torch.")
            continue
        if value.shape != slot.tensor.shape and not _paddable(slot, value, name):
            fit.mismatched[file_key] = (tuple(value.shape), tuple(slot.tensor.shape))
            continue
        fit.writes.append(_Write(slot.tensor, value, _conv_groups(slot)))
        filled.add(id(slot.tensor))
    fit.unfilled = [slot.tensor for key, slot in holding.slots.items() if key not in filled]
    if fit.unfilled:
        fit.missing = _missing_keys(model, name, header)
    return fit


def _missing_keys(model: PeftModel, name: str, header: Mapping[str, Any]) -> list[str]:
    """The keys ``save_pretrained`` would write for the loaded adapter that the file lacks -- read with
    meta twins standing in, so no real ``state_dict()`` runs."""
    twins = MetaTwins(model)
    try:
        expected = expected_state(model, name, file_keys=set(header))
    finally:
        twins.restore(model)
    return sorted(set(expected.shapes) - set(header))


# --------------------------------------------------------------------------------------------------
# Dropout rates
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rate:
    """One dropout rate to set on one layer: ``holder[adapter] = rate`` in some form."""

    layer: nn.Module
    attribute: str
    adapter: str
    rate: float

    def apply(self) -> None:
        holder = getattr(self.layer, self.attribute)
        current = holder[self.adapter]
        if isinstance(holder, nn.ModuleDict):
            if isinstance(current, nn.Dropout):
                current.p = self.rate
            elif self.rate > 0:
                fresh = nn.Dropout(p=self.rate)
                fresh.train(current.training)
                holder[self.adapter] = fresh
        else:
            holder[self.adapter] = self.rate


def _rate_updates(holding: _Holding, name: str, old: PeftConfig, new: PeftConfig) -> list[_Rate]:
    """Where each changed dropout rate lives in the layers; refuses a rate with no home."""
    before, after = dropout_rates(old), dropout_rates(new)
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    updates: list[_Rate] = []
    homeless = set(changed)
    for _, layer in holding.layers:
        for attribute, rate in changed.items():
            holder = getattr(layer, attribute, None)
            if isinstance(holder, (nn.ModuleDict, dict)) and name in holder:
                updates.append(_Rate(layer, attribute, name, rate))
                homeless.discard(attribute)
    if homeless:
        raise AdapterConfigError(
            f"Cannot replace adapter {name!r} in place: its dropout rate(s) {sorted(homeless)} change "
            f"({', '.join(f'{k}: {before.get(k)} -> {changed[k]}' for k in sorted(homeless))}) and the "
            f"layers keep no per-adapter rate to update — expected the same rates — load the new "
            f"weights under a new adapter_name instead.",
            fields=sorted(homeless),
        )
    return updates


# --------------------------------------------------------------------------------------------------
# The replacement
# --------------------------------------------------------------------------------------------------


def replace(model: PeftModel, plan: _Plan) -> None:
    """Swap ``plan``'s weights into the loaded adapter of the same name, in place, or refuse.

    Every check runs before the first write, and every allocation (a value converted to its
    destination's dtype or device) too. The writes are ``copy_`` into each existing tensor (what
    ``load_state_dict`` does), zero-padded as PEFT's ``hotswap_adapter`` pads on a prepared model, and
    ``fill_`` into the scaling tensors PEFT's ``prepare_model_for_compiled_hotswap`` made; the old
    values are kept until the whole swap is done, so even a ``KeyboardInterrupt`` half way puts them
    back.

    Raises:
        AdapterConfigError: Another tuner, a prompt-learning adapter, a merged adapter, or a config
            that differs in what a swap in place cannot honour -- targets, ranks (above the padded
            rank on a prepared model), variant -- named field by field (``fields``).
        AdapterWeightsError: The file's keys do not fit the adapter's tensors: ``missing_keys``,
            ``unexpected_keys``, ``mismatched_keys`` (``{key: (shape in file, shape loaded)}``),
            ``wrong_dtypes``.
    """
    name = plan.name
    old = model.peft_config[name]
    new = copy.deepcopy(plan.config)
    new.inference_mode = old.inference_mode
    where = plan.adapter.source.label
    assert plan.adapter.weights is not None
    tensors = plan.adapter.weights.tensors
    weights_path = plan.adapter.weights_path

    def refuse(reason: str, *, fields: Sequence[str] = (), hint: str = "") -> AdapterConfigError:
        return AdapterConfigError(
            f"Cannot replace adapter {name!r} in place with the one in {where}: {reason} — load it "
            f"under a new adapter_name instead{hint}.",
            path=plan.adapter.source.where("adapter_config.json"),
            fields=fields,
        )

    if peft_type_name(old) != peft_type_name(new):
        raise refuse(
            f"expected a {peft_type_name(old)} adapter, found {peft_type_name(new)}", fields=["peft_type"]
        )
    if new.is_prompt_learning:
        raise refuse("prompt-learning adapters are not swapped in place")
    holding = _holding(model, name)
    if holding.merged:
        raise refuse("it is merged into the base weights (call model.unmerge_adapter() first)")

    # The configs: every difference a swap in place cannot honour, named, before any key is looked at.
    # LoRA's own layers only: AdaLoRA shares the "lora_" prefix, not the scaling formula
    # (peft/tuners/adalora/layer.py: scaling = lora_alpha, or r when alpha is 0).
    lora = peft_type_name(old) == "LORA"
    layers = _lora_layers(holding, name, new) if lora else []
    changes: list[tuple[str, str]] = []
    target_change = _target_change(model, old, new)
    if target_change is not None:
        changes.append(("target_modules", target_change))
    ranks = _rank_changes(layers)
    changes += [("r", change) for change in ranks]
    changes += _field_changes(old, new, lora=lora)
    if changes:
        hint = ""
        if any(change.startswith("r: loaded") for change in ranks):
            hint = (
                f"; to swap adapters of other ranks (and alphas) into one model -- compiled or not -- "
                f"prepare it once, after loading and before compiling, with {PREPARE_HOTSWAP}(model, "
                f"target_rank=<the largest rank>): then any rank up to that one is swapped in place"
            )
        raise refuse(
            f"the configs differ in {'; '.join(text for _, text in changes)} — expected the same tuner, "
            f"targets, ranks (up to the padded rank on a model prepared for hot-swapping) and variant",
            fields=sorted({field for field, _ in changes}),
            hint=hint,
        )
    rates = _rate_updates(holding, name, old, new)

    # The keys: where each file key goes, by PEFT's own mapping; every key must land in a tensor of
    # this adapter and fit it, and every tensor of the adapter must get one.
    mapped, renames, kept = _mapping(model, tensors, name, fresh=False)
    header = plan.adapter.header
    fit = _fit(model, holding, mapped, name, header)
    if not fit.ok and kept:
        mapped, renames, _ = _mapping(model, tensors, name, fresh=True)  # the model changed: ask PEFT
        fit = _fit(model, holding, mapped, name, header)
    if not fit.ok:
        problems = []
        if fit.missing:
            problems.append(f"missing {len(fit.missing)} key(s): {_fmt_keys(fit.missing)}")
        if fit.unexpected:
            problems.append(f"{len(fit.unexpected)} unexpected key(s): {_fmt_keys(fit.unexpected)}")
        if fit.mismatched:
            shapes = (f"{k} {list(a)} vs {list(b)}" for k, (a, b) in fit.mismatched.items())
            problems.append(
                f"{len(fit.mismatched)} key(s) of another shape (file vs loaded): {_fmt_keys(shapes)}"
            )
        if fit.wrong_dtypes:
            dtypes = (f"{k} ({d})" for k, d in fit.wrong_dtypes.items())
            problems.append(f"{len(fit.wrong_dtypes)} key(s) of another kind of dtype: {_fmt_keys(dtypes)}")
        raise AdapterWeightsError(
            f"Cannot replace adapter {name!r} in place from {weights_path!r}: {'; '.join(problems)} — "
            f"expected the loaded adapter's keys, shapes and dtypes (ranks up to the padded one on a "
            f"model prepared for hot-swapping) — load it under a new adapter_name instead.",
            path=weights_path,
            missing_keys=fit.missing,
            unexpected_keys=fit.unexpected,
            mismatched_keys=fit.mismatched,
            wrong_dtypes=fit.wrong_dtypes,
        )
    if renames:
        _keep_mapping(model, tensors, name, mapped)

    # Every allocation before the first write: values in their destination's dtype and device.
    for write in fit.writes:
        destination, value = write.destination, write.value
        if value.dtype != destination.dtype or value.device != destination.device:
            write.value = value.to(device=destination.device, dtype=destination.dtype)

    old_values = [(write.destination, write.destination.detach().clone()) for write in fit.writes]
    old_scalings = [(item.layer, dict(getattr(item.layer, "scaling", {}))) for item in layers]
    old_tensor_scalings = [
        (scaling, scaling.detach().clone())
        for item in layers
        if isinstance(scaling := item.layer.scaling[name], torch.Tensor)  # type: ignore[index]
    ]
    old_alpha = [(item.layer, dict(getattr(item.layer, "lora_alpha", {}))) for item in layers]
    try:
        with torch.no_grad():
            for write in fit.writes:
                hotswap_write(write.destination, write.value, conv_groups=write.conv_groups)
            for item in layers:
                scaling_dict: Any = item.layer.scaling
                current = scaling_dict[name]
                if isinstance(current, torch.Tensor):
                    current.fill_(item.scaling)  # the same tensor: a compiled model reads it anew
                else:
                    scaling_dict[name] = item.scaling
                alphas: Any = getattr(item.layer, "lora_alpha", None)
                if isinstance(alphas, dict):
                    alphas[name] = item.alpha
    except BaseException:
        with torch.no_grad():
            for tensor, value in old_values:
                tensor.copy_(value)
            for tensor, value in old_tensor_scalings:
                tensor.copy_(value)
        for module, saved in old_scalings:
            scaling_dict = module.scaling
            scaling_dict.clear()
            scaling_dict.update(saved)
        for module, saved in old_alpha:
            alphas = getattr(module, "lora_alpha", None)
            if isinstance(alphas, dict):
                alphas.clear()
                alphas.update(saved)
        raise
    for update in rates:
        update.apply()
    # The same parameters: an optimizer holding them goes on training the new values.
    model.peft_config[name] = new
