"""Switching between several adapters on one base without side effects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft import PeftModel

from safe_lora._loading import _activate
from safe_lora._modes import ModeSnapshot
from safe_lora.errors import UnknownAdapterError


@contextmanager
def use_adapter(model: PeftModel, name: str) -> Iterator[PeftModel]:
    """Activate one adapter for a block; restore the previous active adapter(s) on exit.

    PEFT's ``set_adapter`` switches ``requires_grad`` on for the adapter it activates — in a frozen
    inference model that silently makes it trainable. Here every module's mode and every
    parameter's ``requires_grad`` are exactly as before, inside the block and after it, also when
    the block raises.

    Args:
        model: A ``PeftModel`` holding ``name``.
        name: The adapter to activate inside the block.

    Yields:
        ``model``, with ``name`` active.

    Raises:
        UnknownAdapterError: The model holds no adapter called ``name``.

    Example:
        >>> model = load_for_inference(base, {"chat": "out/chat", "sql": "out/sql"})  # doctest: +SKIP
        >>> with use_adapter(model, "sql"):  # doctest: +SKIP
        ...     answer = model(**batch)
    """
    if name not in model.peft_config:
        raise UnknownAdapterError(
            f"Unknown adapter: expected one of {sorted(model.peft_config)}, found {name!r} — load it "
            f"first with safe_lora.load_adapter, or pick a loaded name.",
            name=name,
            available=model.peft_config,
        )
    previous = list(model.active_adapters)
    modes = ModeSnapshot(model)
    try:
        _activate(model, [name])
        modes.restore()
        yield model
    finally:
        _activate(model, previous)
        modes.restore()
