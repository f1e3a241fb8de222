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
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FileBytes", "git_blob_sha1", "read_bounded", "sha256_hex", "special_file"]

# Bytes per read() call: large enough to be fast, small enough that the bound is checked often.
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


@dataclass(frozen=True)
class FileBytes:
    """One file as read: its path and its bytes, with their sha256 computed once.

    Attributes:
        path: Where the bytes were read from.
        data: The file's content.
        sha256: ``sha256_hex(data)``.
    """

    path: Path
    data: bytes = field(repr=False)
    sha256: str

    @classmethod
    def of(cls, path: Path, data: bytes) -> FileBytes:
        """The record of ``data`` read from ``path``, its digest computed here."""
        return cls(path, data, sha256_hex(data))


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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error("is not a regular file", "replace it with the adapter's real file")
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})", "re-download or re-save the adapter") from exc
    finally:
        os.close(fd)
    if size > max_bytes:
        raise error(f"is larger than {_size(max_bytes)}", "re-save the adapter, or raise the limit")
    return FileBytes.of(path, b"".join(chunks))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"
