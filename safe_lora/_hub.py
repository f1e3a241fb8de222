"""Fetch files of one adapter folder from the Hugging Face Hub at one pinned commit, and check their bytes
against the Hub's own record of each file.

:func:`open_folder` asks the hub one metadata question (``HfApi.model_info(files_metadata=True)``, i.e.
``GET /api/models/{repo}/revision/{rev}?blobs=true``): which commit the revision is, which files the repo
holds at that commit, and what the Hub recorded for each of them (the sha256 of an LFS file, the git blob
sha1 of any other). It downloads nothing. :meth:`HubFolder.fetch` then downloads single files by name with
``hf_hub_download``, pinned to that commit, so the config and the weights of one load come from the same
commit even if the branch moves in between, and a warm cache answers without another request. (The first
file goes by the revision's name while the cache does not yet map that name to the commit, so that
huggingface_hub records the mapping for later offline loads; see :meth:`HubFolder._download`.)
:meth:`HubFolder.read` reads a file once and checks those very bytes against the Hub's record, which
huggingface_hub itself never does. Which files to fetch is the caller's decision
(:mod:`safe_lora._config`): nothing here lists a folder to download "everything".

Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) and when the hub cannot be reached or does
not answer in time, the answer comes from the local Hugging Face cache instead -- with a
:class:`HubUnreachableWarning` in the second case, since the cached revision may be older than the hub's.

Only huggingface_hub's public API is used: the cache is read through ``HfApi.resolve_revision``,
``snapshot_download`` and ``try_to_load_from_cache`` with ``local_files_only=True``, and written only by
``hf_hub_download``. Every request is bounded in time by huggingface_hub's own ``HF_HUB_ETAG_TIMEOUT``
and ``HF_HUB_DOWNLOAD_TIMEOUT``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from safe_lora._readers import FileBytes, git_blob_sha1, read_bounded
from safe_lora._version import __version__
from safe_lora.errors import (
    AdapterAccessError,
    AdapterIntegrityError,
    AdapterNotFoundError,
    HubUnreachableWarning,
    warn,
)

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoSibling

__all__ = ["Digest", "DigestKind", "HubFolder", "Token", "open_folder"]

logger = logging.getLogger(__name__)

_LIBRARY = "safe-lora"  # huggingface_hub adds it to its user agent
_TOKEN_HINT = "pass token= (a token with read access), or log in once with `hf auth login` / set HF_TOKEN"
# What the Hub records: a sha256 for an LFS file, a git blob sha1 for any other (lower-case hex).
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "git-sha1": re.compile(r"[0-9a-f]{40}")}

Token = str | bool | None
DigestKind = Literal["sha256", "git-sha1"]
Digest = tuple[DigestKind, str]


@dataclass
class _FirstDownload:
    """Whether the next download goes by the revision's *name* (see :meth:`HubFolder._download`)."""

    by_name: bool = False


@dataclass(frozen=True)
class HubFolder:
    """One folder of a hub repo at one commit, answered by the hub or by the local cache.

    Attributes:
        repo_id: E.g. ``"org/name"``.
        subfolder: The folder inside the repo (``None``: the repo's root).
        revision: The revision asked for (``"main"`` when none was).
        commit: The commit ``revision`` resolved to; every file read or fetched comes from this commit.
        online: ``True`` when the hub answered; ``False`` when the local cache did.
        files: Names of the files directly in the folder, with their sizes in bytes when known.
        repo_files: Every file path of the repo at ``commit`` (offline: of the cached snapshot).
        offline_reason: Why the cache answered (``"HF_HUB_OFFLINE=1"``, ...); ``None`` when online.
        digests: Online, what the Hub recorded for each file of the repo at ``commit``, by path in the
            repo (from ``model_info(files_metadata=True)``: ``siblings[].lfs.sha256``, else
            ``siblings[].blob_id``); empty offline, where :meth:`recorded_digest` asks the cache.
        snapshot: Offline, this folder in the cached snapshot of ``commit`` (found with
            ``snapshot_download(local_files_only=True)``); ``None`` online.
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
    digests: Mapping[str, Digest] = field(default_factory=dict, repr=False)
    _first: _FirstDownload = field(default_factory=_FirstDownload, repr=False, compare=False)

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

    def path_in_repo(self, name: str) -> str:
        """``name`` of the folder as a path in the repo (``"sub/adapter_config.json"``)."""
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def recorded_digest(self, name: str) -> Digest | None:
        """What the Hub recorded for ``name`` at :attr:`commit`: ``("sha256", hex)`` for an LFS file,
        ``("git-sha1", hex)`` (its git blob id) for any other.

        Online this is the hub's answer to the metadata question (:attr:`digests`). Offline it is the
        name the cache filed the file's bytes under, which is the digest the hub announced when they were
        downloaded (``X-Linked-Etag`` or ``ETag``, see :func:`_cached_digest`).

        Returns:
            The digest, or ``None`` when nothing is known (not listed, not cached, or a cache that copies
            files instead of linking them).
        """
        if self.online:
            return self.digests.get(self.path_in_repo(name))
        return _cached_digest(self.repo_id, self.path_in_repo(name), self.cache_dir, self.commit)

    def fetch(self, name: str) -> Path:
        """Download ``name`` of the folder at :attr:`commit` (or take it from the cache); its local path.

        Nothing is checked here; :meth:`read` checks the bytes against the Hub's record.

        Raises:
            AdapterNotFoundError: The file is not there, or the hub went away mid-way.
            AdapterAccessError: The hub refused the download (gated or private repo, bad token).
        """
        if not self.online:
            return self._cached(name)
        return self._download(name, force=self.force_download)

    def read(self, name: str, *, max_bytes: int, error: Callable[[str, str], Exception]) -> FileBytes:
        """Fetch ``name``, read it once, and check the bytes read against what the Hub recorded.

        The digest (:meth:`recorded_digest`) is compared with the digest of the very bytes returned, so
        nothing can change between the check and the caller's parsing: parse ``.data``, never the file.
        On a mismatch online, the file is downloaded again once (``force_download``), read and checked
        again: a cached blob changed on disk is repaired on the way. Without a record (see
        :meth:`recorded_digest`) the bytes are returned as read.

        Args:
            name: The file, in the folder.
            max_bytes: The largest size accepted. Online, a file the hub lists as larger is refused before
                it is downloaded.
            error: Builds the error for a file that is not a regular file, unreadable or too large, from
                ``(what was found, what to do)`` (see :func:`safe_lora._readers.read_bounded`).

        Returns:
            The bytes read, whose digest matches the Hub's record.

        Raises:
            AdapterIntegrityError: The bytes do not match the Hub's record, also after downloading them
                again (online), or the cached copy does not match it (offline).
            AdapterNotFoundError: As :meth:`fetch`.
            AdapterAccessError: As :meth:`fetch`.
            Exception: Whatever ``error`` builds.
        """
        size = self.files.get(name)
        if self.online and size is not None and size > max_bytes:
            raise error(
                f"is larger than {max_bytes} bytes ({size} bytes {self.where})",
                "re-save the adapter with save_pretrained (its files stay far below this bound)",
            )
        recorded = self.recorded_digest(name)
        got = read_bounded(self.fetch(name), max_bytes=max_bytes, error=error)
        if recorded is None or _digest(got, recorded[0]) == recorded[1]:
            return got
        if self.online:
            # A cached blob changed on disk, or a download damaged on the way: huggingface_hub never
            # compares bytes with the record, so download again once, pinned to the commit.
            logger.info("%s of %s does not match the hub's record; downloading it again.", name, self.label)
            got = read_bounded(
                self._download(name, force=True, pinned=True), max_bytes=max_bytes, error=error
            )
            if _digest(got, recorded[0]) == recorded[1]:
                return got
        self._raise_integrity(name, recorded, _digest(got, recorded[0]))

    # --- private -------------------------------------------------------------------------------

    def _cached(self, name: str) -> Path:
        found = _cached_file(self.repo_id, self.path_in_repo(name), self.cache_dir, self.commit)
        if found is not None:
            return found
        raise AdapterNotFoundError(
            f"Adapter file not found: {name} of {self.label} is not {self.where} — expected it "
            f"downloaded by an earlier online load — load once with the hub reachable.",
            path=self.repo_id,
        )

    def _download(self, name: str, *, force: bool, pinned: bool = False) -> Path:
        """``hf_hub_download`` of ``name`` at :attr:`commit`.

        The first download of a folder whose revision name the cache does not yet map to :attr:`commit`
        goes by the *name* instead: huggingface_hub then records ``revision -> commit`` in the cache
        itself (its ``refs/``), which an offline load by that name needs later. If the name now
        resolves to another commit (the branch moved since the metadata question), the file is
        downloaded again at :attr:`commit`, so every file of one load still comes from one commit.
        """
        if self._first.by_name and not pinned:
            self._first.by_name = False
            by_name = self._hf_download(name, revision=self.revision, force=force)
            at_commit = _cached_file(self.repo_id, self.path_in_repo(name), self.cache_dir, self.commit)
            if at_commit is not None and os.path.samefile(at_commit, by_name):
                return by_name
            logger.info(
                "Revision %r of %r moved past commit %s while loading; fetching %s at that commit.",
                self.revision,
                self.repo_id,
                self.commit[:7],
                name,
            )
        return self._hf_download(name, revision=self.commit, force=force)

    def _hf_download(self, name: str, *, revision: str, force: bool) -> Path:
        from huggingface_hub import constants, hf_hub_download
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
                revision=revision,
                token=self.token,
                cache_dir=self.cache_dir,
                force_download=force,
                # The HEAD's bound; the GET is bounded by HF_HUB_DOWNLOAD_TIMEOUT inside huggingface_hub.
                etag_timeout=constants.HF_HUB_ETAG_TIMEOUT,
                library_name=_LIBRARY,
                library_version=__version__,
            )
        except RemoteEntryNotFoundError as exc:
            expected, hint = (
                ("the file the hub listed a moment ago", "retry, or check the repo")
                if name in self.files
                else (f"one of {sorted(self.files)}", "check the file name and subfolder=")
            )
            raise AdapterNotFoundError(
                f"Adapter file not found: {self.label} has no {name} {self.where} ({_short(exc)}) — "
                f"expected {expected} — {hint}.",
                path=self.repo_id,
            ) from exc
        except RepositoryNotFoundError as exc:  # GatedRepoError too: the repo exists (it was listed)
            _raise_access(self.repo_id, name, exc)
        except HfHubHTTPError as exc:
            if exc.response.status_code in (401, 403):
                _raise_access(self.repo_id, name, exc)
            self._raise_download_failed(name, exc)
        except (LocalEntryNotFoundError, _no_answer_error()) as exc:
            self._raise_download_failed(name, exc)
        except ValueError as exc:
            # hf_hub_download's "Force download failed due to the above error.": the HEAD failed.
            if not force or exc.__cause__ is None:
                raise
            self._raise_download_failed(name, exc.__cause__)
        return Path(downloaded)

    def _raise_download_failed(self, name: str, exc: BaseException) -> NoReturn:
        raise AdapterNotFoundError(
            f"Adapter download failed: {name} of {self.label} could not be fetched ({_short(exc)}) and "
            f"is not in the local cache — expected the hub to stay reachable — retry.",
            path=self.repo_id,
        ) from exc

    def _raise_integrity(self, name: str, recorded: Digest, actual: str) -> NoReturn:
        kind, expected = recorded
        path = self.path_in_repo(name)
        if self.online:
            how = "also when downloaded again"
            hint = (
                "something between you and the hub alters the file (a proxy, a mirror, HF_ENDPOINT?) — "
                "check the connection and HF_ENDPOINT, and do not load this copy"
            )
        else:
            how = f"{self.where}, filed under the digest the hub announced when it was downloaded"
            where = f" --cache-dir {self.cache_dir}" if self.cache_dir is not None else ""
            hint = (
                f"the cached copy changed on disk — load it once with the hub reachable to download it "
                f"again, or delete it (`hf cache rm hf://models/{self.repo_id}/{path}{where}`)"
            )
        raise AdapterIntegrityError(
            f"Adapter file integrity check failed: {name} of {self.label} — its bytes do not match the "
            f"{kind} the Hub recorded — expected {kind} {expected}, found {actual} ({how}) — {hint}.",
            path=f"{self.repo_id}/{path}",
            expected=expected,
            actual=actual,
        )


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
        The folder; :meth:`HubFolder.read` (or :meth:`HubFolder.fetch`) gets single files of it.

    Raises:
        AdapterNotFoundError: No such repo or revision, or offline (or the hub unreachable, or silent
            for ``HF_HUB_ETAG_TIMEOUT`` seconds) and not cached.
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
        commit, siblings = _ask_hub(repo_id, revision=revision, token=token)
    except _Unreachable as exc:
        if force_download:
            _raise_cannot_force(repo_id, exc.reason)
        folder = _from_cache(reason=exc.reason, **common)
        warn(
            f"Hugging Face Hub unreachable ({exc.detail}): loading adapter {folder.label} from the local "
            f"cache, which may be older than the hub's revision — check the connection (or set "
            f"HF_HUB_OFFLINE=1 to mean it).",
            HubUnreachableWarning,
        )
        return folder

    prefix = f"{sub}/" if sub else ""
    files = {
        s.rfilename[len(prefix) :]: s.size
        for s in siblings
        if s.rfilename.startswith(prefix) and "/" not in s.rfilename[len(prefix) :]
    }
    digests = {s.rfilename: d for s in siblings if (d := _recorded(s)) is not None}
    # Does the cache already map the revision's name to this commit? If not, the first download goes by
    # name so that huggingface_hub records it (see HubFolder._download).
    stale = revision != commit and _cached_commit(repo_id, revision, cache) != commit
    return HubFolder(
        commit=commit,
        online=True,
        files=files,
        repo_files=tuple(sorted(s.rfilename for s in siblings)),
        offline_reason=None,
        digests=digests,
        _first=_FirstDownload(by_name=stale),
        **common,
    )


class _Unreachable(Exception):
    """The hub did not answer (no connection, no answer in time, 5xx); the cause is the library's error.

    Attributes:
        detail: The cause in a few words, e.g. ``"ConnectError: [Errno 111] Connection refused"``.
        reason: Why the cache answers instead, for :attr:`HubFolder.offline_reason` and messages.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        timeout = _timeout_of(cause)
        if timeout is None:
            self.detail = _short(cause)
            self.reason = f"the hub is unreachable: {self.detail}"
        else:
            self.detail = f"{_short(cause)}; no answer within {timeout:g} s, HF_HUB_ETAG_TIMEOUT"
            self.reason = (
                f"the hub did not answer within {timeout:g} s ({_short(cause)}; HF_HUB_ETAG_TIMEOUT)"
            )


def _ask_hub(repo_id: str, *, revision: str, token: Token) -> tuple[str, list[RepoSibling]]:
    """``(commit, every file of the repo with size and digest)`` of ``revision``, from one request."""
    from huggingface_hub import HfApi, constants
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
        # huggingface_hub's session has no timeout of its own (`timeout=None`): without this bound a hub
        # that accepts the connection and never answers would hold the load forever.
        info = api.model_info(
            repo_id,
            revision=revision,
            files_metadata=True,
            token=token,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
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
            raise _Unreachable(exc) from exc
        raise AdapterNotFoundError(
            f"Adapter not found: the Hugging Face Hub refused {repo_id!r} at revision {revision!r} "
            f"({_short(exc)}) — expected a repo id and revision the hub knows — check both.",
            path=repo_id,
        ) from exc
    except (OfflineModeIsEnabled, _no_answer_error()) as exc:
        raise _Unreachable(exc) from exc
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
    return str(info.sha), list(info.siblings or [])


def _recorded(sibling: RepoSibling) -> Digest | None:
    """The Hub's record of one file in a ``model_info(files_metadata=True)`` answer.

    ``lfs.sha256`` for an LFS file (the sha256 of its content), else ``blob_id`` (the git blob sha1 of
    its content) -- the same rule as huggingface_hub's own ``verify_repo_checksums``.
    """
    lfs = sibling.lfs
    if lfs is not None:
        return _digest_or_none("sha256", lfs.sha256)
    return _digest_or_none("git-sha1", sibling.blob_id)


def _digest_or_none(kind: DigestKind, value: object) -> Digest | None:
    text = str(value).lower() if value else ""
    return (kind, text) if _HEX[kind].fullmatch(text) else None


def _digest(got: FileBytes, kind: DigestKind) -> str:
    return got.sha256 if kind == "sha256" else git_blob_sha1(got.data)


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
    """The folder as the local cache holds it, asked through huggingface_hub with ``local_files_only``."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    commit = _cached_commit(repo_id, revision, cache_dir)
    snapshot: Path | None = None
    if commit is not None:
        try:
            snapshot = Path(
                snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
            )
        except IncompleteSnapshotError as exc:
            # A snapshot_download'ed tree lists files this cache lacks: the cached ones are still usable.
            snapshot = Path(exc.snapshot_path)
        except (LocalEntryNotFoundError, HFValidationError):
            snapshot = None
    if commit is None or snapshot is None:
        root = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
        raise AdapterNotFoundError(
            f"Adapter not found: {repo_id!r} is not a local folder, and revision {revision!r} of it is not "
            f"in the Hugging Face cache ({os.fspath(root)}) — {reason}, so nothing was downloaded — "
            f"load it once with the hub reachable, or pass the folder's path.",
            path=repo_id,
        )
    # The folder snapshot_download answered with: what an online load put there, listed as it is.
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


def _cached_commit(repo_id: str, revision: str, cache_dir: str | None) -> str | None:
    """The commit the cache maps ``revision`` to (a commit is itself), or ``None``; no request is made."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RevisionResolutionError

    try:
        resolved = HfApi(library_name=_LIBRARY, library_version=__version__).resolve_revision(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True
        )
    except (RevisionResolutionError, HFValidationError):
        return None
    return str(resolved.resolved)


def _cached_file(repo_id: str, path_in_repo: str, cache_dir: str | None, commit: str) -> Path | None:
    """The cached copy of ``path_in_repo`` at ``commit`` (``try_to_load_from_cache``), or ``None``."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, path_in_repo, cache_dir=cache_dir, revision=commit)
    return Path(found) if isinstance(found, str) else None


def _cached_digest(repo_id: str, path_in_repo: str, cache_dir: str | None, commit: str) -> Digest | None:
    """The digest the cache filed ``path_in_repo`` at ``commit`` under, or ``None``.

    huggingface_hub documents its cache layout (``hf_hub_download``'s docstring, ``CachedFileInfo``):
    a snapshot's file is a symlink to ``blobs/<name>``, the name being the git sha1 or the sha256 of the
    file -- the ``X-Linked-Etag`` / ``ETag`` the hub announced for it. So the link's first hop names the
    record; a further hop may lead into the shared blob store, named otherwise. This is the same single
    ``readlink`` that ``scan_cache_dir`` does for ``CachedFileInfo.blob_path``; that function is not used
    because it walks every repo of the cache and drops a whole repo over one stale ref. Where the cache
    copies files instead of linking them (no symlinks on the system) there is no record: ``None``.
    """
    found = _cached_file(repo_id, path_in_repo, cache_dir, commit)
    if found is None:
        return None
    try:
        blob = os.path.basename(os.readlink(found))
    except OSError:  # not a link: a copied file carries no name to check against
        return None
    kind: DigestKind = "sha256" if len(blob) == 64 else "git-sha1"
    return _digest_or_none(kind, blob)


def _no_answer_error() -> type[Exception]:
    """The error of "the hub did not answer": no connection, a timeout, a broken exchange.

    ``model_info`` raises these straight from huggingface_hub's HTTP client (e.g. ``ReadTimeout`` when
    a hub accepts the connection and stays silent), and so does ``hf_hub_download`` on a failed GET
    (read in huggingface_hub 2.4's ``hf_api.py`` and ``file_download.http_get``). They are neither
    ``OSError`` nor ``TimeoutError``, and no huggingface_hub class wraps them; huggingface_hub
    re-exports its client module for downstream code as ``huggingface_hub.utils.httpx`` (kept "across
    major versions"), so the base class is taken from there rather than by importing a client here.
    A ``ProxyError`` counts as no answer too (huggingface_hub itself raises it instead of falling back):
    the cache still answers, and the warning names the proxy error.
    """
    # `httpx` is in huggingface_hub.utils.__all__, which is built at run time: mypy cannot see it.
    from huggingface_hub.utils import httpx as client  # type: ignore[attr-defined]

    error: type[Exception] = client.TransportError
    return error


def _timeout_of(exc: BaseException) -> float | None:
    """The ``HF_HUB_ETAG_TIMEOUT`` that ran out when ``exc`` is the client's timeout error, else ``None``."""
    from huggingface_hub import constants
    from huggingface_hub.utils import httpx as client  # type: ignore[attr-defined]

    return float(constants.HF_HUB_ETAG_TIMEOUT) if isinstance(exc, client.TimeoutException) else None


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
