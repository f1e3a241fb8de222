"""Each error is a SafeLoraError *and* the built-in a caller would already catch."""

from __future__ import annotations

import pytest

import safe_lora
from safe_lora import errors


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (errors.AdapterNotFoundError("m", path="p"), FileNotFoundError),
        (errors.AdapterConfigError("m", path="p"), ValueError),
        (errors.AdapterWeightsError("m", path="p"), ValueError),
        (errors.UnsafeAdapterError("m", path="p"), ValueError),
        (errors.AdapterMergeError("m", peft_type="IA3"), ValueError),
        (errors.AdapterExistsError("m", name="a", available=["a"]), ValueError),
        (errors.UnknownAdapterError("m", name="a", available=["b"]), KeyError),
        (errors.NondeterministicModelError("m", sites=[]), RuntimeError),
    ],
)
def test_errors_subclass_root_and_builtin(error: Exception, builtin: type[Exception]) -> None:
    assert isinstance(error, errors.SafeLoraError)
    assert isinstance(error, builtin)
    assert str(error) == "m"  # KeyError/OSError would otherwise decorate the message


def test_weights_error_sorts_its_keys() -> None:
    err = errors.AdapterWeightsError(
        "m", missing_keys=["b", "a"], unexpected_keys=["z", "y"], wrong_dtypes={"k2": "I32", "k1": "BOOL"}
    )
    assert err.missing_keys == ["a", "b"]
    assert err.unexpected_keys == ["y", "z"]
    assert list(err.wrong_dtypes.items()) == [("k1", "BOOL"), ("k2", "I32")]


def test_merge_error_names_the_layer_and_the_tied_modules() -> None:
    plain = errors.AdapterMergeError("m", peft_type="IA3")
    assert (plain.peft_type, plain.layer, plain.tied_modules) == ("IA3", None, [])
    tied = errors.AdapterMergeError(
        "m",
        peft_type="LORA",
        layer="base_model.model.lm_head",
        tied_modules=["model.embed_tokens", "lm_head"],
    )
    assert tied.layer == "base_model.model.lm_head"
    assert tied.tied_modules == ["lm_head", "model.embed_tokens"]


def test_config_error_sorts_its_fields() -> None:
    assert errors.AdapterConfigError("m", fields=["r", "lora_alpha"]).fields == ["lora_alpha", "r"]
    assert errors.AdapterConfigError("m").fields == []


@pytest.mark.parametrize(
    "warning",
    [
        errors.BaseModelMismatchWarning,
        errors.NoAdapterWarning,
        errors.NoOpAdapterWarning,
        errors.StochasticAdapterWarning,
        errors.UnknownConfigFieldWarning,
    ],
)
def test_warnings_are_user_warnings(warning: type[Warning]) -> None:
    assert issubclass(warning, errors.SafeLoraWarning)
    assert issubclass(warning, UserWarning)


def test_everything_is_exported_and_all_is_sorted() -> None:
    assert safe_lora.__all__ == sorted(safe_lora.__all__)
    for name in errors.__all__:
        assert getattr(safe_lora, name) is getattr(errors, name)
    for name in safe_lora.__all__:
        assert hasattr(safe_lora, name)
