"""Find an adapter folder, read its config, and make the private copy that loading works on.

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

from safe_lora.errors import AdapterConfigError, AdapterNotFoundError, UnsafeAdapterError

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# The keyword arguments of PeftModel.from_pretrained that only say *where* the adapter lives. They
# are consumed by resolve_adapter(); PEFT then gets a plain local folder.
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "use_auth_token")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

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


def resolve_adapter(adapter: str | os.PathLike[str], **hub_kwargs: Any) -> Path:
    """Turn ``adapter`` (a folder, or a hub repo id already in the local cache) into a local folder.

    Nothing is downloaded: an id that is not cached is reported, so that loading never depends on the
    network by surprise.

    Args:
        adapter: A folder written by ``save_pretrained`` or a hub repo id such as ``"org/name"``.
        **hub_kwargs: ``subfolder``, ``revision``, ``cache_dir``, ``token``, as PEFT accepts them.

    Returns:
        The folder that should hold ``adapter_config.json``.

    Raises:
        AdapterNotFoundError: The folder does not exist and the id is not in the hub cache.
    """
    subfolder = hub_kwargs.get("subfolder")
    local = Path(adapter)
    if local.is_dir():
        return local / subfolder if subfolder else local

    text = os.fspath(adapter)
    if _REPO_ID.match(text) and not text.startswith("."):
        from huggingface_hub import snapshot_download

        try:
            snapshot = snapshot_download(
                text,
                revision=hub_kwargs.get("revision"),
                cache_dir=hub_kwargs.get("cache_dir"),
                local_files_only=True,
            )
        except Exception as exc:  # hub raises several types for "not cached"; all mean the same here
            raise AdapterNotFoundError(
                f"Adapter not found: {text!r} is not a folder and not in the Hugging Face cache "
                f"({type(exc).__name__}) — expected a folder written by save_pretrained or a cached "
                f"repo id — pass the folder's path, or download it first with "
                f"`huggingface_hub.snapshot_download({text!r})`.",
                path=text,
            ) from exc
        folder = Path(snapshot)
        return folder / subfolder if subfolder else folder

    raise AdapterNotFoundError(
        f"Adapter folder not found: {text!r} does not exist — expected a folder written by "
        f"PeftModel.save_pretrained — check the path.",
        path=text,
    )


def find_files(folder: Path, *, allow_pickle: bool) -> AdapterFiles:
    """Check the folder's layout and pick the weights file, safetensors first.

    Raises:
        AdapterNotFoundError: No folder, no ``adapter_config.json`` or no weights file.
        UnsafeAdapterError: Only ``adapter_model.bin`` is there and ``allow_pickle`` is false.
    """
    if not folder.is_dir():
        raise AdapterNotFoundError(
            f"Adapter folder not found: {os.fspath(folder)!r} — expected a folder written by "
            f"PeftModel.save_pretrained — check the path (and `subfolder=`).",
            path=folder,
        )
    if not (folder / CONFIG_NAME).is_file():
        present = sorted(p.name for p in folder.iterdir())
        raise AdapterNotFoundError(
            f"Adapter config not found: no {CONFIG_NAME} in {os.fspath(folder)!r} — expected the files "
            f"PeftModel.save_pretrained writes, found {present} — point at the folder that holds "
            f"{CONFIG_NAME}.",
            path=folder / CONFIG_NAME,
        )
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
        for name in dropout_rates(prepared):
            setattr(prepared, name, float(dropout))
    prepared.inference_mode = inference_mode
    return prepared
