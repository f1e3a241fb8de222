"""Undo a failed load exactly: the module tree, every flag, and the values PEFT may write in place.

A load changes a model in three ways, each undone differently and each kept cheap:

* **Structure** -- PEFT replaces target modules by tuner layers and adds entries to their
  ``ModuleDict``s. Each module's ``__dict__`` is copied shallowly (references, no tensor copied) and
  put back on failure. Adding an adapter never rewires another adapter's own modules, so the
  entries of an existing adapter (``lora_A["a0"]``, ...) are *sealed*: not walked, not copied. That
  keeps the cost of the N-th ``load_adapter`` independent of N.
* **Tensor identity** -- some of PEFT's initialisations swap a base weight's storage
  (``weight.data = residual``). A reference to every captured tensor's ``.data`` brings the old
  storage back; again nothing is copied.
* **Values written in place** -- only a few code paths write into existing storage (OLoRA's residual,
  quantized weights re-packed, a bias an adapter saves). The loader names those tensors up front
  (:meth:`Snapshot.backup`) and only their values are copied, so a plain LoRA load copies no weight.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from safe_lora._meta import modules_along
from safe_lora._peft import AuxiliaryTrainingWrapper, BaseTunerLayer

__all__ = ["Snapshot", "holds_quantized", "rollback_on_error", "tensor_at"]

# The per-adapter containers of tuner layers and auxiliary wrappers: their entries, keyed by adapter
# name, are one adapter's own modules.
_ADAPTER_DICTS = (nn.ModuleDict, nn.ParameterDict)


def holds_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is quantized storage: integer-packed, or carrying a quantization state.

    bitsandbytes packs 4-bit weights in uint8 (or a float ``quant_storage``) and 8-bit ones in
    int8, and keeps their state (``quant_state``, ``SCB``) as attributes of the parameter.
    """
    return not (tensor.is_floating_point() or tensor.is_complex()) or any(
        "quant" in k or k == "SCB" for k in vars(tensor)
    )


_CONTAINERS = (dict, set, list)


class _Saved(NamedTuple):
    """A module's ``__dict__`` as it was: the attributes by reference (containers included, so
    that they can be put back as the same objects) and a copy of each non-empty container."""

    state: dict[str, Any]
    contents: dict[str, Any]


def _capture(state: dict[str, Any]) -> _Saved:
    """Capture a module's ``__dict__``, copying one level of its non-empty containers only.

    ``.copy()`` keeps the type and is far cheaper than ``copy.copy``; most of a module's dozen
    hook and state dicts are empty and need no copy. This runs for every captured module on each load.
    """
    # isinstance first: ``bool()`` of every other value would call ``Tensor.__bool__`` and the like.
    return _Saved(dict(state), {k: v.copy() for k, v in state.items() if isinstance(v, _CONTAINERS) and v})


def _put_back(saved: _Saved, state: dict[str, Any]) -> None:
    """Make ``state`` (a module's ``__dict__``) what ``saved`` captured, keeping container identity:
    a hook's ``RemovableHandle`` holds a weak reference to its very dict, and PEFT may have
    replaced a container as well as filled it."""
    state.clear()
    state.update(saved.state)
    for key, value in saved.state.items():
        if isinstance(value, _CONTAINERS):
            value.clear()
            before = saved.contents.get(key)
            if before is not None:
                if isinstance(value, list):
                    value.extend(before)
                else:
                    value.update(before)


class Snapshot:
    """What a load can change in ``model``, captured by reference before PEFT runs.

    Args:
        model: The model about to be loaded into (a base model or a ``PeftModel``).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> before = model[0].weight.detach().clone()
        >>> snap = Snapshot(model)
        >>> snap.backup(model[0].weight)  # about to be written in place
        >>> with torch.no_grad():
        ...     _ = model[0].weight.mul_(0)
        >>> model.add_module("extra", nn.ReLU())
        >>> snap.restore()  # exactly as before
        >>> torch.equal(model[0].weight, before), len(model)
        (True, 1)
    """

    def __init__(self, model: nn.Module, *, outer: Snapshot | None = None) -> None:
        self.root = model
        # A snapshot taken earlier in the same load, which must also keep every backup made here.
        self.outer = outer
        # module -> its __dict__ as it was (shallow); insertion order is the walk order.
        self.modules: dict[nn.Module, _Saved] = {}
        # Roots of existing adapters' own subtrees: pre-existing, not captured, never rewired.
        self.sealed: set[nn.Module] = set()
        self.grads: list[tuple[torch.Tensor, bool]] = []
        # (tensor, alias of its storage, its own attributes -- e.g. a bnb weight's quant_state).
        self._data: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]] = []
        # (tensor, alias of its storage, copy of its values, deep copy of its own attributes).
        self._values: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any] | None]] = []
        self._backed_up: set[int] = set()
        # Whether any captured weight is quantized (bitsandbytes keeps its state on the parameter):
        # the loader then backs up the quantized weights of the targets.
        self.quantized = False
        seen: set[int] = set()

        stack = [model]
        while stack:
            module = stack.pop()
            if module in self.modules:
                continue
            state = vars(module)
            self.modules[module] = _capture(state)
            for slot in ("_parameters", "_buffers"):
                for tensor in state.get(slot, {}).values():
                    if tensor is None or id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    if slot == "_parameters":
                        self.grads.append((tensor, tensor.requires_grad))
                    own = vars(tensor)
                    if own or not (tensor.is_floating_point() or tensor.is_complex()):
                        # Parameters only: integer buffers (position ids, masks) are common.
                        quantized = isinstance(tensor, nn.Parameter) and holds_quantized(tensor)
                        self.quantized = self.quantized or quantized
                    self._data.append((tensor, tensor.data, dict(own) if own else None))
            opens = isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
            for child in state.get("_modules", {}).values():
                if child is None:
                    continue
                if opens and isinstance(child, _ADAPTER_DICTS):
                    self._seal(child, seen)
                else:
                    stack.append(child)

    def _seal(self, container: nn.Module, seen: set[int]) -> None:
        """Capture a per-adapter container; its existing entries are sealed, only their
        ``requires_grad`` is recorded (PEFT's ``set_adapter`` flips it for every adapter)."""
        self.modules[container] = _capture(vars(container))
        grads, sealed = self.grads, self.sealed
        for tensor in container._parameters.values():  # ParameterDict entries
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                grads.append((tensor, tensor.requires_grad))
        # By hand rather than ``entry.parameters()``: entries are mostly leaf layers, and this runs
        # for every entry of every adapter on each add. A parameter two entries share (tied
        # adapters) is listed twice, which restores it twice to the same flag: no need to dedupe.
        pending = [entry for entry in container._modules.values() if entry is not None]
        sealed.update(pending)
        while pending:
            module = pending.pop()
            for tensor in module._parameters.values():
                if tensor is not None:
                    grads.append((tensor, tensor.requires_grad))
            if module._modules:
                pending.extend(c for c in module._modules.values() if c is not None)

    # ----------------------------------------------------------------------------------------------
    # What a load may overwrite in place
    # ----------------------------------------------------------------------------------------------

    def backup(self, tensor: torch.Tensor) -> None:
        """Keep a copy of ``tensor``'s values (and of its own attributes, e.g. a quant state).

        For the few tensors a load may write *in place*; each is copied once, however often named.
        """
        if self.outer is not None:
            self.outer.backup(tensor)
        if id(tensor) in self._backed_up:
            return
        self._backed_up.add(id(tensor))
        own = vars(tensor)
        # The attributes of a quantized weight (bnb's quant_state, SCB, ...) are objects that may be
        # rebuilt in place: deep-copied, they are small next to the weight.
        attrs = copy.deepcopy(dict(own)) if own else None
        with torch.no_grad():
            self._values.append((tensor, tensor.data, tensor.detach().clone(), attrs))

    # ----------------------------------------------------------------------------------------------
    # Questions the loader asks
    # ----------------------------------------------------------------------------------------------

    def resolve(self, root: nn.Module, key: str) -> tuple[torch.Tensor | None, bool]:
        """The tensor a state-dict ``key`` of ``root`` names, and whether the load created it.

        ``root`` is the model the key is relative to: the captured model, or the ``PeftModel``
        built around it. A tensor is pre-existing when it sits in a captured module's original
        parameters or buffers, or anywhere below a sealed (existing adapter's) module.

        Returns:
            ``(tensor, is_new)``; ``(None, False)`` when the key names nothing.
        """
        tensor, owner, path = tensor_at(root, key)
        if tensor is None or owner is None:
            return None, False
        if any(module in self.sealed for module in path):
            return tensor, False
        saved = self.modules.get(owner)
        if saved is None:
            return tensor, True
        before = saved.contents
        known = (*before.get("_parameters", {}).values(), *before.get("_buffers", {}).values())
        return tensor, not any(t is tensor for t in known)

    def new_subtrees(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """``(parent, child)`` for every module the load added below a captured module."""
        for module in self.modules:
            for child in module._modules.values():
                if child is not None and child not in self.modules and child not in self.sealed:
                    yield module, child

    def known_tensor_ids(self) -> set[int]:
        """The ids of every tensor captured (each parameter and buffer the model held, but in the
        sealed adapters): a tensor among the unsealed modules whose id is not here is new."""
        return {id(t) for t, _, _ in self._data}

    def new_parameters(self) -> list[nn.Parameter]:
        """Every parameter the load created (in new modules or new entries of existing ones)."""
        found: list[nn.Parameter] = []
        for module, saved in self.modules.items():
            before = saved.contents.get("_parameters", {})
            for key, param in module._parameters.items():
                if param is not None and before.get(key) is not param:
                    found.append(param)
        # A new subtree can wrap existing modules (a tuner layer around the base layer it adapts):
        # their parameters are not new. Sealed ones cannot be in there, so the captured ones suffice.
        known = self.known_tensor_ids()
        for _, child in self.new_subtrees():
            found.extend(p for p in child.parameters() if id(p) not in known)
        return found

    # ----------------------------------------------------------------------------------------------
    # Putting things back
    # ----------------------------------------------------------------------------------------------

    def restore_modes(self) -> None:
        """Give every captured module its ``training`` flag and every captured parameter its
        ``requires_grad`` back (after a successful add, which PEFT's helpers may have flipped)."""
        for module, saved in self.modules.items():
            flag = saved.state.get("training")
            if flag is not None and module.training is not flag:
                module.training = flag
        self._restore_grads()

    def _restore_grads(self) -> None:
        for tensor, requires_grad in self.grads:
            if tensor.requires_grad is not requires_grad:
                tensor.requires_grad_(requires_grad)

    def restore(self) -> None:
        """Put everything captured back: structure, storage, values, flags and ``requires_grad``."""
        for module, saved in self.modules.items():
            _put_back(saved, vars(module))
        with torch.no_grad():
            for tensor, data, own in self._data:
                tensor.data = data
                if own is not None or vars(tensor):
                    vars(tensor).clear()
                    vars(tensor).update(own or {})
            for tensor, data, value, attrs in self._values:
                tensor.data = data
                data.copy_(value)
                if attrs is not None:
                    # A quantized weight's state object may have been rebuilt in place.
                    vars(tensor).clear()
                    vars(tensor).update(copy.deepcopy(attrs))
        self._restore_grads()


def tensor_at(root: nn.Module, key: str) -> tuple[torch.Tensor | None, nn.Module | None, list[nn.Module]]:
    """The parameter or buffer a state-dict ``key`` of ``root`` names, its owner and the modules on
    the way there; no tensor and no owner when the key names nothing.

    A walk of the key's path only: no ``state_dict()`` of the whole model, so it costs the same
    whatever else the model holds.
    """
    owner_path, _, leaf = key.rpartition(".")
    path = modules_along(root, owner_path)
    if path is None:
        return None, None, []
    module = path[-1]
    tensor: torch.Tensor | None = module._parameters.get(leaf)
    if tensor is None:
        tensor = module._buffers.get(leaf)
    return tensor, (module if tensor is not None else None), path


@contextmanager
def rollback_on_error(model: nn.Module) -> Iterator[Snapshot]:
    """Capture ``model``; on any exception (``KeyboardInterrupt`` too) restore it and re-raise."""
    snapshot = Snapshot(model)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
