"""Where an adapter's files are: a local folder, a hub repo (at one commit), or a Trainer checkpoint.

:func:`open_source` finds an adapter and learns which of its files exist, reading none of them;
:meth:`AdapterSource.read` then reads one file whole, once, with bounds (and, for a hub file, checked
against the sha256 the Hub recorded). Which files to read, and in which order, is the caller's
decision: nothing here lists a folder to fetch "everything".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safe_lora._hub import HubFolder, open_folder
from safe_lora._readers import FileBytes, read_bounded, special_file
from safe_lora.errors import AdapterNotFoundError

__all__ = [
    "CONFIG_NAME",
    "HUB_KWARGS",
    "PICKLE_NAME",
    "SAFETENSORS_NAME",
    "SIGNATURE_NAME",
    "AdapterSource",
    "WeightsFormat",
    "is_hub_id",
    "open_source",
    "trainer_checkpoints",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# An OpenSSF model-signing bundle over the folder's files (see safe_lora._signing).
SIGNATURE_NAME = "model.sig"

# The keyword arguments of PeftModel.from_pretrained that only say *where* the adapter lives and how
# to fetch it.
HUB_KWARGS = (
    "subfolder",
    "revision",
    "cache_dir",
    "token",
    "use_auth_token",
    "force_download",
    "local_files_only",
)

WeightsFormat = Literal["safetensors", "pickle"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# The files an adapter source may be asked for.
_KNOWN = (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, SIGNATURE_NAME)


@dataclass(frozen=True)
class AdapterSource:
    """An adapter found: which of its files exist, none of them read yet.

    Attributes:
        name: What the caller passed: the folder's path, or the hub repo id.
        folder: The local folder (``None`` for a hub repo: its files are read through :attr:`hub`).
        present: The adapter's files that exist (config, weights, signature), with their sizes in
            bytes when known; a name that is there but is not a regular file counts as present (the
            reader refuses it by name).
        hub: For a hub repo, the repo folder at its pinned commit.
    """

    name: str
    folder: Path | None
    present: dict[str, int | None]
    hub: HubFolder | None = None

    @property
    def label(self) -> str:
        """How messages name the adapter: the folder, or the repo at its revision and commit."""
        if self.hub is not None:
            return self.hub.label
        return repr(os.fspath(self.folder)) if self.folder is not None else repr(self.name)

    @property
    def commit(self) -> str | None:
        """The hub commit the files come from; ``None`` for a local folder."""
        return self.hub.commit if self.hub is not None else None

    @property
    def weights_format(self) -> WeightsFormat | None:
        """The format the loaders read: safetensors when present, else pickle; ``None``: neither."""
        if SAFETENSORS_NAME in self.present:
            return "safetensors"
        return "pickle" if PICKLE_NAME in self.present else None

    def where(self, name: str) -> str:
        """``name``'s location for messages and error attributes (a path, or ``repo/sub/name``)."""
        if self.hub is not None:
            return "/".join(part for part in (self.hub.repo_id, self.hub.subfolder, name) if part)
        assert self.folder is not None
        return os.fspath(self.folder / name)

    @property
    def location(self) -> str:
        """The folder itself, for messages and the paths errors carry: a path, or ``repo/sub``."""
        if self.hub is not None:
            return "/".join(part for part in (self.hub.repo_id, self.hub.subfolder) if part)
        assert self.folder is not None
        return os.fspath(self.folder)

    def kind(self, name: str) -> str | None:
        """What a local file is when it is not a regular file (see :func:`special_file`); ``None``
        for a regular file or any hub file (the hub serves files only)."""
        if self.folder is None:
            return None
        kind = special_file(self.folder / name)
        return None if kind == "missing" and name not in self.present else kind

    def read(self, name: str, *, max_bytes: int, error: Callable[[str, str], Exception]) -> FileBytes:
        """Read ``name`` whole, once: a local file with bounds, a hub file downloaded (or cached) and
        checked against the sha256 the Hub recorded for it.

        Raises:
            Exception: What ``error`` builds from ``(what was found, what to do)`` for an unreadable,
                special or oversized file.
            AdapterIntegrityError: A hub file whose bytes are not the ones the Hub recorded.
            AdapterNotFoundError, AdapterAccessError: The hub could not serve the file.
        """
        if self.hub is not None:
            return self.hub.read(name, max_bytes=max_bytes, error=error)
        assert self.folder is not None
        return read_bounded(self.folder / name, max_bytes=max_bytes, error=error)


def is_hub_id(adapter: str | os.PathLike[str]) -> bool:
    """Whether ``adapter`` is not a local path but reads as a hub repo id (``"org/name"``)."""
    text = os.fspath(adapter)
    return not os.path.exists(text) and bool(_REPO_ID.match(text)) and not text.startswith(".")


def open_source(
    adapter: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    use_auth_token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> AdapterSource:
    """Find an adapter and which of its files exist; nothing is read or downloaded yet.

    A folder is used as it is; the path of a file in it (``adapter_model.safetensors``,
    ``adapter_config.json``) stands for its folder. Anything else that reads as a hub repo id
    (``"org/name"``) is looked up on the Hugging Face Hub as ``PeftModel.from_pretrained`` would, at one
    commit; with ``HF_HUB_OFFLINE=1``, ``local_files_only=True`` or an unreachable hub (then with a
    :class:`~safe_lora.errors.HubUnreachableWarning`) the local cache answers instead.

    Args:
        adapter: A folder written by ``save_pretrained`` (or a file in it), or a hub repo id.
        subfolder: The adapter's folder inside ``adapter``.
        revision: With a hub id: a branch, tag or commit (default: the default branch).
        token: With a hub id: the token to use (default: the saved login or ``HF_TOKEN``).
        use_auth_token: The old name of ``token`` (PEFT still accepts it).
        cache_dir: With a hub id: the Hugging Face cache to use.
        force_download: With a hub id: download again even when cached.
        local_files_only: With a hub id: use the local cache only.

    Returns:
        The source; :meth:`AdapterSource.read` reads its files.

    Raises:
        TypeError: ``adapter`` is not a path or a string.
        AdapterNotFoundError: No such folder, repo, revision or config file (or offline and not cached).
        AdapterAccessError: The hub refused the repo (gated or private; pass ``token=``).

    Example:
        >>> source = open_source("org/my-adapter", revision="v1")  # doctest: +SKIP
        >>> source.weights_format  # doctest: +SKIP
        'safetensors'
    """
    if not isinstance(adapter, (str, os.PathLike)):
        raise TypeError(
            f"adapter must be a folder path or a hub repo id (str or os.PathLike), found "
            f"{type(adapter).__name__} — pass the folder save_pretrained wrote, e.g. 'out/my-adapter'."
        )
    text = os.fspath(adapter)
    if not is_hub_id(text):
        local = Path(text)
        if local.is_file() and local.name in _KNOWN:
            local = local.parent  # the path of a file in the adapter folder stands for the folder
        if not local.is_dir():
            raise AdapterNotFoundError(
                f"Adapter folder not found: {text!r} does not exist — expected a folder written by "
                f"PeftModel.save_pretrained — check the path.",
                path=text,
            )
        folder = local / subfolder if subfolder else local
        _require_config(folder)
        present: dict[str, int | None] = {
            name: (folder / name).stat().st_size if kind is None else None
            for name in _KNOWN
            if (kind := special_file(folder / name)) != "missing"
        }
        return AdapterSource(text, folder, present)

    hub = open_folder(
        text,
        subfolder=subfolder,
        revision=revision,
        token=token if token is not None else use_auth_token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    if CONFIG_NAME not in hub.files:
        nested = sorted(
            folder or "."
            for folder, _, name in (path.rpartition("/") for path in hub.repo_files)
            if name == CONFIG_NAME
        )
        hint = (
            f"pass subfolder= one of {nested}"
            if nested
            else "check the repo id and subfolder=; a base model's repo is not an adapter"
        )
        raise AdapterNotFoundError(
            f"Adapter config not found: {hub.label} has no {CONFIG_NAME} {hub.where} — expected the files "
            f"PeftModel.save_pretrained writes, found {sorted(hub.files)} — {hint}.",
            path=text,
        )
    return AdapterSource(text, None, {name: hub.files[name] for name in _KNOWN if name in hub.files}, hub)


def trainer_checkpoints(folder: str | os.PathLike[str]) -> list[Path]:
    """The ``checkpoint-<step>`` adapter folders a ``transformers.Trainer`` wrote into ``folder``, by step.

    Only folders holding ``adapter_config.json`` count, ordered by step rather than by name
    (``checkpoint-1000`` after ``checkpoint-500``).

    Example:
        >>> [p.name for p in trainer_checkpoints("out/run")]  # doctest: +SKIP
        ['checkpoint-500', 'checkpoint-1000']
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [
        (int(match[1]), path)
        for path in root.iterdir()
        if (match := _CHECKPOINT.fullmatch(path.name)) and (path / CONFIG_NAME).is_file()
    ]
    return [path for _, path in sorted(found)]


def _require_config(folder: Path) -> None:
    # special_file, not is_file: a FIFO or a directory named adapter_config.json exists, and the
    # reader refuses it by name instead of "not found".
    if special_file(folder) != "a directory":
        raise AdapterNotFoundError(
            f"Adapter folder not found: {os.fspath(folder)!r} — expected a folder written by "
            f"PeftModel.save_pretrained — check the path (and `subfolder=`).",
            path=folder,
        )
    if special_file(folder / CONFIG_NAME) == "missing":
        present = sorted(p.name for p in folder.iterdir())
        checkpoints = [p.name for p in trainer_checkpoints(folder)]
        hint = (
            f"this is a Trainer output folder: pass one of its checkpoints {checkpoints} "
            f"(the latest is {checkpoints[-1]!r})"
            if checkpoints
            else f"point at the folder that holds {CONFIG_NAME}"
        )
        raise AdapterNotFoundError(
            f"Adapter config not found: no {CONFIG_NAME} in {os.fspath(folder)!r} — expected the files "
            f"PeftModel.save_pretrained writes, found {present[:10]}{' ...' if len(present) > 10 else ''} — "
            f"{hint}.",
            path=folder / CONFIG_NAME,
        )
