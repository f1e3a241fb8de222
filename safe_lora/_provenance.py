"""What is loaded, and from which bytes: the record each load leaves, and the receipt built from it.

Every load (:func:`safe_lora.load_for_inference`, :func:`~safe_lora.load_for_training`,
:func:`~safe_lora.load_adapter`, ``replace=True``) records, per adapter, where its files came from
(the folder, or the hub repo and commit) and the sha256 of each file read -- the digests of the very
bytes that were parsed. :func:`receipt` turns that into a JSON-ready dict serving code can log.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from safe_lora._checks import AdapterOnDisk
from safe_lora._unwrap import unwrap

__all__ = ["AdapterRecord", "record", "records"]


@dataclass(frozen=True)
class AdapterRecord:
    """Where one loaded adapter's bytes came from.

    Attributes:
        source: What the caller passed: a folder's path or a hub repo id.
        revision: The hub revision asked for; ``None`` for a local folder.
        commit: The hub commit the files came from; ``None`` for a local folder.
        subfolder: The adapter's folder inside the repo, if any.
        files: ``{file name: sha256}`` of every file read (config, weights, signature).
    """

    source: str
    revision: str | None
    commit: str | None
    subfolder: str | None
    files: dict[str, str] = field(default_factory=dict)


# Keyed weakly by the PeftModel: a model that goes away takes its records with it.
_RECORDS: weakref.WeakKeyDictionary[nn.Module, dict[str, AdapterRecord]] = weakref.WeakKeyDictionary()


def record(model: nn.Module, adapter_name: str, adapter: AdapterOnDisk) -> None:
    """Remember where ``adapter_name``'s bytes in ``model`` came from (replacing an earlier record)."""
    hub = adapter.source.hub
    entry = AdapterRecord(
        source=adapter.source.name,
        revision=hub.revision if hub is not None else None,
        commit=hub.commit if hub is not None else None,
        subfolder=hub.subfolder if hub is not None else None,
        files={name: file.sha256 for name, file in sorted(adapter.files.items())},
    )
    _RECORDS.setdefault(unwrap(model), {})[adapter_name] = entry


def records(model: nn.Module) -> dict[str, AdapterRecord]:
    """Every adapter's record in ``model``, by adapter name (empty for a model safe_lora did not load)."""
    return dict(_RECORDS.get(unwrap(model), {}))
