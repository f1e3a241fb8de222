"""A small Hugging Face Hub over real HTTP, for tests: the endpoints the huggingface_hub client calls.

Serves repos built from real folders (e.g. what PEFT's ``save_pretrained`` wrote) on 127.0.0.1 at a
random port, in a thread, and logs every request, so tests can assert what was *requested*, not only
what came back. It speaks what huggingface_hub 2.4 calls (read from its source, ``hf_api.py``,
``file_download.py``, ``utils/_http.py``):

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds ``size``, ``blobId`` and, for an LFS
  file, ``lfs: {size, sha256, pointerSize}``): commit ``sha`` and ``siblings``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: one folder's entries (``oid``: the git blob id,
  ``size``, and for an LFS file ``lfs: {oid, size, pointerSize}``, that ``oid`` being its sha256);
- ``POST /api/models/{repo}/paths-info/{rev}``: entries of the paths asked for;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``Content-Length``
  and the Hub's record of it: ``ETag`` = its git blob sha1, or for an LFS file ``X-Linked-Etag`` = its
  sha256 and ``X-Linked-Size`` (``ETag`` then being the LFS pointer's blob sha1);

and the hub's errors as the client tells them apart (``X-Error-Code``): ``RepoNotFound`` (401, as the
hub answers anonymous callers), ``RevisionNotFound`` (404), ``EntryNotFound`` (404, with
``X-Repo-Commit``), ``GatedRepo`` (401 without a token, 403 with a wrong one).

Files named ``*.safetensors`` or ``*.bin`` are LFS files, as the Hub's default ``.gitattributes`` makes
them. Three misbehaviours are there to be switched on: :attr:`HubServer.tamper` flips one byte of a
file's body in transit (headers and metadata keep announcing the true digest), :meth:`HubServer.silenced`
accepts connections, reads the requests and never answers (a black-holed proxy), and
:meth:`HubServer.move_ref_after` moves a branch right after a given request was answered.

Tests run the client in a subprocess, because huggingface_hub reads ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` when it is imported: :meth:`HubServer.run_child` runs named functions of a test
module there (see :func:`child_main`) and hands back each one's result, warnings and requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MARK = "/_test/mark/"
# A silenced request is held at most this long (or until the silence ends), so no thread outlives a test.
SILENT_LIMIT_S = 300.0
LFS_SUFFIXES = (".safetensors", ".bin")


def is_lfs(path: str) -> bool:
    """Whether the hub stores ``path`` with Git LFS (here: by suffix, as the default .gitattributes)."""
    return path.endswith(LFS_SUFFIXES)


def git_sha1(data: bytes) -> str:
    """The git blob id of ``data``: the Hub's record of a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer file git stores for an LFS file; its blob id is the file's ``oid`` / ``blobId``."""
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        hashlib.sha256(data).hexdigest().encode(),
        len(data),
    )


def tampered(data: bytes) -> bytes:
    """``data`` with its middle byte flipped: same length, other digest."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    token: str | None  # the bearer token sent, if any

    @property
    def resolved_file(self) -> str | None:
        """``"sub/adapter_model.safetensors"`` for a ``/resolve/`` request, else ``None``."""
        parts = self.path.split("/")
        return "/".join(parts[5:]) if len(parts) > 5 and parts[3] == "resolve" else None

    @property
    def repo(self) -> str | None:
        """The repo id the request is about, if any."""
        parts = self.path.split("/")
        if len(parts) > 4 and parts[1] == "api" and parts[2] == "models":
            return f"{parts[3]}/{parts[4]}"
        if len(parts) > 3 and parts[3] == "resolve":
            return f"{parts[1]}/{parts[2]}"
        return None


@dataclass
class Repo:
    """A model repo: commits (commit hash -> {path: bytes}) and branches/tags naming them."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated_token: str | None = None  # gated: only this bearer token may download

    def commit_of(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def folder_files(folder: str | os.PathLike[str], prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as ``{prefix + relative path: bytes}``."""
    root = Path(folder)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {prefix + p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


class HubServer:
    """The server: add repos, :meth:`start`, read :attr:`log`, :meth:`stop`.

    Example:
        >>> server = HubServer()
        >>> server.add_repo("org/adapter", {"main": folder_files(path)})  # doctest: +SKIP
        >>> with server:  # doctest: +SKIP
        ...     server.run_child("test_hub", ["load_by_id"], env={})
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        # "repo/path" of files whose GET body gets one byte flipped in transit.
        self.tamper: set[str] = set()
        # While silenced: the event that ends the silence, and which requests it holds (None: all).
        self._silence: tuple[threading.Event, Callable[[Request], bool] | None] | None = None
        self._moves: list[tuple[Callable[[Request], bool], str, str, str]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- content ------------------------------------------------------------------------------

    def add_repo(
        self, repo_id: str, revisions: Mapping[str, Mapping[str, bytes]], *, gated_token: str | None = None
    ) -> dict[str, str]:
        """Add ``repo_id`` with one commit per revision name; returns ``{revision: commit hash}``.

        The first revision is also the default branch ``main`` unless one is named so.
        """
        repo = self.repos.setdefault(repo_id, Repo(gated_token=gated_token))
        for name, files in revisions.items():
            digest = hashlib.sha1(repo_id.encode())
            for path, data in sorted(files.items()):
                digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
            commit = digest.hexdigest()
            repo.commits[commit] = dict(files)
            repo.refs[name] = commit
        if "main" not in repo.refs:
            repo.refs["main"] = repo.refs[next(iter(revisions))]
        return {name: repo.refs[name] for name in revisions}

    def move_ref_after(self, when: Callable[[Request], bool], repo_id: str, ref: str, commit: str) -> None:
        """Point ``ref`` of ``repo_id`` at ``commit`` once the first request matching ``when`` is answered.

        The move happens after that answer is computed and before it is sent, so the next request the
        client makes already sees the moved branch.
        """
        self._moves.append((when, repo_id, ref, commit))

    # --- misbehaviour -------------------------------------------------------------------------

    @contextlib.contextmanager
    def silenced(self, when: Callable[[Request], bool] | None = None) -> Iterator[None]:
        """Inside the block, accept every connection and read its request, but never answer.

        Only the requests matching ``when``, if given (e.g. only downloads). The test markers are always
        answered, so the request log stays split by child function. Held requests end, unanswered, when
        the block does (or after :data:`SILENT_LIMIT_S`).
        """
        release = threading.Event()
        self._silence = (release, when)
        try:
            yield
        finally:
            self._silence = None
            release.set()

    def _hold_if_silenced(self, request: Request) -> bool:
        silence = self._silence
        if silence is None or (silence[1] is not None and not silence[1](request)):
            return False
        silence[0].wait(SILENT_LIMIT_S)
        return True

    def _answered(self, request: Request) -> None:
        with self._lock:
            for move in [m for m in self._moves if m[0](request)]:
                self._moves.remove(move)
                _, repo_id, ref, commit = move
                self.repos[repo_id].refs[ref] = commit

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "the server is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port: later connections are refused (an unreachable hub)."""
        if self._silence is not None:
            self._silence[0].set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- running the client in a subprocess ----------------------------------------------------

    def run_child(
        self,
        module: str,
        names: Iterable[str],
        *,
        env: Mapping[str, str],
        endpoint: str | None = None,
        timeout: float = 600,
    ) -> dict[str, Outcome]:
        """Run functions ``names`` of test module ``module`` in one subprocess pointed at this server.

        Each function runs with warnings recorded; its return value (JSON-able) or the error it
        raised comes back as an :class:`Outcome`, with the requests the server saw while it ran.
        ``env`` is added to a clean copy of the environment (no ``HF_TOKEN``, online unless it says
        ``HF_HUB_OFFLINE``); ``endpoint`` overrides ``HF_ENDPOINT`` (e.g. after :meth:`stop`).
        """
        names = list(names)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
        full_env = {
            **base,
            "HF_ENDPOINT": endpoint or self.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), base.get("PYTHONPATH", "")]),
            **env,
        }
        out = Path(full_env["HUB_TEST_OUT"]) if "HUB_TEST_OUT" in full_env else None
        assert out is not None, "env must name HUB_TEST_OUT, a file the child writes its results to"
        start = len(self.log)
        process = subprocess.run(
            [sys.executable, __file__, module, *names],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert process.returncode == 0, f"child failed:\n{process.stdout}\n{process.stderr}"
        results = json.loads(out.read_text(encoding="utf-8"))
        requests = self.log[start:]
        outcomes = {}
        for name in names:
            begin = _index(requests, MARK + name) + 1
            end = _index(requests, MARK + "_end", begin, names[names.index(name) + 1 :])
            outcomes[name] = Outcome(**results[name], requests=requests[begin:end])
        return outcomes


@dataclass(frozen=True)
class Outcome:
    """What one child function did: its value or error, its warnings, and the requests it made."""

    value: Any
    error: str | None  # the error's type name
    error_types: list[str]  # every class in the error's MRO, e.g. ["AdapterNotFoundError", ...]
    message: str
    # [[category name, message, file name it is blamed on, full path of that file, line], ...]
    warnings: list[list[Any]]
    requests: list[Request]
    error_attrs: dict[str, Any] = field(default_factory=dict)  # e.g. {"path": ..., "expected": ...}
    seconds: float = 0.0  # how long the function ran, measured in the child from its call

    def reraise(self) -> None:
        """Raise the child's safe_lora error here, with its message and attributes (for ``pytest.raises``).

        Does nothing when the child function returned normally.
        """
        if self.error is None:
            return
        from safe_lora import errors

        cls = getattr(errors, self.error, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.SafeLoraError)):
            raise AssertionError(f"the child raised {self.error}, not a safe_lora error: {self.message}")
        error = cls.__new__(cls)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.error_attrs)
        raise error

    @property
    def downloads(self) -> list[str]:
        """The files fetched with a ``GET .../resolve/...``, as ``repo/path``, in order."""
        return [f"{r.repo}/{r.resolved_file}" for r in self.requests if r.method == "GET" and r.resolved_file]

    @property
    def touched(self) -> list[str]:
        """Every file asked about (``HEAD`` or ``GET .../resolve/...``), as ``repo/path``."""
        return [f"{r.repo}/{r.resolved_file}" for r in self.requests if r.resolved_file]

    def warned(self, category: str) -> list[str]:
        return [w[1] for w in self.warnings if w[0] == category]

    def warned_from(self, category: str) -> list[str]:
        """The file names the warnings of ``category`` are blamed on (their ``stacklevel``)."""
        return [w[2] for w in self.warnings if w[0] == category]

    def warned_at(self, category: str) -> list[tuple[str, int]]:
        """``(full path, line)`` of the caller's line each warning of ``category`` is blamed on."""
        return [(w[3], w[4]) for w in self.warnings if w[0] == category]


def _index(requests: list[Request], path: str, begin: int = 0, later: Iterable[str] = ()) -> int:
    """Where the marker ``path`` is (or the first of the ``later`` markers, or the end)."""
    wanted = [path, *(MARK + name for name in later)]
    for i in range(begin, len(requests)):
        if requests[i].path in wanted:
            return i
    return len(requests)


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    _request: Request  # the request being answered
    protocol_version = "HTTP/1.0"  # one request per connection: stop() really cuts everyone off

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # --- dispatch -----------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_POST(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, *, body: bool) -> None:
        split = urllib.parse.urlsplit(self.path)
        raw_parts = split.path.split("/")
        parts = [urllib.parse.unquote(p) for p in raw_parts]
        auth = self.headers.get("Authorization") or ""
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        self._request = Request(self.command, "/".join(parts), urllib.parse.parse_qs(split.query), token)
        self.hub.log.append(self._request)
        if split.path.startswith(MARK):
            return self._send(200, b"ok", body=body)
        if self.hub._hold_if_silenced(self._request):
            return None  # read, logged, never answered: the connection just closes when the silence ends
        if parts[1:3] == ["api", "models"] and len(parts) >= 5:
            return self._api(parts, split.query, token, body=body)
        if len(parts) >= 6 and parts[3] == "resolve":
            return self._resolve(f"{parts[1]}/{parts[2]}", parts[4], "/".join(parts[5:]), token, body=body)
        return self._error(404, "NotFound", "Not found", body=body)

    # --- /api/models/... ----------------------------------------------------------------------

    def _api(self, parts: list[str], query: str, token: str | None, *, body: bool) -> None:
        repo_id = f"{parts[3]}/{parts[4]}"
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found", body=body)
        rest = parts[5:]
        revision = rest[1] if len(rest) >= 2 else "main"
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
        files = repo.commits[commit]
        blobs = "blobs=true" in query.lower()
        if not rest or rest[0] == "revision":
            siblings = [
                {"rfilename": p, **(_sibling_blob(p, d) if blobs else {})} for p, d in sorted(files.items())
            ]
            info = {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "disabled": False,
                "tags": [],
                "downloads": 0,
                "likes": 0,
                "siblings": siblings,
            }
            return self._json(info, body=body)
        if rest[0] == "tree":
            folder = "/".join(rest[2:]).strip("/")
            return self._json(_tree(files, folder, recursive="recursive=true" in query.lower()), body=body)
        if rest[0] == "paths-info":
            length = int(self.headers.get("Content-Length") or 0)
            form = urllib.parse.parse_qs(self.rfile.read(length).decode()) if length else {}
            wanted = form.get("paths", [])
            entries = [e for e in _tree(files, "", recursive=True) if e["path"] in wanted]
            return self._json(entries, body=body)
        return self._error(404, "NotFound", "Not found", body=body)

    # --- /{repo}/resolve/{rev}/{path} ---------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str, token: str | None, *, body: bool) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found", body=body)
        if repo.gated_token is not None and token != repo.gated_token:
            if token is None:
                message = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
                return self._error(401, "GatedRepo", message, body=body)
            message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            return self._error(403, "GatedRepo", message, body=body)
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body=body)
        data = repo.commits[commit].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", f"{path} does not exist", body=body, commit=commit)
        headers = {"X-Repo-Commit": commit, "Content-Type": "application/octet-stream"}
        if is_lfs(path):  # as the Hub: the content's sha256 in X-Linked-Etag, the pointer's blob id in ETag
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
            headers["ETag"] = f'"{git_sha1(lfs_pointer(data))}"'
        else:
            headers["ETag"] = f'"{git_sha1(data)}"'
        if body and f"{repo_id}/{path}" in self.hub.tamper:
            data = tampered(data)  # the headers above still announce the true file
        return self._send(200, data, headers=headers, body=body)

    # --- responses ----------------------------------------------------------------------------

    def _json(self, value: Any, *, body: bool) -> None:
        self._send(200, json.dumps(value).encode(), headers={"Content-Type": "application/json"}, body=body)

    def _error(self, status: int, code: str, message: str, *, body: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers=headers, body=body)

    def _send(self, status: int, data: bytes, *, headers: Mapping[str, str] = {}, body: bool) -> None:
        self.hub._answered(self._request)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _sibling_blob(path: str, data: bytes) -> dict[str, Any]:
    """A sibling's ``?blobs=true`` fields, as huggingface_hub's ``ModelInfo`` parses them."""
    if not is_lfs(path):
        return {"size": len(data), "blobId": git_sha1(data)}
    pointer = lfs_pointer(data)
    lfs = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": len(pointer)}
    return {"size": len(data), "blobId": git_sha1(pointer), "lfs": lfs}


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    """A tree / paths-info entry, as huggingface_hub's ``RepoFile`` parses it (``lfs.oid``: the sha256)."""
    if not is_lfs(path):
        return {"type": "file", "oid": git_sha1(data), "size": len(data), "path": path}
    pointer = lfs_pointer(data)
    lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
    return {"type": "file", "oid": git_sha1(pointer), "size": len(data), "path": path, "lfs": lfs}


def _tree(files: Mapping[str, bytes], folder: str, *, recursive: bool) -> list[dict[str, Any]]:
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, Any]] = {}
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :].split("/")
        if len(rest) > 1 and not recursive:
            sub = prefix + rest[0]
            entries.setdefault(
                sub, {"type": "directory", "oid": git_sha1(sub.encode()), "size": 0, "path": sub}
            )
            continue
        entries[path] = _file_entry(path, data)
    return list(entries.values())


# --- the child side -------------------------------------------------------------------------------


def mark(name: str) -> None:
    """Tell the server (and so the request log) that the child function ``name`` starts now."""
    endpoint = os.environ["HF_ENDPOINT"]
    with contextlib.suppress(OSError):  # the server is stopped on purpose: there is no log to split
        urllib.request.urlopen(f"{endpoint}{MARK}{urllib.parse.quote(name)}", timeout=10).close()


def child_main(argv: list[str]) -> None:
    """``python hub_server.py MODULE NAME...``: run each ``MODULE.NAME()``; results go to ``HUB_TEST_OUT``."""
    module = importlib.import_module(argv[0])
    results: dict[str, dict[str, Any]] = {}
    for name in argv[1:]:
        function: Callable[[], Any] = getattr(module, name)
        mark(name)
        outcome: dict[str, Any] = {
            "value": None,
            "error": None,
            "error_types": [],
            "message": "",
            "error_attrs": {},
        }
        start = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome["value"] = function()
            except Exception as exc:
                outcome.update(
                    error=type(exc).__name__,
                    error_types=[cls.__name__ for cls in type(exc).__mro__],
                    message=str(exc),
                    error_attrs={k: v for k, v in vars(exc).items() if _jsonable(v)},
                )
                if os.environ.get("HUB_TEST_TRACEBACKS"):
                    traceback.print_exc()
        outcome["seconds"] = time.monotonic() - start
        noise = (DeprecationWarning, FutureWarning)  # the libraries' own deprecations
        outcome["warnings"] = [
            [w.category.__name__, str(w.message), Path(w.filename).name, w.filename, w.lineno]
            for w in caught
            if not issubclass(w.category, noise)
        ]
        results[name] = outcome
    mark("_end")
    Path(os.environ["HUB_TEST_OUT"]).write_text(json.dumps(results), encoding="utf-8")


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


if __name__ == "__main__":
    child_main(sys.argv[1:])
