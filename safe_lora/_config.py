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
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

from safe_lora._hub import HubFolder, open_folder
from safe_lora.errors import AdapterConfigError, AdapterNotFoundError, UnsafeAdapterError

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
        sizes: dict[str, int | None] = {
            name: (folder / name).stat().st_size
            for name in (SAFETENSORS_NAME, PICKLE_NAME)
            if (folder / name).is_file()
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
    if location.hub is None:  # a local folder: the same checks, in the same order, as before
        files = find_files(folder, allow_pickle=allow_pickle)
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
    if not folder.is_dir():
        raise AdapterNotFoundError(
            f"Adapter folder not found: {os.fspath(folder)!r} — expected a folder written by "
            f"PeftModel.save_pretrained — check the path (and `subfolder=`).",
            path=folder,
        )
    if not (folder / CONFIG_NAME).is_file():
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


def find_files(folder: Path, *, allow_pickle: bool) -> AdapterFiles:
    """Check the folder's layout and pick the weights file, safetensors first.

    Raises:
        AdapterNotFoundError: No folder, no ``adapter_config.json`` or no weights file.
        UnsafeAdapterError: Only ``adapter_model.bin`` is there and ``allow_pickle`` is false.
    """
    _require_config(folder)
    if (folder / SAFETENSORS_NAME).is_file():
        return AdapterFiles(folder, folder / SAFETENSORS_NAME, "safetensors")
    if (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise UnsafeAdapterError(
                f"Refusing to unpickle {os.fspath(folder / PICKLE_NAME)!r}: the adapter has no "
                f"{SAFETENSORS_NAME}, and loading a pickle can run arbitrary code — expected "
                f"safetensors weights — re-save the adapter with save_pretrained(safe_serialization=True), "
                f"or pass allow_pickle=True if you trust its source.",
                path=folder / PICKLE_NAME,
            )
        return AdapterFiles(folder, folder / PICKLE_NAME, "pickle")
    return AdapterFiles(folder, None, None)


def read_config(folder: Path) -> PeftConfig:
    """Read ``adapter_config.json`` into the right PEFT config class.

    Raises:
        AdapterConfigError: The file is unreadable, not JSON, or names an unknown PEFT type.
    """
    path = folder / CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterConfigError(
            f"Adapter config unreadable: {os.fspath(path)!r} ({exc}) — expected the JSON that "
            f"save_pretrained writes — re-save the adapter or repair the file.",
            path=path,
        ) from exc
    if not isinstance(raw, dict):
        raise AdapterConfigError(
            f"Adapter config malformed: {os.fspath(path)!r} holds a JSON {type(raw).__name__} — expected "
            f"a JSON object — re-save the adapter with save_pretrained.",
            path=path,
        )
    peft_type = raw.get("peft_type")
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(k) for k in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise AdapterConfigError(
            f"Unknown PEFT type in {os.fspath(path)!r}: expected one of {known}, found {peft_type!r} — "
            f"upgrade peft if the adapter comes from a newer release, or fix 'peft_type'.",
            path=path,
        )
    try:
        config: PeftConfig = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(os.fspath(folder))
    except Exception as exc:  # PEFT raises TypeError/ValueError for bad fields; all mean "bad config"
        raise AdapterConfigError(
            f"Adapter config invalid: {os.fspath(path)!r} is not a valid {peft_type} config ({exc}) — "
            f"re-save the adapter with the peft release that trained it, or fix the named field.",
            path=path,
        ) from exc
    return config


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
