"""Capture and restore every module's ``training`` flag and every parameter's ``requires_grad``.

Restoring per module (never by a blanket ``model.train()``) keeps the modules a user froze or put
in eval on purpose exactly as they were.
"""

from __future__ import annotations

from torch import nn


class ModeSnapshot:
    """The ``training`` flag of every module and ``requires_grad`` of every parameter of a model.

    Example:
        >>> snap = ModeSnapshot(model)  # doctest: +SKIP
        >>> model.set_adapter("other")  # may flip requires_grad  # doctest: +SKIP
        >>> snap.restore()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module) -> None:
        self.flags = [(m, m.training) for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        """Put every captured flag back; modules and parameters added since are left alone."""
        for module, training in self.flags:
            module.training = training
        for param, requires_grad in self.grads:
            param.requires_grad_(requires_grad)
