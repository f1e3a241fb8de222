"""Find what makes a forward pass stochastic: the first step of freezing adapter dropout.

:func:`live_dropout` and :mod:`safe_lora._dropout_freeze` (``deterministic_lora``,
``assert_deterministic``) both start here: one walk of the model, cached while its module tree is
provably the same, lists every :class:`DropoutSite` -- what holds a rate or samples noise, and the
module whose ``training`` flag gates it -- whatever its current mode.

What gates randomness in PEFT (checked against peft 0.21's tuner ``layer.py`` files; the PEFT
names involved are facts of :mod:`safe_lora._peft`):

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

import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeGuard

from peft import PeftModel
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from safe_lora._peft import (
    MONTECLORA_SAMPLER_ATTR,
    PROMPT_ENCODER_CHILD,
    SAMPLE_AT_INFERENCE_ATTR,
    TUNER_BASE_CHILD,
    TUNER_LAYER_BASE_CHILD,
    BaseTuner,
    BaseTunerLayer,
    is_router,
)
from safe_lora._unwrap import unwrap as _unwrap

__all__ = ["TRAINING", "DropoutSite", "Found", "Kind", "discover", "live_dropout", "set_training"]

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
        >>> from peft import LoraConfig, get_peft_model
        >>> config = LoraConfig(target_modules=["0"], lora_dropout=0.1)
        >>> peft_model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), config).train()
        >>> [(s.name, s.kind, s.p) for s in live_dropout(peft_model)]
        [('base_model.model.0.lora_dropout.default', 'adapter', 0.1)]
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


class Found(NamedTuple):
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
            router=is_router(cls),
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
TRAINING = operator.attrgetter("training")  # ``map(TRAINING, modules)``: every flag, in C


def set_training(module: nn.Module, flag: bool) -> None:
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
        return child_name != TUNER_LAYER_BASE_CHILD
    if opens == "tuner":
        # A tuner holds the base model as ``model``; X-LoRA holds a LoRA tuner. Anything else
        # (the X-LoRA classifier, a Shadow backbone) is adapter machinery.
        return not (child_name == TUNER_BASE_CHILD or isinstance(child, BaseTuner))
    if opens == "peft_model":
        return child_name == PROMPT_ENCODER_CHILD  # p-tuning / prefix tuning encoders
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
# walk with it. Blocks in several threads may walk at once: the table has its own lock.
_WALKS: weakref.WeakKeyDictionary[nn.Module, _Walk] = weakref.WeakKeyDictionary()
_WALKS_LOCK = threading.Lock()


def discover(model: nn.Module) -> tuple[nn.Module, list[nn.Module], list[Found], bool]:
    """The unwrapped model, every module of ``model`` (wrappers included), all dropout sites of the
    unwrapped model (whatever their mode), and whether it holds any adapter.

    The full walk runs once per model; later calls check that every module still has the same
    class, number of attributes and children (a cheap pass) and then only re-read the rates of
    the few modules that can gate randomness -- so a rate changed from 0 to 0.5 is never missed.
    """
    root = _unwrap(model)
    with _WALKS_LOCK:
        walk = _WALKS.get(model)
    if walk is None or not walk.still_valid(root):
        walk = _walk(model, root)
        with _WALKS_LOCK:
            _WALKS[model] = walk
    found: list[Found] = []
    for c in walk.candidates:
        hits = _sites_of(c.module, c.info, c.in_adapter, c.adapter, c.rates, c.dicts)
        if hits:
            kind: Kind = "adapter" if c.in_adapter or c.info.tuner_layer else "base"
            found.extend(Found(_site(c.name, kind, c.info.name, *hit), c.module, c.owner) for hit in hits)
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
    sample_at_inference = attrs.get(SAMPLE_AT_INFERENCE_ATTR)
    if isinstance(sample_at_inference, dict):
        for adapter, always in sample_at_inference.items():
            hits.append((_SAMPLING_P, f"{SAMPLE_AT_INFERENCE_ATTR}[{adapter!r}]", str(adapter), not always))
    # LoRA's MonteCLoRA variant perturbs lora_A with sampled noise while the layer trains.
    sampler = module._modules.get(MONTECLORA_SAMPLER_ATTR)
    if isinstance(sampler, nn.ModuleDict):
        for adapter in sampler:
            hits.append((_SAMPLING_P, f"{MONTECLORA_SAMPLER_ATTR}[{adapter!r}]", str(adapter), True))


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
# Public API
# --------------------------------------------------------------------------------------------------


def live_dropout(model: nn.Module) -> list[DropoutSite]:
    """List what would make a forward pass of ``model`` stochastic right now.

    A site is live when the module that gates it is in training mode and not frozen by an open
    :class:`~safe_lora.deterministic_lora` block, or when it samples whatever its mode. Rates of 0
    and ``nn.Identity`` placeholders are not listed. The check is conservative: dropout of an
    inactive or merged adapter is listed too, since ``set_adapter`` / ``unmerge`` would use it.

    Args:
        model: Any model, wrapped (DDP, FSDP, ``torch.compile``, accelerate) or not.

    Returns:
        The live sites in module order; ``[]`` for a model loaded with ``load_for_inference`` or
        inside ``deterministic_lora(model, include_base=True)``.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.25))
        >>> [site.describe() for site in live_dropout(net.train())]
        ['1 (base, Dropout.p, p=0.25)']
        >>> live_dropout(net.eval())
        []
        >>> from peft import LoraConfig, get_peft_model
        >>> peft_model = get_peft_model(net, LoraConfig(target_modules=["0"], lora_dropout=0.1))
        >>> [site.describe() for site in live_dropout(peft_model.train())]  # doctest: +NORMALIZE_WHITESPACE
        ['base_model.model.0.lora_dropout.default (adapter, Dropout.p, p=0.1)',
         'base_model.model.1 (base, Dropout.p, p=0.25)']
    """
    _, _, found, _ = discover(model)
    # Which gates an open block holds frozen is the next step's registry; that module imports this
    # one, so it is imported here, when first needed.
    from safe_lora._dropout_freeze import live

    return live(found)
