"""safe_lora: load and evaluate PEFT adapters safely and deterministically."""

from safe_lora import auto
from safe_lora._adapters import load_adapter, set_active_adapter, use_adapter
from safe_lora._config import dropout_rates
from safe_lora._dropout import DropoutSite, assert_deterministic, deterministic_lora, live_dropout
from safe_lora._inspect import AdapterReport, Finding, inspect_adapter
from safe_lora._loading import load_for_inference, load_for_training
from safe_lora._version import __version__
from safe_lora.errors import (
    AdapterAccessError,
    AdapterConfigError,
    AdapterExistsError,
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

__all__ = [
    "AdapterAccessError",
    "AdapterConfigError",
    "AdapterExistsError",
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
    "set_active_adapter",
    "use_adapter",
]
