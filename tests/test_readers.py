"""The file readers: bounded reads, and the digest of the very bytes read."""

from __future__ import annotations

import hashlib
import os
import resource
import time
from pathlib import Path

import pytest

from safe_lora._readers import FileBytes, read_bounded


def _error(found: str, hint: str) -> ValueError:
    return ValueError(f"{found} — {hint}")


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 7])
def test_the_digest_is_the_sha256_of_the_bytes_read(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    file = read_bounded(path, max_bytes=1 << 30, error=_error)
    assert file.data == data
    # Large files are hashed on a second thread; the value is the same either way.
    assert file.sha256 == hashlib.sha256(data).hexdigest()
    assert file.sha256 == file.sha256


def test_released_bytes_keep_their_digest_and_refuse_reuse(tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    file = FileBytes(tmp_path / "f", data)
    file.release()
    assert file.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(RuntimeError, match="released after parsing"):
        _ = file.data


def test_a_file_larger_than_the_bound_is_refused_unread(tmp_path: Path) -> None:
    # A 4 GiB sparse file: reading it up to the bound would cost the bound in memory and time.
    path = tmp_path / "huge"
    with path.open("wb") as f:
        f.truncate(4 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ValueError, match="is larger than 1 GiB"):
        read_bounded(path, max_bytes=1 << 30, error=_error)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: nothing read


def test_a_file_exactly_at_the_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    assert read_bounded(path, max_bytes=4096, error=_error).data == b"x" * 4096
    with pytest.raises(ValueError, match="is larger than"):
        read_bounded(path, max_bytes=4095, error=_error)
