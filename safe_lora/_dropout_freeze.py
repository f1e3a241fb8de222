"""Freeze adapter dropout for a block and restore every module's mode exactly: the second step.

``model.eval()`` / ``model.train()`` flip *every* module and so undo modules a user froze on purpose;
PEFT's ``disable_adapter`` re-enables everything on exit; setting ``p=0`` is permanent and misses
dropout that is not an ``nn.Dropout``. :class:`deterministic_lora` instead turns off only the
``training`` flag of the modules that gate adapter randomness -- the sites
:mod:`safe_lora._dropout_find` found -- and on exit puts back the flag each module of the model had
at entry, one module at a time.

The hold registry counts, per frozen module, the blocks that hold it, so that blocks nest and run
in several threads; forward pre-hooks force the held flags off again after a ``model.train()``
inside a block. :func:`assert_deterministic` is the serving-time check built on both steps.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from torch import nn
from torch.utils.hooks import RemovableHandle

from safe_lora._dropout_find import TRAINING, DropoutSite, Found, discover, live_dropout, set_training
from safe_lora.errors import NoAdapterWarning, NondeterministicModelError, StochasticAdapterWarning, warn

__all__ = ["assert_deterministic", "deterministic_lora", "live"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


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


def _enter(model: nn.Module, include_base: bool) -> _Entry:
    root, modules, found, has_adapter = discover(model)
    if not has_adapter:
        warn(
            f"deterministic_lora: expected a model with PEFT adapter layers, found none in "
            f"{type(model).__name__}; adapter dropout is left as it is. Pass the PeftModel, or the "
            "model after load_adapter / inject_adapter_in_model.",
            NoAdapterWarning,
        )
    chosen = [f for f in found if f.site.kind == "adapter" or include_base]
    stuck = [f.site for f in chosen if not f.site.freezable]
    if stuck:
        names = ", ".join(f"{s.name} (adapter {s.adapter!r})" for s in stuck)
        warn(
            f"deterministic_lora: {names} sample(s) noise on every forward pass "
            "(PVeRA sample_at_inference=True), so outputs inside the block stay random; expected "
            "sample_at_inference=False -- set it to False on the adapter config for repeatable outputs.",
            StochasticAdapterWarning,
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
        flags = list(map(TRAINING, modules))
        for gate in gates:
            hold = _HELD.get(gate)
            if hold is None:
                _HELD[gate] = _Hold(count=1, saved_training=gate.training)
            else:
                hold.count += 1
            if gate.training is not False:
                set_training(gate, False)
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
            entry.modules, entry.flags, map(TRAINING, entry.modules), strict=True
        ):
            # Set only flags that changed (the setter is not free); skip modules that another
            # open block still holds frozen (that block restores them) and released gates.
            if now is not training and module not in _HELD and module not in released:
                set_training(module, training)
        # A gate gets the flag from before the first block; the captured one may be a frozen
        # False from inside an enclosing (or concurrent) block. Also covers gates no longer part
        # of the model.
        for module, training in released.items():
            if module.training is not training:
                set_training(module, training)


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
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> config = LoraConfig(target_modules=["0"], lora_dropout=0.5, init_lora_weights=False)
        >>> model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), config).train()
        >>> x = torch.ones(2, 4)
        >>> with deterministic_lora(model) as frozen, torch.no_grad():
        ...     torch.equal(model(x), model(x))  # adapter dropout off: the same output twice
        True
        >>> [site.name for site in frozen], model.training  # and back in train mode after
        (['base_model.model.0.lora_dropout.default'], True)
        >>> @deterministic_lora(model)
        ... def validate(batch: torch.Tensor) -> torch.Tensor:
        ...     return model(batch)
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
        entry = _enter(self.model, self.include_base)
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


def live(found: Sequence[Found]) -> list[DropoutSite]:
    """Of the sites :func:`~safe_lora._dropout_find.discover` found, those live now: gated by a module
    in training mode that no open block holds, or sampling whatever the mode (for ``live_dropout``)."""
    with _LOCK:
        return [f.site for f in found if not f.site.freezable or (f.gate.training and f.gate not in _HELD)]


def _fmt_sites(sites: Sequence[DropoutSite], limit: int = 10) -> str:
    lines = [f"  - {site.describe()}" for site in sites[:limit]]
    if len(sites) > limit:
        lines.append(f"  and {len(sites) - limit} more")
    return "\n".join(lines)


def assert_deterministic(model: nn.Module) -> None:
    """Raise unless a forward pass of ``model`` is free of dropout -- for serving start-up.

    Args:
        model: The model about to serve, wrapped or not.

    Raises:
        NondeterministicModelError: Some dropout is live; its ``sites`` attribute lists them.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> assert_deterministic(net.eval())  # passes: every module is in eval mode
        >>> assert_deterministic(net.train())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        safe_lora.errors.NondeterministicModelError: expected a deterministic model (no live dropout), ...
        >>> model = load_for_inference(base, "out/my-adapter")  # doctest: +SKIP
        >>> assert_deterministic(model)  # doctest: +SKIP
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
