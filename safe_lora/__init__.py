"""safe_lora: load and evaluate PEFT adapters safely and deterministically.

The errors and the version are imported at once; everything else the first time it is used
(PEP 562), so that ``import safe_lora`` and the ``safe-lora`` command start without importing PEFT,
transformers and torch until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safe_lora._version import __version__
from safe_lora.errors import (
    AdapterAccessError,
    AdapterConfigError,
    AdapterExistsError,
    AdapterIntegrityError,
    AdapterMergeError,
    AdapterNotFoundError,
    AdapterWeightsError,
    BaseModelMismatchWarning,
    HubUnreachableWarning,
    NoAdapterWarning,
    NondeterministicModelError,
    NoOpAdapterWarning,
    SafeLoraError,
    SafeLoraWarning,
    StochasticAdapterWarning,
    UnknownAdapterError,
    UnknownConfigFieldWarning,
    UnsafeAdapterError,
)

if TYPE_CHECKING:
    from safe_lora import auto
    from safe_lora._adapters import load_adapter, set_active_adapter, use_adapter
    from safe_lora._config import dropout_rates
    from safe_lora._dropout_find import DropoutSite, live_dropout
    from safe_lora._dropout_freeze import assert_deterministic, deterministic_lora
    from safe_lora._inspect import AdapterReport, Finding, inspect_adapter
    from safe_lora._loading import load_for_inference, load_for_training
    from safe_lora._provenance import receipt

# Where each lazily imported public name lives.
_LAZY = {
    "AdapterReport": "safe_lora._inspect",
    "DropoutSite": "safe_lora._dropout_find",
    "Finding": "safe_lora._inspect",
    "assert_deterministic": "safe_lora._dropout_freeze",
    "deterministic_lora": "safe_lora._dropout_freeze",
    "dropout_rates": "safe_lora._config",
    "inspect_adapter": "safe_lora._inspect",
    "live_dropout": "safe_lora._dropout_find",
    "load_adapter": "safe_lora._adapters",
    "load_for_inference": "safe_lora._loading",
    "load_for_training": "safe_lora._loading",
    "receipt": "safe_lora._provenance",
    "set_active_adapter": "safe_lora._adapters",
    "use_adapter": "safe_lora._adapters",
}

__all__ = [
    "AdapterAccessError",
    "AdapterConfigError",
    "AdapterExistsError",
    "AdapterIntegrityError",
    "AdapterMergeError",
    "AdapterNotFoundError",
    "AdapterReport",
    "AdapterWeightsError",
    "BaseModelMismatchWarning",
    "DropoutSite",
    "Finding",
    "HubUnreachableWarning",
    "NoAdapterWarning",
    "NoOpAdapterWarning",
    "NondeterministicModelError",
    "SafeLoraError",
    "SafeLoraWarning",
    "StochasticAdapterWarning",
    "UnknownAdapterError",
    "UnknownConfigFieldWarning",
    "UnsafeAdapterError",
    "__version__",
    "assert_deterministic",
    "auto",
    "deterministic_lora",
    "dropout_rates",
    "inspect_adapter",
    "live_dropout",
    "load_adapter",
    "load_for_inference",
    "load_for_training",
    "receipt",
    "set_active_adapter",
    "use_adapter",
]


def __getattr__(name: str) -> Any:
    if name == "auto":
        return importlib.import_module("safe_lora.auto")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safe_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
