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
import threading
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.parallel import DataParallel, DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from safe_lora.errors import NoAdapterWarning, NondeterministicModelError, StochasticAdapterWarning

__all__ = ["DropoutSite", "assert_deterministic", "deterministic_lora", "live_dropout"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

Kind = Literal["adapter", "base"]

# Path components that wrappers insert into qualified names. They are reserved names, so removing
# them anywhere never clashes with a user's own submodule names.
_WRAPPER_TOKENS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# Wrappers that keep the real model under ``.module`` (DeepSpeed's engine is matched by name so
# that deepspeed need not be installed).
_MODULE_WRAPPER_NAMES = frozenset({"FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine"})

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


@dataclass(frozen=True)
class _Found:
    """A site plus the module whose ``training`` flag gates it."""

    site: DropoutSite
    gate: nn.Module


# --------------------------------------------------------------------------------------------------
# Walking the model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    name: str
    module: nn.Module
    in_adapter: bool  # inside an adapter's own modules (not the wrapped base layer)
    adapter: str | None  # the adapter name, when inside one adapter's entry of a ModuleDict
    keyed_by_adapter: bool  # a ModuleDict of a tuner layer, keyed by adapter name


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP / ``torch.compile`` / DeepSpeed wrappers."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner: object = None
        if isinstance(model, (DistributedDataParallel, DataParallel)) or (
            type(model).__name__ in _MODULE_WRAPPER_NAMES
        ):
            inner = getattr(model, "module", None)
        elif "_orig_mod" in model._modules:  # torch.compile's OptimizedModule
            inner = model._modules["_orig_mod"]
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_TOKENS)


def _opens_adapter(parent: nn.Module, child_name: str, child: nn.Module) -> bool:
    """Whether ``parent.<child_name>`` starts a subtree that belongs to an adapter."""
    if isinstance(parent, BaseTunerLayer):
        # Everything a tuner layer holds besides the wrapped layer is the adapter's.
        return child_name != "base_layer"
    if isinstance(parent, BaseTuner):
        # A tuner holds the base model as ``model``; X-LoRA holds a LoRA tuner. Anything else
        # (the X-LoRA classifier, a Shadow backbone) is adapter machinery.
        return not (child_name == "model" or isinstance(child, BaseTuner))
    if isinstance(parent, PeftModel):
        return child_name == "prompt_encoder"  # p-tuning / prefix tuning encoders
    return False


def _walk(root: nn.Module) -> Iterator[_Node]:
    """Every module under ``root`` once, in ``named_modules`` order.

    Walks ``named_children`` by hand: PEFT's LoRA ``MultiheadAttention`` overrides ``named_modules``
    to re-register its base parameters as new ``nn.Parameter`` objects, which would silently
    detach them from an optimizer that holds the old ones.
    """
    seen: set[int] = set()
    stack = [_Node(name="", module=root, in_adapter=False, adapter=None, keyed_by_adapter=False)]
    while stack:
        node = stack.pop()
        if id(node.module) in seen:
            continue
        seen.add(id(node.module))
        yield node
        parent = node.module
        children = []
        for child_name, child in parent.named_children():
            opens = _opens_adapter(parent, child_name, child)
            children.append(
                _Node(
                    name=f"{node.name}.{child_name}" if node.name else child_name,
                    module=child,
                    in_adapter=node.in_adapter or opens,
                    # ``lora_dropout["default"]``, ``prompt_encoder["default"]``: the key is the adapter.
                    adapter=child_name if node.keyed_by_adapter else node.adapter,
                    keyed_by_adapter=opens and isinstance(child, nn.ModuleDict),
                )
            )
        stack.extend(reversed(children))


def _all_modules(model: nn.Module) -> list[nn.Module]:
    return [node.module for node in _walk(model)]


def _is_rate(value: object) -> bool:
    return isinstance(value, float) and 0.0 < value <= 1.0


def _sites_of(node: _Node) -> Iterator[_Found]:
    """Every way ``module``'s own ``training`` flag makes a forward pass stochastic."""
    module, name = node.module, _clean_name(node.name)
    type_name = type(module).__name__
    is_tuner_layer = isinstance(module, BaseTunerLayer)
    kind: Kind = "adapter" if node.in_adapter or is_tuner_layer else "base"

    def found(p: float, attribute: str, adapter: str | None = node.adapter, freezable: bool = True) -> _Found:
        site = DropoutSite(
            name=name,
            kind=kind,
            p=p,
            module_type=type_name,
            attribute=attribute,
            adapter=adapter,
            freezable=freezable,
        )
        return _Found(site=site, gate=module)

    attrs = vars(module)
    # nn.Dropout & co., and dropout-like modules that keep their rate in ``p`` (OFT/BOFT's
    # MultiplicativeDropoutLayer checks ``self.training and self.p > 0``).
    if (isinstance(module, _DropoutNd) or "Dropout" in type_name) and _is_rate(attrs.get("p")):
        yield found(float(attrs["p"]), "p")
    # Functional dropout behind the module's own flag: transformers' ``attention_dropout``,
    # ``activation_dropout``, ``layerdrop``; ``dropout`` of nn.MultiheadAttention / nn.LSTM.
    for attr, value in attrs.items():
        if not attr.startswith("_") and "drop" in attr.lower() and _is_rate(value):
            yield found(float(value), attr)
    # Attention modules that pass ``self.dropout.p if self.training else 0.0`` to SDPA read the
    # child's rate but are gated by their own flag (GPT-2, BERT).
    if "attention" in type_name.lower():
        for child_name, child in module.named_children():
            if isinstance(child, _DropoutNd) and _is_rate(child.p):
                yield found(float(child.p), f"{child_name}.p")
    if is_tuner_layer:
        yield from _tuner_layer_sites(module, found)
    elif node.in_adapter and type_name.endswith("Router") and type(module).__module__.startswith("peft."):
        # Poly's router draws RelaxedBernoulli routing weights while training.
        yield found(_SAMPLING_P, "routing (RelaxedBernoulli)")


def _tuner_layer_sites(module: nn.Module, found: Callable[..., _Found]) -> Iterator[_Found]:
    attrs = vars(module)
    # LyCORIS (LoHa/LoKr): ``rank_dropout`` / ``module_dropout`` are {adapter: float} dicts checked
    # against the layer's own flag; any other tuner storing rates the same way is caught too.
    for attr, value in attrs.items():
        if "dropout" in attr and isinstance(value, dict):
            for adapter, rate in value.items():
                if _is_rate(rate):
                    yield found(float(rate), f"{attr}[{adapter!r}]", str(adapter))
    # PVeRA samples its weights while training, and always with sample_at_inference=True.
    sample_at_inference = attrs.get("sample_at_inference")
    if isinstance(sample_at_inference, dict):
        for adapter, always in sample_at_inference.items():
            yield found(_SAMPLING_P, f"sample_at_inference[{adapter!r}]", str(adapter), freezable=not always)
    # LoRA's MonteCLoRA variant perturbs lora_A with sampled noise while the layer trains.
    sampler = module._modules.get("lora_monteclora_sampler")
    if isinstance(sampler, nn.ModuleDict):
        for adapter in sampler:
            yield found(_SAMPLING_P, f"lora_monteclora_sampler[{adapter!r}]", str(adapter))


def _discover(model: nn.Module) -> tuple[list[_Found], bool]:
    """All dropout sites of ``model`` (whatever their mode), and whether it holds any adapter."""
    root = _unwrap(model)
    sites: list[_Found] = []
    has_adapter = False
    for node in _walk(root):
        if isinstance(node.module, (BaseTunerLayer, BaseTuner, PeftModel)):
            has_adapter = True
        sites.extend(_sites_of(node))
    return sites, has_adapter


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


@dataclass
class _Entry:
    captured: list[tuple[nn.Module, bool]]
    gates: list[nn.Module]
    handles: list[RemovableHandle]
    sites: list[DropoutSite]


def _enter(model: nn.Module, include_base: bool, stacklevel: int) -> _Entry:
    found, has_adapter = _discover(model)
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
    root = _unwrap(model)
    with _LOCK:
        captured = [(module, module.training) for module in _all_modules(model)]
        for gate in gates:
            hold = _HELD.get(gate)
            if hold is None:
                _HELD[gate] = _Hold(count=1, saved_training=gate.training)
            else:
                hold.count += 1
            gate.training = False
        handles: list[RemovableHandle] = []
        if gates:
            # On each gate, for direct calls and code paths that skip the root (``generate``); on
            # the root, so that a tuner layer that reads its dropout child's flag before calling it
            # (FRoD) sees the frozen flag after a ``model.train()`` inside the block.
            handles.append(root.register_forward_pre_hook(_reforce(gates)))
            handles.extend(gate.register_forward_pre_hook(_reforce((gate,))) for gate in gates)
    return _Entry(captured=captured, gates=gates, handles=handles, sites=[f.site for f in chosen])


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
        for module, training in entry.captured:
            if module in _HELD:
                continue  # another open block still holds it frozen; that block restores it
            # A gate gets the flag from before the first block; the captured one may be a
            # frozen False from inside an enclosing (or concurrent) block.
            module.training = released.pop(module, training)
        for module, training in released.items():  # gates no longer part of the model
            module.training = training


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
    found, _ = _discover(model)
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
