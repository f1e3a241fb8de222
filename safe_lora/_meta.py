"""Stand-ins on the meta device: what PEFT's injection needs to see of a model, without its values.

A tensor on the meta device has a shape, a dtype and ``requires_grad``, and no storage: operations on
it cost nothing and allocate nothing. Two tools build on that:

* :class:`MetaTwins` swaps every parameter and buffer of a model, in place, for a *twin* on the meta
  device (same class, shape, dtype, ``requires_grad`` and own attributes). PEFT's injection then runs
  on the real module tree -- the same code and the same structure as a real load -- while no
  computation can touch, and no allocation can be sized by, anything but shapes.
  :meth:`MetaTwins.restore` puts the real tensors back wherever a twin sits, also in modules the
  injection created around them.
* :func:`skeleton` builds a structural copy of a model whose tensors are all twins, for questions
  that need the structure but must leave the model itself alone.

:func:`on_meta` is the device context PEFT's code runs under here: ``torch.device("meta")``, plus the
factory torch leaves out of it (``torch.normal(mean, std, size)``, PEFT's multitask prompt init) and
``.cpu()`` of a meta tensor (PEFT's prompt embedding to save).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._device import DeviceContext, _device_constructors

__all__ = [
    "MetaTwins",
    "all_modules",
    "modules_along",
    "on_meta",
    "shielded",
    "skeleton",
    "tensor_slots",
    "twin_of",
]


_META = torch.device("meta")
# Everything the mode below treats specially; any other op passes straight through. The device
# constructors are torch's own list (what ``torch.device("meta")`` redirects).
_FACTORIES: frozenset[Any] = frozenset(_device_constructors())
_SPECIAL: frozenset[Any] = _FACTORIES | {torch.normal, torch.Tensor.cpu, nn.init.kaiming_uniform_}


class _OnMeta(DeviceContext):
    """``torch.device("meta")``, plus what it leaves out, in one torch function mode.

    * ``torch.normal(mean, std, size)`` goes on the meta device, as ``torch.randn`` does: torch leaves
      ``normal`` out of its device constructors (its tensor overloads take no device), so a size read
      from a config would otherwise be allocated for real.
    * ``tensor.cpu()`` of a meta tensor stays that tensor (torch cannot copy out of the meta device):
      PEFT's ``get_prompt_embedding_to_save`` ends in ``.cpu()``, and only the shape is wanted here.
    * ``nn.init.kaiming_uniform_`` of a meta tensor with values to fill returns it unfilled. A meta
      tensor holds no values, so the fill is a no-op; but torch runs it through its Python
      decomposition of ``uniform_`` (about 20 µs a call), and PEFT calls it twice for every LoRA layer
      it injects (``nn.Linear``'s own init, then ``reset_lora_parameters``). What can fail in it still
      runs: its fan needs two dimensions, its gain a known nonlinearity (``calculate_gain``).

    One mode rather than ``torch.device("meta")`` with a second mode on top: every torch call made
    inside (PEFT's injection makes thousands, a ``requires_grad_`` per parameter of every adapter
    already loaded) goes through each active mode in Python, so a second one doubles that cost.
    """

    def __init__(self) -> None:
        super().__init__(_META)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func not in _SPECIAL:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = dict(kwargs) if kwargs else {}
        if func is nn.init.kaiming_uniform_:
            tensor = kwargs.get("tensor", args[0] if args else None)
            if _fill_is_noop(tensor, kwargs):
                return tensor
        elif func is torch.Tensor.cpu:
            if args and getattr(args[0], "is_meta", False):
                return args[0]
        elif func is torch.normal:
            if ("size" in kwargs or len(args) >= 3) and kwargs.get("device") is None:
                kwargs["device"] = _META
        elif kwargs.get("device") is None:
            kwargs["device"] = _META
        return func(*args, **kwargs)


def _fill_is_noop(tensor: Any, kwargs: dict[str, Any]) -> bool:
    """Whether ``nn.init.kaiming_uniform_(tensor, **kwargs)`` would only fill a meta tensor: it has
    values to fill (a 0-element one warns instead) and two dimensions for its fan, and the arguments
    it checks are valid (the mode torch knows; ``calculate_gain`` raises on an unknown nonlinearity)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_meta or tensor.dim() < 2 or tensor.numel() == 0:
        return False
    if kwargs.get("mode", "fan_in") not in ("fan_in", "fan_out"):
        return False
    nn.init.calculate_gain(kwargs.get("nonlinearity", "leaky_relu"), kwargs.get("a", 0))
    return True


@contextmanager
def on_meta() -> Iterator[None]:
    """Tensors created inside are on the meta device (``torch.device("meta")`` and ``torch.normal``),
    and a meta tensor's ``.cpu()`` stays on it.

    Example:
        >>> with on_meta():
        ...     torch.normal(mean=0.0, std=0.02, size=(5_000_000, 512)).cpu().device
        device(type='meta')
    """
    with _OnMeta():
        yield


def twin_of(tensor: torch.Tensor, *, plain: bool = False) -> torch.Tensor:
    """A tensor on the meta device that stands for ``tensor``: same class (``nn.Parameter`` and its
    subclasses, e.g. bitsandbytes' ``Params4bit``), shape, dtype, ``requires_grad`` and attributes.

    Attribute values are shallow copies (tensors among them shared): bitsandbytes rebinds fields of a
    weight's ``quant_state`` when its layer is saved, which must not reach the real weight's state.
    ``plain=True`` makes a plain ``nn.Parameter`` without attributes (when only names and shapes
    matter: a bitsandbytes parameter cannot be deep-copied on the meta device).

    Example:
        >>> twin_of(nn.Parameter(torch.ones(2, 3))).device
        device(type='meta')
    """
    empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    twin: torch.Tensor
    if isinstance(tensor, nn.Parameter):
        cls = nn.Parameter if plain else type(tensor)
        twin = torch.Tensor._make_subclass(cls, empty, tensor.requires_grad)
    else:
        twin = empty
    if plain:
        return twin
    own = vars(tensor)
    if own:
        vars(twin).update({k: v if isinstance(v, torch.Tensor) else copy.copy(v) for k, v in own.items()})
    return twin


def tensor_slots(module: nn.Module) -> tuple[dict[str, torch.Tensor | None], ...]:
    """A module's own parameter and buffer dicts, typed as what is stored in them here: a twin is a
    plain meta tensor when the real one is (the buffers), a parameter when it is one; the loader
    puts empty tensors where the meta ones sit."""
    return (module._parameters, module._buffers)  # type: ignore[return-value]


def _storage_key(tensor: torch.Tensor) -> int:
    return int(tensor.untyped_storage()._cdata)


class MetaTwins:
    """Every parameter and buffer of ``model`` swapped, in place, for its meta twin.

    A tensor two modules share (tied embeddings) gets one twin, shared the same way.

    Args:
        model: The model whose tensors to swap.
        only: Swap only the tensors this accepts (default: all).
        skip: Modules whose subtrees are left as they are (the adapters already loaded, whose tensors
            an injection of another adapter neither reads nor writes): the walks then cost the same
            however many adapters the model holds.

    Example:
        >>> model = nn.Linear(2, 3)
        >>> weight = model.weight
        >>> twins = MetaTwins(model)
        >>> model.weight.device  # PEFT injects into model here: shapes only
        device(type='meta')
        >>> twins.restore(model)
        >>> model.weight is weight
        True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        only: Callable[[torch.Tensor], bool] | None = None,
        skip: AbstractSet[nn.Module] = frozenset(),
    ) -> None:
        # twin id -> (real tensor, twin, the twin's storage and version when made)
        self._real: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
        self._skip = skip
        made: dict[int, torch.Tensor] = {}
        real = self._real
        for module in all_modules(model, skip=skip):
            for slot in tensor_slots(module):
                if not slot:
                    continue
                for name, tensor in slot.items():
                    if (
                        tensor is None
                        or tensor.device.type == "meta"
                        or (only is not None and not only(tensor))
                    ):
                        continue
                    twin = made.get(id(tensor))
                    if twin is None:
                        twin = twin_of(tensor)
                        made[id(tensor)] = twin
                        real[id(twin)] = (tensor, twin, _storage_key(twin), twin._version)
                    slot[name] = twin

    def is_twin(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is one of the twins."""
        return id(tensor) in self._real

    def written(self) -> list[torch.Tensor]:
        """The real tensors whose twins were written while they stood in: in place (a version bump) or
        by swapping their storage (``weight.data = ...``), as inits that rewrite the base weights do."""
        return [
            real
            for real, twin, storage, version in self._real.values()
            if twin._version != version or _storage_key(twin) != storage
        ]

    def restore(self, model: nn.Module, *, modules: list[nn.Module] | None = None) -> None:
        """Put the real tensors back wherever a twin sits in ``model``, with the ``requires_grad`` the
        twin ended with (PEFT freezes the base weights while injecting). ``modules``: the caller's walk
        of ``model`` (``all_modules(model, skip=...)`` with this ``skip``), to save one."""
        real = self._real
        if not real:
            return  # nothing was swapped (e.g. no tensor ``only`` accepted): nothing to look for
        for module in modules if modules is not None else all_modules(model, skip=self._skip):
            for slot in tensor_slots(module):
                if not slot:
                    continue
                for name, tensor in slot.items():
                    entry = real.get(id(tensor)) if tensor is not None else None
                    if entry is None:
                        continue
                    original, twin = entry[0], entry[1]
                    grad = twin.requires_grad
                    if isinstance(original, nn.Parameter) and original.requires_grad is not grad:
                        original.requires_grad_(grad)
                    slot[name] = original


def all_modules(model: nn.Module, *, skip: AbstractSet[nn.Module] = frozenset()) -> list[nn.Module]:
    """``model.modules()`` as a list (each module once, parents first), walked without generators;
    the subtrees of ``skip`` left out.

    ``nn.Module.modules()`` nests one generator per level, so each module it yields passes through
    every level above it; a model holding many adapters is deep and wide, and the walks here run on
    every load. The order is the same as ``modules()``.
    """
    found: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen or (skip and module in skip):
            continue
        seen.add(id(module))
        found.append(module)
        children = module._modules
        if children:
            stack.extend(reversed([c for c in children.values() if c is not None]))
    return found


def modules_along(root: nn.Module, path: str) -> list[nn.Module] | None:
    """The modules from ``root`` down a dotted submodule ``path`` (``root`` first; ``""`` is ``root``
    itself), or ``None`` when a name on it is not a submodule.

    ``get_submodule`` asks ``hasattr`` and then ``getattr`` at each step, both through
    ``nn.Module.__getattr__``; this reads each ``_modules`` dict once (~10x cheaper), for lookups
    made once per adapter key.

    Example:
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
        >>> [type(m).__name__ for m in modules_along(model, "0.0")]
        ['Sequential', 'Sequential', 'Linear']
        >>> modules_along(model, "0.bias") is None
        True
    """
    found = [root]
    module = root
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            return None
        found.append(child)
        module = child
    return found


@contextmanager
def shielded(model: nn.Module, tensors: Callable[[torch.Tensor], bool]) -> Iterator[Callable[[], None]]:
    """Stand meta twins in for the ``tensors`` of ``model`` during the block; the real ones are back after.

    For code that reads a model's ``state_dict()`` but must not change what it reads: bitsandbytes'
    4-bit layers on CPUs with AVX512-BF16 re-pack their weight at the first forward, and their
    ``state_dict()`` unpacks it again, in place and lossily (every later forward differs) -- and PEFT's
    ``set_peft_model_state_dict`` walks ``model.state_dict()`` to map the file's keys.

    Yields:
        A function that puts the real tensors back early (idempotent): before anything that must see
        them, e.g. the ``load_state_dict`` that follows the walk.
    """
    twins = MetaTwins(model, only=tensors)
    try:
        yield lambda: twins.restore(model)
    finally:
        twins.restore(model)


def skeleton(model: nn.Module, *, plain: bool = False) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are meta twins.

    Every module is a new object of the same class with a shallow copy of the original's attributes
    (one level of its dicts, lists and sets copied, so that adding to them leaves the original
    alone); submodules and tensors shared within ``model`` stay shared within the copy. Nothing is
    allocated but Python objects; ``model`` is not changed. ``plain`` as for :func:`twin_of`.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 3))
        >>> copy_ = skeleton(model)
        >>> next(copy_.parameters()).device, next(model.parameters()).device
        (device(type='meta'), device(type='cpu'))
        >>> copy_[0] is model[0]
        False
    """
    modules: dict[int, nn.Module] = {}
    tensors: dict[int, torch.Tensor] = {}

    def meta(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        twin = tensors.get(id(tensor))
        if twin is None:
            twin = tensors[id(tensor)] = twin_of(tensor, plain=plain)
        return twin

    def copy_module(module: nn.Module) -> nn.Module:
        done = modules.get(id(module))
        if done is not None:
            return done
        new: nn.Module = object.__new__(type(module))
        modules[id(module)] = new
        state: dict[str, Any] = {}
        for key, value in vars(module).items():
            if key == "_parameters" or key == "_buffers":
                state[key] = {k: meta(v) for k, v in value.items()}
            elif key == "_modules":
                state[key] = {k: None if v is None else copy_module(v) for k, v in value.items()}
            elif isinstance(value, (dict, list, set)):
                state[key] = value.copy()
            else:
                state[key] = value
        vars(new).update(state)
        return new

    return copy_module(model)
