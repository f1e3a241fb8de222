"""Read an adapter's files once, with bounds, and keep the digest of the very bytes that are parsed.

Every file safe_lora uses is read here, whole and once: a config, a weights file, a signature. The
read refuses what is not a regular file *before* opening it for reading (a FIFO would block forever,
``/dev/zero`` would never end), re-checks the type on the open descriptor (the path may have been
swapped in between), and never reads more than the caller's bound. The digests that provenance
checks compare (a pinned sha256, the hub's record, a signature's manifest) are computed over these
same bytes, so nothing can change between the check and the use.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "JSON_MAX_DEPTH",
    "FileBytes",
    "PickleRefused",
    "TensorInfo",
    "Weights",
    "dtype_name",
    "git_blob_sha1",
    "parse_json_object",
    "parse_pickle",
    "parse_safetensors",
    "read_bounded",
    "sha256_hex",
    "special_file",
]

# Bytes per read() call past the size fstat gave (a file that grows while it is read): large enough
# to be fast, small enough that the bound is checked often.
_CHUNK = 1 << 20


def special_file(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file, or ``None`` when it is one.

    Symlinks are followed: the Hugging Face cache links every file to a blob, so a link to a regular
    file is a regular file. Nothing is opened, so a FIFO cannot block here.

    Returns:
        ``None`` for a regular file; ``"missing"`` when nothing (or a dangling link) is there;
        otherwise a description such as ``"a directory"``, ``"a FIFO (named pipe)"`` or
        ``"a character device"``.

    Example:
        >>> special_file(Path("/dev/null"))
        'a character device'
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as exc:  # a symlink loop, no permission, a name too long, ...
        return f"unreadable ({exc.strerror or type(exc).__name__})"
    if stat.S_ISREG(mode):
        return None
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data``, lower-case hex: what ``sha256sum`` prints and the Hub records for LFS files.

    Example:
        >>> sha256_hex(b"")[:16]
        'e3b0c44298fc1c14'
    """
    return hashlib.sha256(data).hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data``: what the Hub records (``ETag``, the tree API's ``oid``) for a file
    that is not stored with Git LFS, such as ``adapter_config.json``.

    Example:
        >>> git_blob_sha1(b"")
        'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    """
    return hashlib.sha1(b"blob %d\x00" % len(data) + data, usedforsecurity=False).hexdigest()


class FileBytes:
    """One file as read: its path and its bytes, with their sha256 computed once.

    The digest is computed when first asked for (a pin is compared before anything is parsed), or
    on a second thread once :meth:`hash_in_background` is called: a loader that needs it only for
    its receipt has it hashed while PEFT injects the adapter (pure Python, on one core; ``hashlib``
    releases the GIL while it hashes). On an 11 MiB adapter that hides ~6 ms; hashed while the
    tensors are parsed and scanned, it slowed those instead.

    Attributes:
        path: Where the bytes were read from.
        data: The file's content (until :meth:`release`).
        sha256: ``sha256_hex(data)``.
    """

    __slots__ = ("_data", "_digest", "path")

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self._data: bytes | None = data
        self._digest = _Digest(data)

    @classmethod
    def of(cls, path: Path, data: bytes) -> FileBytes:
        """The record of ``data`` read from ``path``, its digest computed from these bytes."""
        return cls(path, data)

    @property
    def data(self) -> bytes:
        if self._data is None:
            raise RuntimeError(f"the bytes read from {self.path} were released after parsing")
        return self._data

    @property
    def sha256(self) -> str:
        return self._digest.result()

    def hash_in_background(self) -> None:
        """Start computing :attr:`sha256` on a daemon thread, for a large file not yet hashed."""
        self._digest.start()

    def release(self) -> None:
        """Drop the bytes (the digest stays): a load that holds the parsed tensors needs them no more,
        and keeping them would make its peak memory one file larger than PEFT's."""
        self._data = None

    def __repr__(self) -> str:
        return f"FileBytes(path={self.path!r}, sha256={self.sha256!r})"


# Files at least this large are hashed on a second thread (starting one costs ~50 us).
_THREADED_DIGEST_BYTES = 1 << 20


class _Digest:
    """The sha256 of some bytes, computed when asked for or, for large ones, on a daemon thread."""

    __slots__ = ("_data", "_thread", "_value")

    def __init__(self, data: bytes) -> None:
        self._value: str | None = None
        self._data: bytes | None = data
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        data = self._data
        if self._thread is not None or data is None:
            return  # hashing or hashed
        if len(data) < _THREADED_DIGEST_BYTES:
            self._run()
        else:
            self._thread = threading.Thread(target=self._run, name="safe_lora-sha256", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        data = self._data
        if data is not None:
            self._value = sha256_hex(data)
            self._data = None

    def result(self) -> str:
        if self._thread is not None:
            self._thread.join()
        if self._value is None:
            # Not asked for before, or the thread did not run to its end in this process (it was
            # forked meanwhile): the bytes are still held, so the digest is computed here.
            self._run()
        assert self._value is not None
        return self._value


def read_bounded(path: Path, *, max_bytes: int, error: Callable[[str, str], Exception]) -> FileBytes:
    """Read a regular file whole, refusing anything else and anything larger than ``max_bytes``.

    The file is opened without blocking and its type checked with ``fstat`` on the open descriptor,
    so a FIFO or a device put where a file should be is refused rather than read, and no more than
    ``max_bytes + 1`` bytes are ever read.

    Args:
        path: The file.
        max_bytes: The largest size accepted, in bytes.
        error: Builds the exception to raise from ``(what was found, what to do)``, e.g.
            ``("is a FIFO (named pipe)", "replace it with the adapter's file")``; the caller picks the
            error type (a config and a weights file fail differently).

    Returns:
        The bytes read and their sha256.

    Raises:
        Exception: Whatever ``error`` builds: not a regular file, unreadable, or larger than
            ``max_bytes``.

    Example:
        >>> read_bounded(Path("adapter_config.json"), max_bytes=1 << 20, error=lambda f, h: ValueError(f))
        ... # doctest: +SKIP
        FileBytes(path=PosixPath('adapter_config.json'), sha256='9f2c...')
    """
    kind = special_file(path)
    if kind is not None:
        raise error(f"is {kind}", "replace it with the adapter's real file")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0)  # Windows: no newline translation
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"cannot be opened ({exc.strerror or exc})", "check the file's permissions") from exc
    try:
        # The descriptor's own type: the path may have been swapped since special_file() looked.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error("is not a regular file", "replace it with the adapter's real file")
        if info.st_size > max_bytes:
            raise _too_large(error, max_bytes)
        # A file already larger than the bound is refused unread. Otherwise the file is read in one
        # call sized by fstat (+1, to see a file that grew): one buffer, no chunks to join (joining
        # 1 MiB chunks cost ~20x the read itself, in page faults of two copies), and the loop only
        # runs again for a file that is still growing -- up to the bound, never past it.
        chunks: list[bytes] = []
        size = 0
        want = min(info.st_size, max_bytes) + 1
        while size <= max_bytes:
            chunk = os.read(fd, min(max(want, _CHUNK), max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            want = 0
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})", "re-download or re-save the adapter") from exc
    finally:
        os.close(fd)
    if size > max_bytes:
        raise _too_large(error, max_bytes)
    return FileBytes.of(path, chunks[0] if len(chunks) == 1 else b"".join(chunks))


def _too_large(error: Callable[[str, str], Exception], max_bytes: int) -> Exception:
    return error(
        f"is larger than {_size(max_bytes)}",
        "re-save the adapter with save_pretrained (its files stay far below this bound)",
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


# --------------------------------------------------------------------------------------------------
# Parsing the bytes read
# --------------------------------------------------------------------------------------------------

# The safetensors spelling of each torch dtype (the header's "dtype" field), the one spelling safe_lora
# uses for dtypes in reports and errors, whichever format the tensors came from.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    **{
        getattr(torch, name): code
        for name, code in (
            ("uint16", "U16"),
            ("uint32", "U32"),
            ("uint64", "U64"),
            ("float8_e4m3fn", "F8_E4M3"),
            ("float8_e5m2", "F8_E5M2"),
            ("float8_e8m0fnu", "F8_E8M0"),
            ("float4_e2m1fn_x2", "F4"),
        )
        if hasattr(torch, name)
    },
}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of ``dtype`` (``"F32"``, ``"BF16"``, ``"I64"``, ...).

    Example:
        >>> dtype_name(torch.bfloat16)
        'BF16'
    """
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file describes it: its dtype (safetensors spelling) and shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Weights:
    """A weights file parsed: every tensor, and what the file says of each.

    Attributes:
        header: ``{key: TensorInfo}`` in the file's order.
        tensors: ``{key: tensor}``, on the CPU, built from the bytes read (nothing read twice).
        nbytes: The bytes of tensor data.
    """

    header: dict[str, TensorInfo]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> Weights:
        header = {k: TensorInfo(dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
        return cls(header, tensors, sum(t.nbytes for t in tensors.values()))


def parse_safetensors(file: FileBytes, *, error: Callable[[str, str], Exception]) -> Weights:
    """The tensors of a safetensors file's bytes, by safetensors itself (``safetensors.torch.load``).

    safetensors refuses a header that is too large, overflowing shapes, and offsets past the end,
    overlapping or with gaps, before building any tensor; every tensor is backed by the bytes read.

    Raises:
        Exception: What ``error`` builds, when safetensors refuses the bytes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(file.data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise error(f"is not a valid safetensors file ({exc})", "re-save or re-download the adapter") from exc
    return Weights.of(tensors)


class PickleRefused(Exception):
    """A pickle holds objects ``torch.load(weights_only=True)`` will not build (it would run code)."""


def parse_pickle(file: FileBytes, *, error: Callable[[str, str], Exception]) -> Weights:
    """The tensors of an ``adapter_model.bin`` pickle's bytes, by ``torch.load(weights_only=True)``.

    Only a ``{str: tensor}`` dict is accepted.

    Raises:
        PickleRefused: The pickle holds objects ``weights_only`` refuses to build.
        Exception: What ``error`` builds: unreadable (truncated, garbage), or not a tensor dict.
    """
    import io
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            loaded = torch.load(io.BytesIO(file.data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise PickleRefused(str(exc).splitlines()[0]) from exc
        raise error(_broken(exc), "re-save or re-download the adapter") from exc
    except Exception as exc:  # torch.load raises KeyError/EOFError/RuntimeError/... for broken files
        raise error(_broken(exc), "re-save or re-download the adapter") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        found = (
            f"a {type(loaded).__name__}"
            if not isinstance(loaded, dict)
            else "a dict with "
            + ", ".join(sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in loaded.items()})[:5])
        )
        raise error(
            f"holds {found}, not a dict of tensor names to tensors",
            "re-save the adapter with save_pretrained",
        )
    return Weights.of(dict(loaded))


def _broken(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"is not a readable torch pickle ({type(exc).__name__}: {first})"


# save_pretrained nests at most 3 levels (a sub-config's list). Deeper JSON is not a PEFT config, and
# copying or saving it later would recurse once per level.
JSON_MAX_DEPTH = 32


def parse_json_object(file: FileBytes, *, error: Callable[[str, str], Exception]) -> dict[str, Any]:
    """The JSON object in a file's bytes: UTF-8, an object, nested at most :data:`JSON_MAX_DEPTH`.

    Raises:
        Exception: What ``error`` builds: not UTF-8 JSON, not an object, or nested too deeply.
    """
    try:
        raw = json.loads(file.data.decode("utf-8"))
    except RecursionError as exc:  # json recurses once per nesting level
        raise error(f"is nested deeper than Python can parse ({exc})", "re-save the adapter") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSON syntax, integers of >4300 digits
        raise error(f"is not valid UTF-8 JSON ({exc})", "re-save the adapter or repair the file") from exc
    if not isinstance(raw, dict):
        raise error(
            f"holds a JSON {type(raw).__name__}, not an object", "re-save the adapter with save_pretrained"
        )
    depth = _depth(raw)
    if depth > JSON_MAX_DEPTH:
        raise error(
            f"is nested {depth} levels deep (save_pretrained writes at most a few; the limit is "
            f"{JSON_MAX_DEPTH})",
            "re-save the adapter",
        )
    return raw


def _depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value``, walked without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest
