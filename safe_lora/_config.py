"""Find an adapter (a folder or a hub repo id), read its config, and make the private copy that
loading works on.

Finding is :func:`open_adapter` (the config onto local disk) and :func:`locate_adapter` (the config
read, then the weights file); talking to the hub is :mod:`safe_lora._hub`'s.

PEFT mutates the config object it is given (``inference_mode``) and reads dropout rates straight
from it, so every load here works on a deep copy: neither the file on disk nor a config object the
caller passed ever changes.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import json
import math
import os
import re
import stat
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import peft
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from safe_lora._hub import HubFolder, open_folder
from safe_lora.errors import (
    AdapterConfigError,
    AdapterNotFoundError,
    UnknownConfigFieldWarning,
    UnsafeAdapterError,
    _fmt_keys,
    _user_stacklevel,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# The keyword arguments of PeftModel.from_pretrained that only say *where* the adapter lives and how
# to fetch it. They are consumed by locate_adapter(); PEFT then gets a plain local folder.
HUB_KWARGS = (
    "subfolder",
    "revision",
    "cache_dir",
    "token",
    "use_auth_token",
    "force_download",
    "local_files_only",
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")

WeightsFormat = Literal["safetensors", "pickle"]

# save_pretrained writes a few KiB of config; the cap only keeps a huge or endless file (a FIFO
# swapped in, /proc, a multi-GB blob) from being read into memory whole.
CONFIG_MAX_BYTES = 16 * 1024 * 1024
# save_pretrained nests at most 3 levels (a sub-config's list). Deeper JSON is not a PEFT config, and
# copying or saving it later would recurse once per level.
CONFIG_MAX_DEPTH = 32
# Read by PEFT's from_json_file and thrown away ("Runtime configurations are only valid at runtime").
_PEFT_DROPS = frozenset({"runtime_config"})


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's files are, once resolved to a local folder.

    Attributes:
        folder: The local folder holding ``adapter_config.json``.
        weights: The weights file to load, or ``None`` when the folder has none.
        weights_format: ``"safetensors"`` or ``"pickle"``; ``None`` with no weights.
    """

    folder: Path
    weights: Path | None
    weights_format: WeightsFormat | None


@dataclass(frozen=True)
class AdapterLocation:
    """An adapter found: its config on local disk, its weights files known but not yet fetched.

    Attributes:
        folder: The local folder holding ``adapter_config.json`` (for a hub id, in the HF cache).
        weight_sizes: The weights files the adapter has (``adapter_model.safetensors``,
            ``adapter_model.bin``), with their sizes in bytes when known -- also the ones not downloaded.
        hub: For a hub id, the repo folder the files come from; ``None`` for a local folder.
    """

    folder: Path
    weight_sizes: dict[str, int | None]
    hub: HubFolder | None = None

    @property
    def weights_format(self) -> WeightsFormat | None:
        """The format the loaders would read: safetensors when present, else pickle; ``None``: neither."""
        if SAFETENSORS_NAME in self.weight_sizes:
            return "safetensors"
        return "pickle" if PICKLE_NAME in self.weight_sizes else None

    def fetch(self, name: str) -> Path:
        """The local path of ``name`` (one of :attr:`weight_sizes`), downloaded from the hub if need be."""
        return self.folder / name if self.hub is None else self.hub.fetch(name)


def is_hub_id(adapter: str | os.PathLike[str]) -> bool:
    """Whether ``adapter`` is not a local folder but reads as a hub repo id (``"org/name"``)."""
    text = os.fspath(adapter)
    return not Path(text).is_dir() and bool(_REPO_ID.match(text)) and not text.startswith(".")


def open_adapter(
    adapter: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> AdapterLocation:
    """Find an adapter and get its ``adapter_config.json`` onto local disk; no weights are fetched yet.

    A folder is used as it is. Anything else that reads as a hub repo id (``"org/name"``) is looked up
    on the Hugging Face Hub as ``PeftModel.from_pretrained`` would, and only ``adapter_config.json``
    is downloaded here; with ``HF_HUB_OFFLINE=1``, ``local_files_only=True`` or an unreachable hub
    (then with a :class:`~safe_lora.errors.HubUnreachableWarning`) the local cache answers instead.

    Args:
        adapter: A folder written by ``save_pretrained``, or a hub repo id.
        subfolder: The adapter's folder inside ``adapter``.
        revision: With a hub id: a branch, tag or commit (default: the default branch).
        token: With a hub id: the token to use (default: the saved login or ``HF_TOKEN``).
        cache_dir: With a hub id: the Hugging Face cache to use.
        force_download: With a hub id: download again even when cached.
        local_files_only: With a hub id: use the local cache only.

    Returns:
        Where the adapter is; :meth:`AdapterLocation.fetch` gets its weights.

    Raises:
        AdapterNotFoundError: No such folder, repo, revision or config file (or offline and not cached).
        AdapterAccessError: The hub refused the repo (gated or private; pass ``token=``).

    Example:
        >>> location = open_adapter("org/my-adapter", revision="v1")  # doctest: +SKIP
        >>> sorted(location.weight_sizes)  # doctest: +SKIP
        ['adapter_model.safetensors']
    """
    text = os.fspath(adapter)
    if not is_hub_id(text):
        local = Path(text)
        if not local.is_dir():
            raise AdapterNotFoundError(
                f"Adapter folder not found: {text!r} does not exist — expected a folder written by "
                f"PeftModel.save_pretrained — check the path.",
                path=text,
            )
        folder = local / subfolder if subfolder else local
        _require_config(folder)
        # Present means "something is there": a FIFO or a directory under the weights' name is
        # refused by the reader by name, not taken for a missing file (size unknown then).
        sizes: dict[str, int | None] = {
            name: (folder / name).stat().st_size if kind is None else None
            for name in (SAFETENSORS_NAME, PICKLE_NAME)
            if (kind := special_file(folder / name)) != "missing"
        }
        return AdapterLocation(folder, sizes)

    hub = open_folder(
        text,
        subfolder=subfolder,
        revision=revision,
        token=token,
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
    config_path = hub.fetch(CONFIG_NAME)
    weights = {name: hub.files[name] for name in (SAFETENSORS_NAME, PICKLE_NAME) if name in hub.files}
    return AdapterLocation(config_path.parent, weights, hub)


def locate_adapter(
    adapter: str | os.PathLike[str],
    *,
    allow_pickle: bool,
    config: PeftConfig | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    use_auth_token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> tuple[AdapterFiles, PeftConfig]:
    """Find an adapter, read its config, then get its weights file: what loading needs, nothing more.

    For a hub id the config is downloaded and read first, so a broken config never costs the weights
    download; then ``adapter_model.safetensors`` -- or ``adapter_model.bin``, only with
    ``allow_pickle=True`` and no safetensors file. No other file of the repo is ever requested.

    Args:
        adapter: A folder written by ``save_pretrained``, or a hub repo id.
        allow_pickle: Accept ``adapter_model.bin`` when there is no safetensors file.
        config: Use this config instead of the file's (as ``PeftModel.from_pretrained(config=...)``);
            the file must exist all the same.
        use_auth_token: The old name of ``token`` (PEFT still accepts it).
        subfolder, revision, token, cache_dir, force_download, local_files_only: As for
            :func:`open_adapter`.

    Returns:
        ``(files, config)``: the weights file on local disk and the config read from the folder.

    Raises:
        AdapterNotFoundError: No such folder, repo, revision, config or weights file.
        AdapterAccessError: The hub refused the repo.
        AdapterConfigError: The config is unreadable or of an unknown PEFT type.
        UnsafeAdapterError: Only ``adapter_model.bin`` exists and ``allow_pickle`` is false (for a hub
            id it is then not downloaded at all).

    Example:
        >>> files, config = locate_adapter("org/my-adapter", allow_pickle=False)  # doctest: +SKIP
        >>> files.weights.name, config.peft_type  # doctest: +SKIP
        ('adapter_model.safetensors', <PeftType.LORA: 'LORA'>)
    """
    location = open_adapter(
        adapter,
        subfolder=subfolder,
        revision=revision,
        token=token if token is not None else use_auth_token,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
    )
    folder = location.folder
    if location.hub is None:  # a local folder: its layout is refused before its config is read
        files = _local_files(location, allow_pickle=allow_pickle)
        return files, config if config is not None else read_config(folder)

    hub = location.hub
    saved = config if config is not None else read_config(folder)
    if location.weights_format == "safetensors":
        return AdapterFiles(folder, location.fetch(SAFETENSORS_NAME), "safetensors"), saved
    if location.weights_format == "pickle":
        if not allow_pickle:
            raise UnsafeAdapterError(
                f"Refusing to download and unpickle {PICKLE_NAME} of {hub.label}: the adapter has no "
                f"{SAFETENSORS_NAME}, and loading a pickle can run arbitrary code — expected safetensors "
                f"weights — ask its author for a safetensors copy, or pass allow_pickle=True if you trust "
                f"its source.",
                path="/".join(part for part in (hub.repo_id, hub.subfolder, PICKLE_NAME) if part),
            )
        return AdapterFiles(folder, location.fetch(PICKLE_NAME), "pickle"), saved
    raise AdapterNotFoundError(
        f"Adapter weights not found: {hub.label} has no {SAFETENSORS_NAME} {hub.where} — expected the "
        f"weights next to {CONFIG_NAME}, found {sorted(hub.files)} — upload the folder save_pretrained "
        f"wrote, weights included.",
        path=hub.repo_id,
    )


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
            f"PeftModel.save_pretrained writes, found {present} — {hint}.",
            path=folder / CONFIG_NAME,
        )


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


def _local_files(location: AdapterLocation, *, allow_pickle: bool) -> AdapterFiles:
    """The weights file of a local adapter folder, safetensors first.

    :func:`open_adapter` already found which names are there; a name that is there but is not a
    regular file (a directory, a FIFO, a link to ``/dev/zero``) is picked all the same and refused
    by the reader with a typed error: it is never skipped in favour of the next file.

    Raises:
        UnsafeAdapterError: Only ``adapter_model.bin`` is there and ``allow_pickle`` is false.
    """
    folder, weights_format = location.folder, location.weights_format
    if weights_format == "pickle" and not allow_pickle:
        raise UnsafeAdapterError(
            f"Refusing to unpickle {os.fspath(folder / PICKLE_NAME)!r}: the adapter has no "
            f"{SAFETENSORS_NAME}, and loading a pickle can run arbitrary code — expected "
            f"safetensors weights — re-save the adapter with save_pretrained(safe_serialization=True), "
            f"or pass allow_pickle=True if you trust its source.",
            path=folder / PICKLE_NAME,
        )
    names = {"safetensors": SAFETENSORS_NAME, "pickle": PICKLE_NAME}
    weights = folder / names[weights_format] if weights_format is not None else None
    return AdapterFiles(folder, weights, weights_format)


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, read with bounds: regular file, size, nesting depth.

    The file is opened without blocking and checked with ``fstat`` on the open descriptor, so a
    FIFO or a device put where the config should be is refused rather than read (a FIFO would block
    forever, ``/dev/zero`` would never end), and no more than :data:`CONFIG_MAX_BYTES` are read.

    Raises:
        AdapterConfigError: Not a regular file, unreadable, too large, not UTF-8 JSON, not an
            object, or nested deeper than :data:`CONFIG_MAX_DEPTH`.
    """
    where = os.fspath(path)

    def refuse(found: str, hint: str = "re-save the adapter with save_pretrained") -> AdapterConfigError:
        return AdapterConfigError(
            f"Adapter config unreadable: {where!r} {found} — expected the JSON file save_pretrained "
            f"writes — {hint}.",
            path=path,
        )

    kind = special_file(path)
    if kind is not None:
        raise refuse(f"is {kind}", "replace it with the adapter's adapter_config.json")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_BINARY", 0)  # Windows: no newline translation
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise refuse(f"cannot be opened ({exc.strerror or exc})") from exc
    try:
        # The descriptor's own type: the path may have been swapped since special_file() looked.
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise refuse("is not a regular file", "replace it with the adapter's adapter_config.json")
        chunks: list[bytes] = []
        size = 0
        while size <= CONFIG_MAX_BYTES:
            chunk = os.read(fd, min(1 << 20, CONFIG_MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise refuse(f"cannot be read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if size > CONFIG_MAX_BYTES:
        raise refuse(f"is larger than {CONFIG_MAX_BYTES // (1024 * 1024)} MiB", "re-save the adapter")
    try:
        raw = json.loads(b"".join(chunks).decode("utf-8"))
    except RecursionError as exc:  # json recurses once per nesting level
        raise refuse(f"is nested deeper than Python can parse ({exc})") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSON syntax, integers of >4300 digits
        raise refuse(f"is not valid UTF-8 JSON ({exc})", "re-save the adapter or repair the file") from exc
    if not isinstance(raw, dict):
        raise AdapterConfigError(
            f"Adapter config malformed: {where!r} holds a JSON {type(raw).__name__} — expected "
            f"a JSON object — re-save the adapter with save_pretrained.",
            path=path,
        )
    depth = _depth(raw)
    if depth > CONFIG_MAX_DEPTH:
        raise refuse(
            f"is nested {depth} levels deep (save_pretrained writes at most a few; the limit is "
            f"{CONFIG_MAX_DEPTH})"
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


def nonfinite_fields(raw: dict[str, Any]) -> list[str]:
    """The config fields holding NaN or ±inf anywhere inside, sorted, e.g. ``["alpha_pattern.fc1"]``.

    Python's ``json`` accepts ``NaN``, ``Infinity``, ``-Infinity`` and overflowing literals such
    as ``1e999``; PEFT takes them as they are, and a NaN ``lora_alpha`` makes every output NaN.

    Example:
        >>> nonfinite_fields({"lora_alpha": float("nan"), "alpha_pattern": {"fc1": float("inf")}})
        ['alpha_pattern.fc1', 'lora_alpha']
    """
    found = []
    stack: list[tuple[str, Any]] = list(raw.items())
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append(where)
        elif isinstance(value, dict):
            stack.extend((f"{where}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{where}[{index}]", item) for index, item in enumerate(value))
    return sorted(found)


def means_absent(value: Any) -> bool:
    """Whether a config value says "not used": ``null``, ``false``, ``""``, ``[]`` or ``{}``.

    A field PEFT adds in a new release defaults to such a value when the feature is off (every
    ``*_config`` to ``None``, every ``use_*`` to ``False``), so an older PEFT that drops the field
    loads the same adapter. Any other value (a number, ``true``, a filled sub-config) switches
    something on that the installed PEFT cannot honour. Numbers are never taken as "absent": a
    new field's default is unknowable here.
    """
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


@dataclass(frozen=True)
class ParsedConfig:
    """A config built the way PEFT builds it, and the fields the installed PEFT does not know.

    Attributes:
        config: The PEFT config object.
        unknown: Every field of the file the installed PEFT does not know (dropped from ``config``,
            as PEFT drops it), by dotted name (``"eva_config.new_knob"`` for a sub-config's field).
        saved_by: The ``peft_version`` the file records, if any.
    """

    config: PeftConfig
    unknown: dict[str, Any]
    saved_by: str | None

    @property
    def refused(self) -> list[str]:
        """Unknown fields whose values switch something on: loading would silently differ (sorted)."""
        return sorted(k for k, v in self.unknown.items() if not means_absent(v))

    @property
    def ignored(self) -> list[str]:
        """Unknown fields whose values mean "absent": safe to drop, with a warning (sorted)."""
        return sorted(k for k, v in self.unknown.items() if means_absent(v))

    def unknown_message(self, path: Path) -> str:
        """The refusal for :attr:`refused`, naming the fields and both PEFT versions."""
        saved = f" (the adapter was saved by peft {self.saved_by})" if self.saved_by else ""
        shown = ", ".join(f"{k}={self.unknown[k]!r}" for k in self.refused[:10])
        more = f", ... ({len(self.refused) - 10} more)" if len(self.refused) > 10 else ""
        return (
            f"Adapter config has fields the installed peft {peft.__version__} does not know in "
            f"{os.fspath(path)!r}: {shown}{more}{saved} — expected only fields peft "
            f"{peft.__version__} can honour; PEFT would drop them silently and load a different "
            f"adapter — upgrade peft (`pip install -U peft`) to the release that saved the adapter, "
            f"or remove the fields from adapter_config.json if you know they are obsolete."
        )

    def ignored_message(self, path: Path) -> str:
        """The warning for :attr:`ignored`, naming the fields."""
        return (
            f"Adapter config fields unknown to peft {peft.__version__} were ignored in "
            f"{os.fspath(path)!r}: {', '.join(self.ignored)} — their values mean 'not used', so the "
            f"adapter loads the same without them — upgrade peft to silence this."
        )


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: leave the values to PEFT
        return {}


def _describe(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return re.sub(r"(?:\w+\.)+(\w+)", r"\1", text).replace("NoneType", "None")  # no module paths


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value can be what ``annotation`` declares.

    Deliberately loose where PEFT itself is: any number for ``int``/``float`` (``lora_alpha`` is
    declared ``int`` and saved as ``16.0`` all the time), any string for a ``Literal`` of strings or
    an enum (PEFT checks the values), a dict for a sub-config; an annotation not understood here
    passes.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, arg) for arg in args)
    if origin is Literal:
        return any(_fits(value, type(arg)) for arg in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, (str, annotation))
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return isinstance(value, (dict, annotation))
    if annotation in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_fits(v, args[0]) for v in value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return True


def wrong_types(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, str]]:
    """The values that cannot be of their field's declared type, by (dotted) name, with that type.

    PEFT does not check types: ``"monteclora_config": true`` loads and fails at the first forward,
    ``"use_dora": "no"`` switches DoRA on. Sub-config dicts are checked against their own fields.

    Example:
        >>> from peft import LoraConfig
        >>> wrong_types(LoraConfig, {"r": 8, "modules_to_save": False})
        {'modules_to_save': (False, 'Optional[list[str]]')}
    """
    hints = _type_hints(cls)
    # PEFT declares some fields `int` with a None default, filled in when the model is built
    # (num_virtual_tokens, token_dim, ...): None is what an unfilled one is saved as.
    fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
    none_default = {f.name for f in fields if f.default is None}
    bad: dict[str, tuple[Any, str]] = {}
    for name, value in values.items():
        if name not in hints or (value is None and name in none_default):
            continue
        annotation = hints[name]
        if not _fits(value, annotation):
            bad[f"{prefix}{name}"] = (value, _describe(annotation))
            continue
        if isinstance(value, dict):  # a sub-config: its own fields too
            nested = [a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)]
            if nested and isinstance(nested[0], type):
                bad.update(wrong_types(nested[0], value, f"{prefix}{name}."))
    return dict(sorted(bad.items()))


def parse_config(raw: dict[str, Any], *, path: Path) -> ParsedConfig:
    """Build the PEFT config from a parsed ``adapter_config.json`` the way ``from_pretrained`` does.

    The same steps as ``PeftConfig.from_pretrained`` (``runtime_config`` dropped, ``check_kwargs``,
    ``from_peft_type``), on the dict already read, so the file is not opened a second time; fields
    the installed PEFT does not know are set aside (PEFT would drop them with only a log line) and
    reported in :attr:`ParsedConfig.unknown`, sub-config fields included.

    Raises:
        AdapterConfigError: Unknown PEFT type, or PEFT refuses a field's value.
    """
    where = os.fspath(path)
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(k) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise AdapterConfigError(
            f"Unknown PEFT type in {where!r}: expected one of {known}, found {peft_type!r} — "
            f"upgrade peft if the adapter comes from a newer release, or fix 'peft_type'.",
            path=path,
        )
    # Any: PEFT's classmethods below are untyped.
    cls: Any = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]  # type: ignore[index]  # keys are a str enum
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = {k: v for k, v in raw.items() if k not in fields and k not in _PEFT_DROPS}
    # Only what __init__ takes, as PEFT's own forward-compatibility filter does; never runtime_config.
    kwargs = {k: v for k, v in raw.items() if k in fields and fields[k].init and k not in _PEFT_DROPS}
    mistyped = wrong_types(cls, kwargs)
    if mistyped:
        shown = "; ".join(
            f"{name}={value!r} (expected {expected})" for name, (value, expected) in mistyped.items()
        )
        raise AdapterConfigError(
            f"Adapter config has values of the wrong type in {where!r}: {shown} — expected the types "
            f"peft's {cls.__name__} declares (PEFT does not check them and fails later, or loads "
            f"something else) — re-save the adapter with save_pretrained, or fix those fields.",
            path=path,
            fields=list(mistyped),
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's notes on the values; errors are raised below
            kwargs = cls.check_kwargs(**kwargs)
            config: PeftConfig = cls.from_peft_type(**kwargs)
    except Exception as exc:  # PEFT raises TypeError/ValueError/KeyError...; all mean "bad config"
        raise AdapterConfigError(
            f"Adapter config invalid: {where!r} is not a valid {peft_type} config ({exc}) — "
            f"re-save the adapter with the peft release that trained it, or fix the named field.",
            path=path,
        ) from exc
    # Sub-configs (eva_config, arrow_config, ...) arrive as dicts and PEFT keeps only the fields
    # their dataclass knows, silently: the same question, one level down.
    for name, value in raw.items():
        built = getattr(config, name, None) if name in kwargs else None
        if isinstance(value, dict) and dataclasses.is_dataclass(built) and not isinstance(built, type):
            names = {f.name for f in dataclasses.fields(built)}
            unknown.update({f"{name}.{k}": v for k, v in value.items() if k not in names})
    saved_by = raw.get("peft_version")
    return ParsedConfig(config, unknown, saved_by if isinstance(saved_by, str) else None)


def read_config(folder: Path) -> PeftConfig:
    """Read ``adapter_config.json`` into the right PEFT config class, refusing what PEFT would misread.

    Warns:
        UnknownConfigFieldWarning: Fields the installed PEFT does not know, whose values mean
            "absent" (``null``, ``false``, empty); they are dropped.

    Raises:
        AdapterConfigError: The file is not a regular file, too large, too deep, not JSON, names an
            unknown PEFT type, holds NaN/inf numbers, holds unknown fields with other values, or
            PEFT refuses a value. ``fields`` names the fields concerned.
    """
    path = folder / CONFIG_NAME
    raw = read_config_json(path)
    bad = nonfinite_fields(raw)
    if bad:
        raise AdapterConfigError(nonfinite_message(path, bad), path=path, fields=bad)
    parsed = parse_config(raw, path=path)
    if parsed.refused:
        raise AdapterConfigError(parsed.unknown_message(path), path=path, fields=parsed.refused)
    if parsed.ignored:
        warnings.warn(parsed.ignored_message(path), UnknownConfigFieldWarning, stacklevel=_user_stacklevel())
    return parsed.config


def nonfinite_message(path: Path, fields: list[str]) -> str:
    """The refusal for non-finite numbers in the config, naming the fields."""
    return (
        f"Adapter config holds non-finite numbers in {os.fspath(path)!r}: {_fmt_keys(fields)} — "
        f"expected finite values (a NaN or infinite alpha makes every output NaN) — re-save the "
        f"adapter, or fix those fields."
    )


def peft_type_name(config: PeftConfig) -> str:
    """The config's PEFT type as a plain name, e.g. ``"LORA"`` (``"unknown"`` when it has none)."""
    raw = getattr(config, "peft_type", "unknown")
    return str(getattr(raw, "value", raw))


# LoRA initialisations that only touch the adapter's own tensors. Every other string (PiSSA, CorDA,
# OLoRA, LoftQ, LoRA-GA, and any a newer PEFT adds) is assumed to rewrite the base weight.
_ADAPTER_ONLY_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica"})


def init_keeps_base(init: object) -> bool:
    """Whether a LoRA ``init_lora_weights`` value leaves the base weights alone (``True``,
    ``False``, ``"gaussian"``, ...); PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite them."""
    return isinstance(init, bool) or (isinstance(init, str) and init.lower() in _ADAPTER_ONLY_INITS)


def rewrites_base(config: PeftConfig) -> bool:
    """Whether injecting ``config`` recomputes the targets' base weights (PiSSA, OLoRA, KaSA, ...)."""
    init = getattr(config, "init_lora_weights", None)
    if isinstance(init, str) and not init_keeps_base(init):
        return True
    return getattr(config, "kasa_config", None) is not None


def _is_rate_field(field: dataclasses.Field[Any]) -> bool:
    # The annotation may be a string under `from __future__ import annotations`; a rate is a float
    # whose field name says dropout (rank_dropout_scale, a bool, is not a rate).
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    return "dropout" in field.name and annotation.replace(" ", "") in {
        "float",
        "Optional[float]",
        "float|None",
    }


def dropout_rates(config: PeftConfig) -> dict[str, float]:
    """Every dropout rate a PEFT config holds, e.g. ``{"lora_dropout": 0.1}``.

    Works for every tuner: LoRA's ``lora_dropout``, LoHa/LoKr ``rank_dropout`` and
    ``module_dropout``, VeRA's ``vera_dropout``, BOFT's ``boft_dropout``, ...

    Example:
        >>> from peft import LoraConfig
        >>> dropout_rates(LoraConfig(lora_dropout=0.1))
        {'lora_dropout': 0.1}
    """
    rates: dict[str, float] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        if _is_rate_field(field) and isinstance(value, (int, float)) and not isinstance(value, bool):
            rates[field.name] = float(value)
    return rates


# Rates that decide whether Dropout modules exist at all inside an ``nn.Sequential`` (X-LoRA's
# classifier): turning one to or from 0 adds or removes modules and shifts every later index, so the
# saved keys would no longer fit. The copy keeps the saved rate for these; the loader sets the
# rate on the built modules instead. Maps the field to the tuner attribute holding those modules.
STRUCTURAL_RATES = {"xlora_dropout_p": "internal_xlora_classifier"}


def structural_overrides(config: PeftConfig, dropout: float | None) -> dict[str, float]:
    """The structural rates (:data:`STRUCTURAL_RATES`) the copy keeps but the caller wants otherwise."""
    if dropout is None:
        return {}
    return {
        name: float(dropout)
        for name, rate in dropout_rates(config).items()
        if name in STRUCTURAL_RATES and (rate > 0) != (dropout > 0)
    }


def prepared_copy(config: PeftConfig, *, dropout: float | None, inference_mode: bool) -> PeftConfig:
    """A deep copy of ``config`` with every dropout rate set to ``dropout`` and ``inference_mode`` set.

    Args:
        config: The adapter's config; never modified.
        dropout: The rate for every dropout field, or ``None`` to keep the saved rates.
        inference_mode: The copy's ``inference_mode``.

    Raises:
        ValueError: ``dropout`` is outside [0, 1).
    """
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1) or None, found {dropout!r} — pass e.g. dropout=0.0.")
    prepared = copy.deepcopy(config)
    if dropout is not None:
        keep = structural_overrides(config, dropout)
        for name in dropout_rates(prepared):
            if name not in keep:
                setattr(prepared, name, float(dropout))
    prepared.inference_mode = inference_mode
    return prepared
