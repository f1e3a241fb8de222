"""Freeze adapter dropout for a block and restore every module's mode exactly; find live dropout.

``model.eval()`` / ``model.train()`` flip *every* module and so undo modules a user froze on purpose;
PEFT's ``disable_adapter`` re-enables everything on exit; setting ``p=0`` is permanent and misses
dropout that is not an ``nn.Dropout``. :class:`deterministic_lora` instead turns off only the
``training`` flag of the modules that gate adapter randomness, and on exit puts back the flag each
module of the model had at entry, one module at a time.

What gates randomness in PEFT (checked against peft 0.21's tuner ``layer.py`` files):

* ``nn.Dropout`` modules in ``ModuleDict`` children of a tuner layer (``lora_dropout``,
  ``vera_dropout``, ``hira_dropout``, ...) and OFT/BOFT's ``MultiplicativeDropoutLayer`` -- gated
  by the dropout module's own flag.
* LoHa/LoKr ``rank_dropout`` / ``module_dropout``: plain float rates in dicts, gated by the tuner
  *layer's* own flag; the site is the layer itself (never its ``base_layer``).
* PVeRA's reparametrisation sampling and LoRA's MonteCLoRA sampler: gated by the layer's flag
  (PVeRA with ``sample_at_inference=True`` samples regardless and cannot be frozen).
* Poly's router: RelaxedBernoulli sampling gated by the router module's flag.
* The X-LoRA classifier's and p-tuning's prompt-encoder dropout, and a Shadow backbone's dropout.

Base-model dropout is found the same way: ``nn.Dropout``-like modules, modules holding a float
rate whose attribute name contains ``drop`` (``attention_dropout``, ``layerdrop``, ``dropout`` of
``nn.MultiheadAttention`` / ``nn.LSTM``, ...) and attention modules that read a child dropout's
``p`` behind their own flag (GPT-2, BERT with SDPA).
"""

from __future__ import annotations

import functools
import operator
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, ParamSpec, TypeGuard, TypeVar

from peft import PeftModel
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.hooks import RemovableHandle

from safe_lora._peft import BaseTuner, BaseTunerLayer
from safe_lora._unwrap import unwrap as _unwrap
from safe_lora.errors import NoAdapterWarning, NondeterministicModelError, StochasticAdapterWarning

__all__ = ["DropoutSite", "assert_deterministic", "deterministic_lora", "live_dropout"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

Kind = Literal["adapter", "base"]

# Path components that wrappers insert into qualified names. They are reserved names, so removing
# them anywhere never clashes with a user's own submodule names.
_WRAPPER_TOKENS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

# Sampling-based adapters have no rate; report them with p=1.0 (noise on every forward pass).
_SAMPLING_P = 1.0


@dataclass(frozen=True)
class DropoutSite:
    """One place that makes a forward pass stochastic.

    Attributes:
        name: Qualified module name, without wrapper prefixes (``module.``, ``_orig_mod.``,
            ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``).
        kind: ``"adapter"`` for dropout that belongs to a PEFT adapter, ``"base"`` for the base
            model's own.
        p: The rate; ``1.0`` for adapters that sample noise on every pass (PVeRA, MonteCLoRA, Poly).
        module_type: The module's class name, e.g. ``"Dropout"`` or ``"Linear"`` (a LoHa layer).
        attribute: What holds the rate, e.g. ``"p"``, ``"rank_dropout['default']"`` or
            ``"attention_dropout"``.
        adapter: The adapter name when the rate belongs to one adapter, else ``None``.
        freezable: ``False`` when the module samples whatever its mode (PVeRA with
            ``sample_at_inference=True``); :class:`deterministic_lora` cannot turn it off.

    Example:
        >>> [s.name for s in live_dropout(peft_model)]  # doctest: +SKIP
        ['base_model.model.fc1.lora_dropout.default']
    """

    name: str
    kind: Kind
    p: float
    module_type: str
    attribute: str = "p"
    adapter: str | None = None
    freezable: bool = True

    def describe(self) -> str:
        """One line for error messages: ``name (kind, Type.attribute, p=0.5)``."""
        extra = "" if self.freezable else ", samples even in eval mode"
        where = f"{self.module_type}.{self.attribute}"
        return f"{self.name or '<root>'} ({self.kind}, {where}, p={self.p:g}{extra})"


class _Found(NamedTuple):
    """A site, the module whose ``training`` flag gates it, and the tuner layer that calls it."""

    site: DropoutSite
    gate: nn.Module
    owner: nn.Module | None  # the nearest tuner layer at or above the gate; None outside one


# --------------------------------------------------------------------------------------------------
# Walking the model
# --------------------------------------------------------------------------------------------------
#
# ``deterministic_lora`` walks the whole model on every entry, so the walk has to cost little next
# to a ``model.eval(); model.train()`` round trip on a model of a thousand modules. Per module it
# does two dictionary look-ups: what depends only on the module's class is worked out once per
# class (``_TypeInfo``), and which attribute names can hold a rate once per set of attribute names
# (``_rate_attributes``); only the few attributes so named are then read.

# How a module's children relate to adapters; see ``_opens_adapter``.
_Opens = Literal["", "tuner_layer", "tuner", "peft_model"]

# The caches below are keyed by classes, tuples of attribute names and sites, of which a program
# has few; each is emptied if it ever grows past this, so that classes made on the fly or models
# come and gone cannot pile up.
_CACHE_LIMIT = 1 << 14


@dataclass(frozen=True)
class _TypeInfo:
    """What the walk needs to know about a module class."""

    name: str
    holds_adapter: bool  # a BaseTunerLayer, BaseTuner or PeftModel
    opens: _Opens
    dropout_like: bool  # may keep a dropout rate in ``p`` (nn.Dropout, MultiplicativeDropoutLayer)
    attention: bool  # may read a child dropout's rate behind its own flag (GPT-2, BERT)
    router: bool  # a PEFT ``*Router`` (Poly), which samples while training
    tuner_layer: bool
    may_gate: bool  # dropout-like, attention or a tuner layer (the router counts only in an adapter)
    plain_training: bool  # no class in the MRO defines ``training`` (a property, say)


_TYPES: dict[type, _TypeInfo] = {}


def _type_info(cls: type[nn.Module]) -> _TypeInfo:
    info = _TYPES.get(cls)
    if info is None:
        opens: _Opens = ""
        if issubclass(cls, BaseTunerLayer):
            opens = "tuner_layer"
        elif issubclass(cls, BaseTuner):
            opens = "tuner"
        elif issubclass(cls, PeftModel):
            opens = "peft_model"
        name = cls.__name__
        dropout_like = issubclass(cls, _DropoutNd) or "Dropout" in name
        attention = "attention" in name.lower()
        info = _TypeInfo(
            name=name,
            holds_adapter=bool(opens),
            opens=opens,
            dropout_like=dropout_like,
            attention=attention,
            router=name.endswith("Router") and cls.__module__.startswith("peft."),
            tuner_layer=opens == "tuner_layer",
            may_gate=dropout_like or attention or opens == "tuner_layer",
            plain_training=not any("training" in vars(c) for c in cls.__mro__),
        )
        if len(_TYPES) >= _CACHE_LIMIT:
            _TYPES.clear()
        _TYPES[cls] = info
    return info


_MODULE_SETATTR = nn.Module.__setattr__
_CHILDREN = operator.attrgetter("_modules")
_TRAINING = operator.attrgetter("training")


def _set_training(module: nn.Module, flag: bool) -> None:
    """``module.training = flag``, without the cost of ``nn.Module.__setattr__`` where it is safe.

    For a flag, ``nn.Module.__setattr__`` only makes sure no parameter, buffer or submodule has
    the name before storing it like any attribute, yet it costs microseconds -- most of what
    freezing and restoring the gates of a large model would take. The flag is stored directly
    when the class does not customise ``__setattr__`` (checked on every call: dynamo's mutation
    tracking patches it into classes it watches) and defines no ``training`` of its own. Only for
    eager code: the forward pre-hooks, which ``torch.compile`` may trace, use the plain setter.
    """
    cls = type(module)
    if cls.__setattr__ is _MODULE_SETATTR and (_TYPES.get(cls) or _type_info(cls)).plain_training:
        module.__dict__["training"] = flag
    else:
        module.training = flag


_RATE_ATTRIBUTES: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _rate_attributes(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Of a module's attribute names: those that may hold a functional dropout rate (public, with
    ``drop`` in them: ``attention_dropout``, ``layerdrop``) and those that may hold an
    ``{adapter: rate}`` dict in a tuner layer (with ``dropout`` in them), each in the given order."""
    found = _RATE_ATTRIBUTES.get(names)
    if found is None:
        rates = tuple(n for n in names if not n.startswith("_") and "drop" in n.lower())
        dicts = tuple(n for n in names if "dropout" in n)
        found = (rates, dicts)
        if len(_RATE_ATTRIBUTES) >= _CACHE_LIMIT:
            _RATE_ATTRIBUTES.clear()
        _RATE_ATTRIBUTES[names] = found
    return found


def _clean_name(name: str) -> str:
    if "_orig_mod" not in name and "_wrapped_module" not in name:  # the common case, cheaply
        return name
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_TOKENS)


def _opens_adapter(opens: _Opens, child_name: str, child: nn.Module) -> bool:
    """Whether ``parent.<child_name>`` starts a subtree that belongs to an adapter."""
    if opens == "tuner_layer":
        # Everything a tuner layer holds besides the wrapped layer is the adapter's.
        return child_name != "base_layer"
    if opens == "tuner":
        # A tuner holds the base model as ``model``; X-LoRA holds a LoRA tuner. Anything else
        # (the X-LoRA classifier, a Shadow backbone) is adapter machinery.
        return not (child_name == "model" or isinstance(child, BaseTuner))
    if opens == "peft_model":
        return child_name == "prompt_encoder"  # p-tuning / prefix tuning encoders
    return False


# One module to visit: (module, qualified name, inside an adapter's own modules -- not the wrapped
# base layer --, the adapter name when inside one adapter's entry of a ModuleDict, whether the
# module is a ModuleDict of a tuner layer keyed by adapter name, the nearest tuner layer above).
_Node = tuple[nn.Module, str, bool, str | None, bool, nn.Module | None]


# A module whose own flag may gate randomness, as the walk found it: everything ``_sites_of``
# needs except the values it reads, which are read afresh on every entry.
class _Candidate(NamedTuple):
    module: nn.Module
    name: str  # qualified, wrapper components removed
    info: _TypeInfo
    in_adapter: bool
    adapter: str | None
    rates: tuple[str, ...]
    dicts: tuple[str, ...]
    owner: nn.Module | None  # the nearest tuner layer at or above the module


@dataclass
class _Walk:
    """What one full walk of a model found; reused while the module tree is provably the same."""

    root: nn.Module
    modules: list[nn.Module]
    # Per module, in the order of ``modules``: its class, how many attributes it has and a copy of
    # its ``_modules`` dict. If all of these are unchanged, the tree -- and so every name, context
    # and candidate -- is too.
    types: list[type]
    sizes: list[int]
    children: list[dict[str, nn.Module | None]]
    candidates: list[_Candidate]
    has_adapter: bool

    def still_valid(self, root: nn.Module) -> bool:
        # Runs on every entry, over every module of the model: ``map`` keeps the loops in C, a
        # third of the cost of a Python loop doing the same checks. Dicts compare their values by
        # identity first, and modules compare by identity.
        modules = self.modules
        return (
            root is self.root
            and list(map(type, modules)) == self.types
            and list(map(len, map(vars, modules))) == self.sizes
            and list(map(_CHILDREN, modules)) == self.children
        )


# Keyed weakly by the model object passed in (wrapper or not): a model that goes away takes its
# walk with it.
_WALKS: weakref.WeakKeyDictionary[nn.Module, _Walk] = weakref.WeakKeyDictionary()


def _discover(model: nn.Module) -> tuple[nn.Module, list[nn.Module], list[_Found], bool]:
    """The unwrapped model, every module of ``model`` (wrappers included), all dropout sites of the
    unwrapped model (whatever their mode), and whether it holds any adapter.

    The full walk runs once per model; later calls check that every module still has the same
    class, number of attributes and children (a cheap pass) and then only re-read the rates of
    the few modules that can gate randomness -- so a rate changed from 0 to 0.5 is never missed.
    """
    root = _unwrap(model)
    with _LOCK:
        walk = _WALKS.get(model)
    if walk is None or not walk.still_valid(root):
        walk = _walk(model, root)
        with _LOCK:
            _WALKS[model] = walk
    found: list[_Found] = []
    for c in walk.candidates:
        hits = _sites_of(c.module, c.info, c.in_adapter, c.adapter, c.rates, c.dicts)
        if hits:
            kind: Kind = "adapter" if c.in_adapter or c.info.tuner_layer else "base"
            found.extend(_Found(_site(c.name, kind, c.info.name, *hit), c.module, c.owner) for hit in hits)
    return walk.root, walk.modules, found, walk.has_adapter


def _walk(model: nn.Module, root: nn.Module) -> _Walk:
    """Visit every module once, in ``named_modules`` order, going through ``_modules`` by hand:
    PEFT's LoRA ``MultiheadAttention`` overrides ``named_modules`` to re-register its base
    parameters as new ``nn.Parameter`` objects, which would silently detach them from an optimizer
    that holds the old ones.
    """
    modules: list[nn.Module] = []
    candidates: list[_Candidate] = []
    has_adapter = False
    seen: set[nn.Module] = set()
    stack: list[_Node] = [(root, "", False, None, False, None)]
    while stack:
        module, name, in_adapter, adapter, keyed, owner = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        modules.append(module)
        info = _TYPES.get(type(module)) or _type_info(type(module))
        attrs = vars(module)
        names = tuple(attrs)
        rates, dicts = _RATE_ATTRIBUTES.get(names) or _rate_attributes(names)
        if info.holds_adapter:
            has_adapter = True
        if info.tuner_layer:
            owner = module
        if rates or info.may_gate or (in_adapter and info.router):
            candidates.append(
                _Candidate(module, _clean_name(name), info, in_adapter, adapter, rates, dicts, owner)
            )

        children = module._modules
        if not children:
            continue
        prefix = f"{name}." if name else ""
        if not info.opens and not keyed:  # the common case: children share the parent's context
            nodes = [
                (c, prefix + n, in_adapter, adapter, False, owner)
                for n, c in children.items()
                if c is not None
            ]
        else:
            nodes = []
            for child_name, child in children.items():
                if child is None:
                    continue
                opens = _opens_adapter(info.opens, child_name, child)
                nodes.append(
                    (
                        child,
                        prefix + child_name,
                        in_adapter or opens,
                        # ``lora_dropout["default"]``, ``prompt_encoder["default"]``: the key is the adapter.
                        child_name if keyed else adapter,
                        opens and isinstance(child, nn.ModuleDict),
                        owner,
                    )
                )
        nodes.reverse()
        stack.extend(nodes)
    # Wrappers (DDP, ``torch.compile``, ...) are modules of the model too: their flags are
    # captured and restored like any other, but sites are looked for only inside them.
    rest = [model]
    while rest:
        module = rest.pop()
        if module not in seen:
            seen.add(module)
            modules.append(module)
            rest.extend(child for child in module._modules.values() if child is not None)
    types = list(map(type, modules))
    sizes = list(map(len, map(vars, modules)))
    child_dicts = [dict(module._modules) for module in modules]
    return _Walk(root, modules, types, sizes, child_dicts, candidates, has_adapter)


def _is_rate(value: object) -> TypeGuard[float]:
    return isinstance(value, float) and 0.0 < value <= 1.0


# One way a module's flag gates randomness: (p, attribute, adapter, freezable).
_Hit = tuple[float, str, str | None, bool]


def _sites_of(
    module: nn.Module,
    info: _TypeInfo,
    in_adapter: bool,
    adapter: str | None,
    rates: tuple[str, ...],
    dicts: tuple[str, ...],
) -> list[_Hit]:
    """Every way ``module``'s own ``training`` flag makes a forward pass stochastic."""
    hits: list[_Hit] = []
    attrs = vars(module)
    # nn.Dropout & co., and dropout-like modules that keep their rate in ``p`` (OFT/BOFT's
    # MultiplicativeDropoutLayer checks ``self.training and self.p > 0``).
    if info.dropout_like and _is_rate(p := attrs.get("p")):
        hits.append((float(p), "p", adapter, True))
    # Functional dropout behind the module's own flag: transformers' ``attention_dropout``,
    # ``activation_dropout``, ``layerdrop``; ``dropout`` of nn.MultiheadAttention / nn.LSTM.
    for attr in rates:
        if _is_rate(value := attrs.get(attr)):
            hits.append((float(value), attr, adapter, True))
    # Attention modules that pass ``self.dropout.p if self.training else 0.0`` to SDPA read the
    # child's rate but are gated by their own flag (GPT-2, BERT).
    if info.attention:
        for child_name, child in module.named_children():
            if isinstance(child, _DropoutNd) and _is_rate(child.p):
                hits.append((float(child.p), f"{child_name}.p", adapter, True))
    if info.tuner_layer:
        _tuner_layer_sites(module, dicts, hits)
    elif in_adapter and info.router:
        # Poly's router draws RelaxedBernoulli routing weights while training.
        hits.append((_SAMPLING_P, "routing (RelaxedBernoulli)", adapter, True))
    return hits


def _tuner_layer_sites(module: nn.Module, dicts: tuple[str, ...], hits: list[_Hit]) -> None:
    attrs = vars(module)
    # LyCORIS (LoHa/LoKr): ``rank_dropout`` / ``module_dropout`` are {adapter: float} dicts checked
    # against the layer's own flag; any other tuner storing rates the same way is caught too.
    for attr in dicts:
        if isinstance(value := attrs.get(attr), dict):
            for adapter, rate in value.items():
                if _is_rate(rate):
                    hits.append((float(rate), f"{attr}[{adapter!r}]", str(adapter), True))
    # PVeRA samples its weights while training, and always with sample_at_inference=True.
    sample_at_inference = attrs.get("sample_at_inference")
    if isinstance(sample_at_inference, dict):
        for adapter, always in sample_at_inference.items():
            hits.append((_SAMPLING_P, f"sample_at_inference[{adapter!r}]", str(adapter), not always))
    # LoRA's MonteCLoRA variant perturbs lora_A with sampled noise while the layer trains.
    sampler = module._modules.get("lora_monteclora_sampler")
    if isinstance(sampler, nn.ModuleDict):
        for adapter in sampler:
            hits.append((_SAMPLING_P, f"lora_monteclora_sampler[{adapter!r}]", str(adapter), True))


# Sites are immutable and the same ones are found on every entry; building one is a good part of
# the cost of discovery, so each is built once.
_SITES: dict[tuple[str, Kind, str, float, str, str | None, bool], DropoutSite] = {}


def _site(
    name: str, kind: Kind, module_type: str, p: float, attribute: str, adapter: str | None, freezable: bool
) -> DropoutSite:
    key = (name, kind, module_type, p, attribute, adapter, freezable)
    site = _SITES.get(key)
    if site is None:
        site = DropoutSite(
            name=name,
            kind=kind,
            p=p,
            module_type=module_type,
            attribute=attribute,
            adapter=adapter,
            freezable=freezable,
        )
        if len(_SITES) >= _CACHE_LIMIT:
            _SITES.clear()
        _SITES[key] = site
    return site


# --------------------------------------------------------------------------------------------------
# The registry of frozen modules
# --------------------------------------------------------------------------------------------------


@dataclass
class _Hold:
    count: int
    saved_training: bool  # the flag at the first (outermost) freeze


# One lock and one table for the whole process: two blocks on the same model -- nested, or in two
# threads -- share each frozen module's entry, so the module is released only by the last block
# and gets back the flag it had before the first one. Keyed by the module object itself
# (nn.Module hashes by identity).
_LOCK = threading.RLock()
_HELD: dict[nn.Module, _Hold] = {}


def _reforce(gates: Sequence[nn.Module]) -> Callable[..., None]:
    def hook(module: nn.Module, args: object) -> None:
        # ``model.train()`` inside the block flips the flags back on; undo that before any
        # code that reads them runs.
        for gate in gates:
            if gate.training:
                gate.training = False

    return hook


def _reforce_self(module: nn.Module, args: object) -> None:
    """``_reforce`` for a gate's own hook: one function shared by all gates, no closure each."""
    if module.training:
        module.training = False


@dataclass
class _Entry:
    modules: list[nn.Module]
    flags: list[bool]  # each module's ``training`` flag at entry
    gates: list[nn.Module]
    handles: list[RemovableHandle]
    sites: list[DropoutSite]


def _enter(model: nn.Module, include_base: bool, stacklevel: int) -> _Entry:
    root, modules, found, has_adapter = _discover(model)
    if not has_adapter:
        warnings.warn(
            f"deterministic_lora: expected a model with PEFT adapter layers, found none in "
            f"{type(model).__name__}; adapter dropout is left as it is. Pass the PeftModel, or the "
            "model after load_adapter / inject_adapter_in_model.",
            NoAdapterWarning,
            stacklevel=stacklevel + 1,
        )
    chosen = [f for f in found if f.site.kind == "adapter" or include_base]
    stuck = [f.site for f in chosen if not f.site.freezable]
    if stuck:
        names = ", ".join(f"{s.name} (adapter {s.adapter!r})" for s in stuck)
        warnings.warn(
            f"deterministic_lora: {names} sample(s) noise on every forward pass "
            "(PVeRA sample_at_inference=True), so outputs inside the block stay random; expected "
            "sample_at_inference=False -- set it to False on the adapter config for repeatable outputs.",
            StochasticAdapterWarning,
            stacklevel=stacklevel + 1,
        )
    # The same module can gate several sites (a LoHa layer with rank and module dropout).
    gates = list({id(f.gate): f.gate for f in chosen if f.site.freezable}.values())
    # One re-forcing hook per tuner layer, which calls its gates (every adapter's dropout in its
    # ModuleDicts), rather than one per gate: a model with 24 adapters has thousands of gates, and
    # registering a hook costs more than freezing the flag.
    by_owner: dict[nn.Module, dict[int, nn.Module]] = {}
    for f in chosen:
        if f.site.freezable:
            by_owner.setdefault(f.owner if f.owner is not None else f.gate, {})[id(f.gate)] = f.gate
    with _LOCK:
        flags = list(map(_TRAINING, modules))
        for gate in gates:
            hold = _HELD.get(gate)
            if hold is None:
                _HELD[gate] = _Hold(count=1, saved_training=gate.training)
            else:
                hold.count += 1
            if gate.training is not False:
                _set_training(gate, False)
        handles: list[RemovableHandle] = []
        if gates:
            # On the tuner layer that calls the gates (or the gate itself outside a tuner layer),
            # for code paths that skip the root (``generate``, a layer called directly), and so
            # that a tuner layer that reads its dropout child's flag before calling it (FRoD) sees
            # the frozen flag after a ``model.train()`` inside the block; on the root as well.
            handles.append(root.register_forward_pre_hook(_reforce(gates)))
            for owner, members in by_owner.items():
                group = list(members.values())
                hook = _reforce_self if group == [owner] else _reforce(group)
                handles.append(owner.register_forward_pre_hook(hook))
    return _Entry(modules=modules, flags=flags, gates=gates, handles=handles, sites=[f.site for f in chosen])


def _exit(entry: _Entry) -> None:
    with _LOCK:
        for handle in entry.handles:
            handle.remove()
        released: dict[nn.Module, bool] = {}
        for gate in entry.gates:
            hold = _HELD[gate]
            hold.count -= 1
            if hold.count == 0:
                del _HELD[gate]
                released[gate] = hold.saved_training
        for module, training, now in zip(
            entry.modules, entry.flags, map(_TRAINING, entry.modules), strict=True
        ):
            # Set only flags that changed (the setter is not free); skip modules that another
            # open block still holds frozen (that block restores them) and released gates.
            if now is not training and module not in _HELD and module not in released:
                _set_training(module, training)
        # A gate gets the flag from before the first block; the captured one may be a frozen
        # False from inside an enclosing (or concurrent) block. Also covers gates no longer part
        # of the model.
        for module, training in released.items():
            if module.training is not training:
                _set_training(module, training)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


class deterministic_lora:  # lower case like torch.no_grad: used as a context manager and a decorator
    """Turn off adapter dropout for a block; restore every module's ``training`` flag on exit.

    Inside the block every dropout that belongs to a PEFT adapter is inactive -- LoRA (Linear,
    Embedding, Conv, ``Conv1D``, MultiheadAttention, DoRA), AdaLoRA, LoHa/LoKr rank and module
    dropout, VeRA, OFT/BOFT and the other tuners with a dropout rate, plus the sampling of PVeRA,
    MonteCLoRA and Poly. Nothing else changes: base-model dropout keeps its mode (unless
    ``include_base``), no ``p``, parameter or ``requires_grad`` is touched, and gradients flow,
    so a training step can run inside the block. On exit -- normal or by exception -- each
    module's flag is what it was at entry, module by module (never a blanket ``model.train()``).

    Blocks nest, can be open on the same model in several threads at once and be left in any
    order; adapter dropout stays off until the last one exits, even if ``model.train()`` is
    called inside (a forward pre-hook turns the frozen flags off again before each pass).

    Accepts a ``PeftModel``, a tuner model, a model with adapters injected by
    ``inject_adapter_in_model`` or transformers' ``load_adapter``, and any of these wrapped by
    DDP, FSDP, ``torch.compile`` or accelerate.

    Args:
        model: The model whose adapter dropout to freeze.
        include_base: Also freeze the base model's own dropout (and the ``training`` flag of
            modules that gate dropout on it, such as transformers attention layers -- other
            behaviour behind those flags, e.g. gradient checkpointing, is off inside the block too).

    Warns:
        NoAdapterWarning: ``model`` holds no adapter layers; adapter dropout is left alone
            (base dropout is still frozen with ``include_base=True``).
        StochasticAdapterWarning: A layer samples whatever its mode (PVeRA with
            ``sample_at_inference=True``); it is named in the message.

    Example:
        >>> with deterministic_lora(model):  # doctest: +SKIP
        ...     val_loss = model(**val_batch).loss
        >>> @deterministic_lora(model)  # doctest: +SKIP
        ... def logprobs(batch): ...
    """

    def __init__(self, model: nn.Module, *, include_base: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"deterministic_lora: expected a torch.nn.Module, found {type(model).__name__}; "
                "pass the model (PeftModel, wrapped or not)."
            )
        self.model = model
        self.include_base = include_base
        # One stack per thread: the same object may be entered from several threads, or
        # recursively through the decorator form.
        self._local = threading.local()

    def _stack(self) -> list[_Entry]:
        stack: list[_Entry] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = []
            self._local.stack = stack
        return stack

    def __enter__(self) -> list[DropoutSite]:
        """Freeze; returns the sites this block froze (adapter ones, plus base with ``include_base``)."""
        entry = _enter(self.model, self.include_base, stacklevel=2)
        self._stack().append(entry)
        return list(entry.sites)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        _exit(self._stack().pop())

    def __call__(self, func: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorator form: each call of ``func`` runs inside a fresh block."""

        @functools.wraps(func)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self:
                return func(*args, **kwargs)

        return wrapper


def live_dropout(model: nn.Module) -> list[DropoutSite]:
    """List what would make a forward pass of ``model`` stochastic right now.

    A site is live when the module that gates it is in training mode and not frozen by an open
    :class:`deterministic_lora` block, or when it samples whatever its mode. Rates of 0 and
    ``nn.Identity`` placeholders are not listed. The check is conservative: dropout of an
    inactive or merged adapter is listed too, since ``set_adapter`` / ``unmerge`` would use it.

    Args:
        model: Any model, wrapped (DDP, FSDP, ``torch.compile``, accelerate) or not.

    Returns:
        The live sites in module order; ``[]`` for a model loaded with ``load_for_inference`` or
        inside ``deterministic_lora(model, include_base=True)``.

    Example:
        >>> live_dropout(peft_model.train())  # doctest: +SKIP
        [DropoutSite(name='base_model.model.fc1.lora_dropout.default', kind='adapter', p=0.1, ...)]
    """
    _, _, found, _ = _discover(model)
    with _LOCK:
        return [f.site for f in found if not f.site.freezable or (f.gate.training and f.gate not in _HELD)]


def _fmt_sites(sites: Sequence[DropoutSite], limit: int = 10) -> str:
    lines = [f"  - {site.describe()}" for site in sites[:limit]]
    if len(sites) > limit:
        lines.append(f"  ... ({len(sites) - limit} more)")
    return "\n".join(lines)


def assert_deterministic(model: nn.Module) -> None:
    """Raise unless a forward pass of ``model`` is free of dropout -- for serving start-up.

    Args:
        model: The model about to serve, wrapped or not.

    Raises:
        NondeterministicModelError: Some dropout is live; its ``sites`` attribute lists them.

    Example:
        >>> model = load_for_inference(base, "out/my-adapter")  # doctest: +SKIP
        >>> assert_deterministic(model)  # passes: every module is in eval mode  # doctest: +SKIP
    """
    sites = live_dropout(model)
    if not sites:
        return
    adapter = sum(site.kind == "adapter" for site in sites)
    advice = (
        "Call model.eval() before serving (or load it with safe_lora.load_for_inference), or run "
        "the forward pass inside safe_lora.deterministic_lora(model, include_base=True)."
    )
    if any(not site.freezable for site in sites):
        advice += (
            " Layers that sample even in eval mode need their adapter config changed "
            "(PVeRA: sample_at_inference=False)."
        )
    raise NondeterministicModelError(
        f"expected a deterministic model (no live dropout), found {len(sites)} live dropout "
        f"site(s) ({adapter} adapter, {len(sites) - adapter} base):\n{_fmt_sites(sites)}\n{advice}",
        sites=sites,
    )
