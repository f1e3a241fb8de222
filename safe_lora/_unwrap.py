"""One answer to "which module is the model?" for every entry point: through the wrappers around it.

Training and serving code hands safe_lora models wrapped by ``torch.nn.parallel.DistributedDataParallel``
/ ``DataParallel``, FSDP, DeepSpeed's engine, accelerate (which wraps in those) or ``torch.compile``
(``OptimizedModule``, the model under ``_orig_mod``). :func:`unwrap` reaches the model inside all of
them, and :func:`base_of` the base model inside a ``PeftModel``.
"""

from __future__ import annotations

from peft import PeftModel
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["base_of", "compiled", "unwrap"]

# Wrappers that keep the real model under ``.module``, matched by name so that their libraries need
# not be installed: FSDP (torch.distributed), DeepSpeed's engines.
_MODULE_WRAPPER_NAMES = frozenset({"FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine"})


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / FSDP / DeepSpeed / ``torch.compile`` wrappers (any nesting).

    Example:
        >>> import torch
        >>> net = nn.Linear(2, 2)
        >>> unwrap(torch.compile(nn.DataParallel(net))) is net
        True
    """
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner: object = None
        if (
            isinstance(model, (DistributedDataParallel, DataParallel))
            or type(model).__name__ in _MODULE_WRAPPER_NAMES
        ):
            inner = getattr(model, "module", None)
        elif "_orig_mod" in model._modules:  # torch.compile's OptimizedModule
            inner = model._modules["_orig_mod"]
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``), at any wrapper depth."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if "_orig_mod" in model._modules:
            return True
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


def base_of(model: nn.Module) -> nn.Module:
    """The base model inside a ``PeftModel`` (or ``model`` itself), through any wrappers.

    Unlike ``PeftModel.get_base_model`` this also works once the last adapter was deleted (PEFT
    then keeps a stale active adapter name, and ``get_base_model`` raises ``KeyError``).
    """
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        return model
    tuner: nn.Module = model.base_model
    if getattr(model, "_is_prompt_learning", False):
        return tuner
    inner = tuner._modules.get("model")
    return inner if inner is not None else tuner
