"""Every error and warning safe_lora raises, in one place.

Each error subclasses :class:`SafeLoraError` *and* the built-in exception a caller would already
catch, so ``except FileNotFoundError`` or ``except ValueError`` keeps working. Errors carry the
facts as attributes (``path``, ``missing_keys``, ...) so code can react without parsing messages.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safe_lora._dropout_find import DropoutSite

__all__ = [
    "AdapterAccessError",
    "AdapterConfigError",
    "AdapterExistsError",
    "AdapterIntegrityError",
    "AdapterMergeError",
    "AdapterNotFoundError",
    "AdapterWeightsError",
    "BaseModelMismatchWarning",
    "HubUnreachableWarning",
    "NoAdapterWarning",
    "NoOpAdapterWarning",
    "NondeterministicModelError",
    "SafeLoraError",
    "SafeLoraWarning",
    "StochasticAdapterWarning",
    "UnknownAdapterError",
    "UnknownConfigFieldWarning",
    "UnsafeAdapterError",
]


def _fmt_keys(keys: Iterable[str], limit: int = 10) -> str:
    """Sorted, comma-separated, cut after ``limit`` so a broken 7B adapter does not print 500 lines."""
    ordered = sorted(keys)
    shown = ", ".join(ordered[:limit])
    if len(ordered) > limit:
        shown += f", and {len(ordered) - limit} more"
    return shown


# Frames that are not the caller's line: safe_lora's own, and the standard library's context-manager
# machinery between a ``with`` statement and a generator-based context manager.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def _outside(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not path.startswith(_PACKAGE) and path != _CONTEXTLIB


def _user_frame(depth: int = 1) -> types.FrameType:
    """The first frame outside safe_lora (and ``contextlib``) above the caller's ``depth``-th frame.

    The public entry points reach their checks through different call paths (context managers
    through ``contextlib`` too, the decorator form through its wrapper), so a fixed ``stacklevel``
    would blame a safe_lora frame on some of them. When every frame is safe_lora's (``python -m
    safe_lora``), the outermost one.
    """
    frame = sys._getframe(depth + 1)
    while frame.f_back is not None and not _outside(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a ``warnings.warn`` made by the calling function at the first
    caller outside safe_lora (see :func:`warn`, which every warning of safe_lora goes through)."""
    frame = sys._getframe(1)  # the function that calls warnings.warn: stacklevel 1
    level = 1
    while frame.f_back is not None and not _outside(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the caller's line, not to safe_lora's code.

    Every warning safe_lora emits goes through here, whatever public entry point and call path led to
    it, so that the printed location, a recorded warning's ``filename`` and ``lineno``, and
    ``warnings.filterwarnings(..., module=...)`` name the caller's file and line.

    The frame is found here and handed to ``warnings.warn_explicit`` -- with the module name,
    ``__warningregistry__`` and globals ``warnings.warn`` itself would use for it -- rather than
    turned into a ``stacklevel``: ``skip_file_prefixes`` exists only from Python 3.12, and a
    ``stacklevel`` counted here need not be the one ``warnings.warn`` counts (it steps over
    importlib's frames, for one). The same frame on Python 3.10 to 3.13.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("example", SafeLoraWarning)
        >>> caught[0].category.__name__, str(caught[0].message), caught[0].lineno
        ('SafeLoraWarning', 'example', 3)
    """
    frame = _user_frame(1)
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=registry,
        # No module_globals, as warnings.warn's C implementation passes none: with them, Python asks
        # the frame's __loader__ for the source line, and __main__ run from stdin or -c has
        # BuiltinImporter, which raises ImportError instead of warning.
    )


class SafeLoraError(Exception):
    """Root of every error raised by safe_lora."""


class AdapterNotFoundError(SafeLoraError, FileNotFoundError):
    """The adapter folder, its ``adapter_config.json`` or its weights file does not exist.

    Attributes:
        path: The path (or hub id) that was looked up.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterAccessError(SafeLoraError, PermissionError):
    """The Hugging Face Hub refused an adapter's files: a gated or private repo, or a token without access.

    Attributes:
        path: The hub repo id.
        status: The HTTP status the hub answered with (401, 403), when known.
    """

    def __init__(self, message: str, *, path: str, status: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.status = status

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterConfigError(SafeLoraError, ValueError):
    """The adapter config is unreadable, not JSON, of an unknown PEFT type, or targets nothing.

    Also: not a regular file, too large or too deeply nested, non-finite numbers, or fields the
    installed PEFT does not know.

    Attributes:
        path: The adapter folder or config file (or ``None`` when a config object was passed in).
        fields: The config fields concerned, sorted, e.g. ``["alpha_pattern.fc1", "lora_alpha"]``
            for non-finite numbers or the unknown fields (empty when the error is not about fields).
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, fields: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.fields = sorted(fields)


class AdapterWeightsError(SafeLoraError, ValueError):
    """The adapter weights cannot be loaded as they are: corrupt file, wrong keys, wrong shapes, NaN/inf.

    Attributes:
        path: The weights file.
        missing_keys: Keys the config's targets expect that the file lacks (sorted).
        unexpected_keys: Keys in the file that nothing in the model consumes (sorted).
        mismatched_keys: ``{key: (shape in file, shape expected)}``.
        nonfinite_keys: Keys whose tensors hold NaN or inf (sorted).
        wrong_dtypes: ``{key: dtype in file}`` for tensors of a dtype the adapter cannot hold.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        missing_keys: Sequence[str] = (),
        unexpected_keys: Sequence[str] = (),
        mismatched_keys: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
        nonfinite_keys: Sequence[str] = (),
        wrong_dtypes: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.missing_keys = sorted(missing_keys)
        self.unexpected_keys = sorted(unexpected_keys)
        self.mismatched_keys = dict(sorted((mismatched_keys or {}).items()))
        self.nonfinite_keys = sorted(nonfinite_keys)
        self.wrong_dtypes = dict(sorted((wrong_dtypes or {}).items()))


class AdapterIntegrityError(SafeLoraError, ValueError):
    """A file's bytes are not the bytes someone vouched for: a pinned digest, the hub's record, a signature.

    Raised before the model is touched. The digest is computed over the very bytes that are parsed,
    so nothing can change between the check and the use.

    Attributes:
        path: The file whose bytes were checked (or, for a hub file, ``repo_id/filename``).
        expected: The sha256 (hex) the file was expected to have, when the check is a digest;
            ``None`` for a signature that did not verify.
        actual: The sha256 (hex) of the bytes read; ``None`` when the file was not read.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = os.fspath(path)
        self.expected = expected
        self.actual = actual


class UnsafeAdapterError(SafeLoraError, ValueError):
    """The adapter ships only pickle weights (``adapter_model.bin``) and the caller did not opt in.

    Attributes:
        path: The pickle file that was refused.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str]) -> None:
        super().__init__(message)
        self.path = os.fspath(path)


class AdapterMergeError(SafeLoraError, ValueError):
    """``merge=True`` was asked for an adapter that cannot be merged into the base weights as it computes.

    Raised before anything is merged: the tuner cannot merge at all, one of its layers fails to, or a
    layer's weight is shared with other modules (tied embeddings) in a way the merged model could
    not keep apart once saved and reloaded.

    Attributes:
        peft_type: The tuner's PEFT type, e.g. ``"IA3"`` or ``"PROMPT_TUNING"``.
        layer: The qualified name of the layer that fails, e.g.
            ``"base_model.model.lm_head"``; ``None`` when the tuner cannot merge at all.
        tied_modules: For a shared weight, the names of every module sharing it (in the base model,
            sorted), e.g. ``["lm_head", "model.embed_tokens"]``; empty otherwise.
    """

    def __init__(
        self, message: str, *, peft_type: str, layer: str | None = None, tied_modules: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.peft_type = peft_type
        self.layer = layer
        self.tied_modules = sorted(tied_modules)


class _AdapterNameError(SafeLoraError):
    """Shared shape of the errors about an adapter's name.

    Attributes:
        name: The name asked for.
        available: The adapter names the model holds (sorted).
    """

    def __init__(self, message: str, *, name: str, available: Iterable[str]) -> None:
        super().__init__(message)
        self.name = name
        self.available = sorted(available)


class UnknownAdapterError(_AdapterNameError, KeyError):
    """An adapter name was asked for that the model does not hold (``name``, ``available``)."""

    def __str__(self) -> str:
        # KeyError would repr() the message and wrap it in quotes.
        return str(self.args[0])


class AdapterExistsError(_AdapterNameError, ValueError):
    """An adapter is loaded under a name the model already holds (``name``, ``available``)."""


class NondeterministicModelError(SafeLoraError, RuntimeError):
    """A model that must be deterministic (for serving) still has live dropout.

    Attributes:
        sites: The live dropout sites, as returned by :func:`safe_lora.live_dropout`.
    """

    def __init__(self, message: str, *, sites: Sequence[DropoutSite]) -> None:
        super().__init__(message)
        self.sites = list(sites)


class SafeLoraWarning(UserWarning):
    """Root of every warning emitted by safe_lora."""


class BaseModelMismatchWarning(SafeLoraWarning):
    """The adapter was trained on a different base model than the one it is loaded into."""


class HubUnreachableWarning(SafeLoraWarning):
    """The Hugging Face Hub could not be reached; the adapter was loaded from the local cache instead."""


class NoAdapterWarning(SafeLoraWarning):
    """A model handed to :func:`safe_lora.deterministic_lora` holds no adapter layers."""


class StochasticAdapterWarning(SafeLoraWarning):
    """An adapter layer is stochastic by design (e.g. PVeRA sampling at inference) and cannot be frozen."""


class NoOpAdapterWarning(SafeLoraWarning):
    """Every output factor of the adapter is zero (or at its identity value): loading it changes nothing.

    The usual causes: a checkpoint saved before the first training step, or weights gathered wrongly
    (e.g. from a sharded run). Not an error, also not with ``strict=True``: a freshly initialised
    adapter is legitimate.
    """


class UnknownConfigFieldWarning(SafeLoraWarning):
    """The adapter config holds a field the installed PEFT does not know, with a value meaning "absent".

    PEFT would drop it silently; safe_lora drops it too, but says so. Any other value of an unknown
    field is refused with :class:`AdapterConfigError`.
    """
