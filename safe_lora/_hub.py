"""Fetch files of one adapter folder from the Hugging Face Hub, by name, at one pinned commit.

:func:`open_folder` asks the hub one metadata question (``/api/models/{repo}/revision/{rev}``):
which commit the revision is, and which files the repo holds at that commit. It downloads nothing.
:meth:`HubFolder.fetch` then downloads single files by name at that commit, so the config and the
weights of one load always come from the same commit even if the branch moves in between, and a
warm cache answers without another request. Which files to fetch is the caller's decision
(:mod:`safe_lora._config`): nothing here lists a folder to download "everything".

Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) and when the hub cannot be reached, the
answer comes from the local Hugging Face cache instead -- with a :class:`HubUnreachableWarning` in the
second case, since the cached revision may be older than the hub's.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from safe_lora._version import __version__
from safe_lora.errors import AdapterAccessError, AdapterNotFoundError, HubUnreachableWarning, _user_stacklevel

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_LIBRARY = "safe-lora"  # huggingface_hub adds it to its user agent
_TOKEN_HINT = "pass token= (a token with read access), or log in once with `hf auth login` / set HF_TOKEN"

Token = str | bool | None


@dataclass(frozen=True)
class HubFolder:
    """One folder of a hub repo at one commit, answered by the hub or by the local cache.

    Attributes:
        repo_id: E.g. ``"org/name"``.
        subfolder: The folder inside the repo (``None``: the repo's root).
        revision: The revision asked for (``"main"`` when none was).
        commit: The commit ``revision`` resolved to; every file is fetched at this commit.
        online: ``True`` when the hub answered; ``False`` when the local cache did.
        files: Names of the files directly in the folder, with their sizes in bytes when known.
        repo_files: Every file path of the repo at ``commit`` (offline: of the cached snapshot).
        offline_reason: Why the cache answered (``"HF_HUB_OFFLINE=1"``, ...); ``None`` when online.
    """

    repo_id: str
    subfolder: str | None
    revision: str
    commit: str
    online: bool
    files: dict[str, int | None]
    repo_files: tuple[str, ...]
    offline_reason: str | None
    token: Token = field(repr=False)  # never printed
    cache_dir: str | None
    force_download: bool
    snapshot: Path | None = None

    @property
    def label(self) -> str:
        """``'org/name' at revision 'main' (commit 0123abc), subfolder 'sub'`` for messages."""
        text = f"{self.repo_id!r} at revision {self.revision!r}"
        if self.commit != self.revision:
            text += f" (commit {self.commit[:7]})"
        return text + (f", subfolder {self.subfolder!r}" if self.subfolder else "")

    @property
    def where(self) -> str:
        """``on the hub`` or ``in the local Hugging Face cache (why)``, for messages."""
        return "on the hub" if self.online else f"in the local Hugging Face cache ({self.offline_reason})"

    def fetch(self, name: str) -> Path:
        """Download ``name`` of the folder at :attr:`commit` (or take it from the cache); its local path.

        Raises:
            AdapterNotFoundError: The file is not there, or the hub went away mid-way.
            AdapterAccessError: The hub refused the download (gated or private repo, bad token).
        """
        if not self.online:
            assert self.snapshot is not None
            cached = self.snapshot / name
            if cached.is_file():
                return cached
            raise AdapterNotFoundError(
                f"Adapter file not found: {name} of {self.label} is not {self.where} — expected it "
                f"downloaded by an earlier online load — load once with the hub reachable.",
                path=self.repo_id,
            )
        import httpx2
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
        )

        try:
            downloaded = hf_hub_download(
                self.repo_id,
                name,
                subfolder=self.subfolder or None,
                revision=self.commit,  # pinned: the config and the weights of one load share a commit
                token=self.token,
                cache_dir=self.cache_dir,
                force_download=self.force_download,
                library_name=_LIBRARY,
                library_version=__version__,
            )
        except RemoteEntryNotFoundError as exc:  # listed a moment ago; the hub changed its mind
            raise AdapterNotFoundError(
                f"Adapter file not found: {self.label} has no {name} {self.where} ({_short(exc)}) — "
                f"expected the file the hub listed — retry, or check the repo.",
                path=self.repo_id,
            ) from exc
        except RepositoryNotFoundError as exc:  # GatedRepoError too: the repo exists (it was listed)
            _raise_access(self.repo_id, name, exc)
        except HfHubHTTPError as exc:
            if exc.response.status_code in (401, 403):
                _raise_access(self.repo_id, name, exc)
            raise
        except (LocalEntryNotFoundError, httpx2.TransportError) as exc:
            raise AdapterNotFoundError(
                f"Adapter download failed: {name} of {self.label} could not be fetched ({_short(exc)}) and "
                f"is not in the local cache — expected the hub to stay reachable — retry.",
                path=self.repo_id,
            ) from exc
        return Path(downloaded)


def open_folder(
    repo_id: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: Token = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> HubFolder:
    """Resolve ``revision`` of ``repo_id`` to a commit and list the repo's files; nothing is downloaded.

    Args:
        repo_id: E.g. ``"org/name"``.
        subfolder: The adapter's folder inside the repo.
        revision: A branch, tag or commit (default: the default branch).
        token: As huggingface_hub takes it (``None``: the saved login or ``HF_TOKEN``).
        cache_dir: The Hugging Face cache to use (default: ``HF_HUB_CACHE``).
        force_download: Fetch files again even when cached.
        local_files_only: Ask the local cache only, as with ``HF_HUB_OFFLINE=1``.

    Returns:
        The folder; :meth:`HubFolder.fetch` downloads single files of it.

    Raises:
        AdapterNotFoundError: No such repo or revision, or offline and not cached.
        AdapterAccessError: The hub refused (gated or private repo, bad token).
    """
    from huggingface_hub import constants

    revision = revision or constants.DEFAULT_REVISION
    sub = subfolder.strip("/") if subfolder else None
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    common: dict[str, Any] = {
        "repo_id": repo_id,
        "subfolder": sub or None,
        "revision": revision,
        "token": token,
        "cache_dir": cache,
        "force_download": force_download,
    }
    if local_files_only or constants.is_offline_mode():
        reason = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
        if force_download:
            _raise_cannot_force(repo_id, reason)
        logger.debug("Adapter %r: %s, reading the local Hugging Face cache only.", repo_id, reason)
        return _from_cache(reason=reason, **common)

    try:
        commit, repo_files, sizes = _ask_hub(repo_id, revision=revision, token=token)
    except _Unreachable as exc:
        reason = f"the hub is unreachable: {_short(exc.__cause__ or exc)}"
        if force_download:
            _raise_cannot_force(repo_id, reason)
        folder = _from_cache(reason=reason, **common)
        warnings.warn(
            f"Hugging Face Hub unreachable ({_short(exc.__cause__ or exc)}): loading adapter {folder.label} "
            f"from the local cache, which may be older than the hub's revision — check the connection "
            f"(or set HF_HUB_OFFLINE=1 to mean it).",
            HubUnreachableWarning,
            stacklevel=_user_stacklevel(),
        )
        return folder

    _remember_revision(cache, repo_id, revision, commit)
    prefix = f"{sub}/" if sub else ""
    files = {
        path[len(prefix) :]: sizes.get(path)
        for path in repo_files
        if path.startswith(prefix) and "/" not in path[len(prefix) :]
    }
    return HubFolder(
        commit=commit, online=True, files=files, repo_files=repo_files, offline_reason=None, **common
    )


class _Unreachable(Exception):
    """The hub did not answer (no connection, timeout, 5xx); the cause is the library's error."""


def _ask_hub(repo_id: str, *, revision: str, token: Token) -> tuple[str, tuple[str, ...], dict[str, int]]:
    """``(commit, every file path, sizes)`` of ``revision``, from one metadata request."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        api = HfApi(library_name=_LIBRARY, library_version=__version__)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token)
    except GatedRepoError as exc:
        _raise_access(repo_id, None, exc)
    except RepositoryNotFoundError as exc:
        # The hub answers 401 for a private repo without a token, exactly as for a missing one.
        raise AdapterNotFoundError(
            f"Adapter not found: {repo_id!r} is not a local folder, and the Hugging Face Hub has no repo "
            f"{repo_id!r} ({_status(exc)}) — expected a folder written by save_pretrained or a hub repo id "
            f"— check the spelling; if the repo is private, {_TOKEN_HINT}.",
            path=repo_id,
        ) from exc
    except RevisionNotFoundError as exc:
        raise AdapterNotFoundError(
            f"Adapter revision not found: repo {repo_id!r} has no revision {revision!r} ({_status(exc)}) — "
            f"expected a branch, tag or commit of that repo — check revision=.",
            path=repo_id,
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            _raise_access(repo_id, None, exc)
        if status >= 500:
            raise _Unreachable() from exc
        raise AdapterNotFoundError(
            f"Adapter not found: the Hugging Face Hub refused {repo_id!r} at revision {revision!r} "
            f"({_short(exc)}) — expected a repo id and revision the hub knows — check both.",
            path=repo_id,
        ) from exc
    except (httpx2.TransportError, OfflineModeIsEnabled) as exc:
        raise _Unreachable() from exc
    except HFValidationError as exc:
        raise AdapterNotFoundError(
            f"Adapter not found: {repo_id!r} is neither a local folder nor a valid hub repo id "
            f"({exc}) — check the path.",
            path=repo_id,
        ) from exc
    if not info.sha:
        raise AdapterNotFoundError(
            f"Adapter not found: the hub's answer for {repo_id!r} at revision {revision!r} names no commit "
            f"— expected a Hugging Face Hub endpoint — check HF_ENDPOINT.",
            path=repo_id,
        )
    siblings = info.siblings or []
    sizes = {s.rfilename: s.size for s in siblings if s.size is not None}
    return str(info.sha), tuple(sorted(s.rfilename for s in siblings)), sizes


def _from_cache(
    *,
    repo_id: str,
    subfolder: str | None,
    revision: str,
    token: Token,
    cache_dir: str | None,
    force_download: bool,
    reason: str,
) -> HubFolder:
    """The folder as the local cache holds it: ``refs/<revision>`` names the commit, ``snapshots/`` files."""
    root, storage = _storage(cache_dir, repo_id)
    commit: str | None = revision if _COMMIT.fullmatch(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise AdapterNotFoundError(
            f"Adapter not found: {repo_id!r} is not a local folder, and revision {revision!r} of it is not "
            f"in the Hugging Face cache ({os.fspath(root)}) — {reason}, so nothing was downloaded — "
            f"load it once with the hub reachable, or pass the folder's path.",
            path=repo_id,
        )
    assert commit is not None
    repo_files = tuple(sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()))
    folder = snapshot / subfolder if subfolder else snapshot
    files: dict[str, int | None] = (
        {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}
    )
    return HubFolder(
        repo_id=repo_id,
        subfolder=subfolder,
        revision=revision,
        commit=commit,
        online=False,
        files=files,
        repo_files=repo_files,
        offline_reason=reason,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
        snapshot=folder,
    )


def _storage(cache_dir: str | None, repo_id: str) -> tuple[Path, Path]:
    """The Hugging Face cache in use and the repo's folder in it, laid out as huggingface_hub does."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    return root, root / repo_folder_name(repo_id=repo_id, repo_type="model")


def _remember_revision(cache_dir: str | None, repo_id: str, revision: str, commit: str) -> None:
    """Write ``refs/<revision>`` as huggingface_hub does, so that an offline load finds this commit later.

    Files are fetched at the commit itself, which huggingface_hub does not record as a ref.
    Best effort: a read-only cache only loses the offline fallback.
    """
    if revision == commit:
        return
    ref = _storage(cache_dir, repo_id)[1] / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text(encoding="utf-8").strip() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit, encoding="utf-8")
    except OSError as exc:
        logger.debug("Could not record revision %r of %r in the cache: %s", revision, repo_id, exc)


def _raise_access(repo_id: str, name: str | None, exc: Exception) -> NoReturn:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    what = f"{name} of {repo_id!r}" if name else repr(repo_id)
    gated = type(exc).__name__ == "GatedRepoError"
    kind = "a gated repo that has not granted this token access" if gated else "a private or restricted repo"
    raise AdapterAccessError(
        f"Adapter access refused: the Hugging Face Hub answered {status} for {what}, {kind} "
        f"({_short(exc)}) — expected read access — {_TOKEN_HINT}"
        + (f"; request access on the repo's page first ({repo_id})" if gated else "")
        + ".",
        path=repo_id,
        status=status,
    ) from exc


def _raise_cannot_force(repo_id: str, reason: str) -> NoReturn:
    raise AdapterNotFoundError(
        f"Adapter not downloaded: force_download=True needs the hub, but {reason} — expected a reachable "
        f"hub — retry online, or drop force_download= to use the cached copy.",
        path=repo_id,
    )


def _status(exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status is not None else type(exc).__name__


def _short(exc: BaseException) -> str:
    """The first line of an error, with its type: huggingface_hub's messages run to several paragraphs."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
