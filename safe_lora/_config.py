"""An adapter config: parsed the way PEFT parses it, refused where PEFT would misread it, and copied.

:func:`parse_config` builds the PEFT config object from the JSON already read (see
:mod:`safe_lora._readers`), with the checks PEFT does not make: non-finite numbers, values of the
wrong type, fields the installed PEFT does not know. :func:`prepared_copy` is the private copy a load
works on: PEFT mutates the config object it is given (``inference_mode``) and reads dropout rates
straight from it, so neither the file on disk nor a config object the caller passed ever changes.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from peft import PeftConfig

from safe_lora._peft import STRUCTURAL_RATES, config_class, installed_peft, known_peft_types
from safe_lora._readers import parse_json_object, read_bounded
from safe_lora.errors import AdapterConfigError, UnknownConfigFieldWarning, _fmt_keys, warn

__all__ = [
    "CONFIG_MAX_BYTES",
    "ParsedConfig",
    "dropout_rates",
    "looks_like_model_config",
    "means_absent",
    "nonfinite_fields",
    "nonfinite_message",
    "parse_config",
    "prepared_copy",
    "read_config",
    "read_config_json",
    "structural_overrides",
    "wrong_types",
]

# save_pretrained writes a few KiB of config; the largest legitimate ones (thousands of target names,
# tens of thousands of trainable token indices) stay in the hundreds of KiB. The cap keeps a huge or
# endless file (a FIFO swapped in, /proc, a multi-GB blob) from being read -- and bounds what parsing
# it can cost: JSON's smallest containers ("[]," -- 3 bytes each) become ~60-byte Python objects, so
# 4 MiB of JSON stays under ~100 MiB of memory.
CONFIG_MAX_BYTES = 4 * 1024 * 1024
# Read by PEFT's from_json_file and thrown away ("Runtime configurations are only valid at runtime").
_PEFT_DROPS = frozenset({"runtime_config"})


def config_error(where: str | os.PathLike[str]) -> typing.Callable[[str, str], AdapterConfigError]:
    """The reader's error for an unreadable config at ``where``: "what failed — expected — do"."""
    text = os.fspath(where)

    def error(found: str, hint: str) -> AdapterConfigError:
        return AdapterConfigError(
            f"Adapter config unreadable: {text!r} {found} — expected the JSON file save_pretrained "
            f"writes — {hint}.",
            path=text,
        )

    return error


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, read with bounds (regular file, :data:`CONFIG_MAX_BYTES`, nesting).

    Raises:
        AdapterConfigError: Not a regular file, unreadable, too large, not UTF-8 JSON, not an
            object, or nested too deeply.
    """
    error = config_error(path)
    return parse_json_object(read_bounded(path, max_bytes=CONFIG_MAX_BYTES, error=error), error=error)


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

    def unknown_message(self, path: str | os.PathLike[str]) -> str:
        """The refusal for :attr:`refused`, naming the fields and both PEFT versions."""
        saved = f" (the adapter was saved by peft {self.saved_by})" if self.saved_by else ""
        shown = ", ".join(f"{k}={self.unknown[k]!r}" for k in self.refused[:10])
        more = f", and {len(self.refused) - 10} more" if len(self.refused) > 10 else ""
        return (
            f"Adapter config has fields the installed peft {installed_peft()} does not know in "
            f"{os.fspath(path)!r}: {shown}{more}{saved} — expected only fields peft "
            f"{installed_peft()} can honour; PEFT would drop them silently and load a different "
            f"adapter — upgrade peft (`pip install -U peft`) to the release that saved the adapter, "
            f"or remove the fields from adapter_config.json if you know they are obsolete."
        )

    def ignored_message(self, path: str | os.PathLike[str]) -> str:
        """The warning for :attr:`ignored`, naming the fields."""
        return (
            f"Adapter config fields unknown to peft {installed_peft()} were ignored in "
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


def parse_config(raw: dict[str, Any], *, path: str | os.PathLike[str]) -> ParsedConfig:
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
    cls: Any = config_class(peft_type) if isinstance(peft_type, str) else None
    if cls is None:
        if looks_like_model_config(raw):
            raise AdapterConfigError(
                f"Not an adapter config: {where!r} is a model's config.json (model_type="
                f"{raw.get('model_type')!r}, no peft_type) — expected the adapter_config.json that "
                f"PeftModel.save_pretrained writes — point at the adapter's folder, or load this model "
                f"with transformers' from_pretrained instead.",
                path=path,
                fields=["peft_type"],
            )
        known = ", ".join(known_peft_types())
        raise AdapterConfigError(
            f"Unknown PEFT type in {where!r}: expected one of {known}, found {peft_type!r} — "
            f"upgrade peft if the adapter comes from a newer release, or fix 'peft_type'.",
            path=path,
        )
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
    path = folder / "adapter_config.json"
    raw = read_config_json(path)
    bad = nonfinite_fields(raw)
    if bad:
        raise AdapterConfigError(nonfinite_message(path, bad), path=path, fields=bad)
    parsed = parse_config(raw, path=path)
    if parsed.refused:
        raise AdapterConfigError(parsed.unknown_message(path), path=path, fields=parsed.refused)
    if parsed.ignored:
        warn(parsed.ignored_message(path), UnknownConfigFieldWarning)
    return parsed.config


def nonfinite_message(path: str | os.PathLike[str], fields: list[str]) -> str:
    """The refusal for non-finite numbers in the config, naming the fields."""
    return (
        f"Adapter config holds non-finite numbers in {os.fspath(path)!r}: {_fmt_keys(fields)} — "
        f"expected finite values (a NaN or infinite alpha makes every output NaN) — re-save the "
        f"adapter, or fix those fields."
    )


# The fields of a transformers model's config.json (PretrainedConfig.to_dict) that no PEFT config has.
_MODEL_CONFIG_FIELDS = ("model_type", "architectures")


def looks_like_model_config(raw: dict[str, Any]) -> bool:
    """Whether a JSON object is a model's ``config.json`` rather than an adapter config: it names a
    ``model_type`` or ``architectures`` and no ``peft_type``."""
    return "peft_type" not in raw and any(raw.get(name) for name in _MODEL_CONFIG_FIELDS)


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


def structural_overrides(config: PeftConfig, dropout: float | None) -> dict[str, float]:
    """The structural rates the copy keeps but the caller wants otherwise.

    Rates that decide whether Dropout modules exist at all inside an ``nn.Sequential`` (X-LoRA's
    classifier, :data:`safe_lora._peft.STRUCTURAL_RATES`): turning one to or from 0 adds or removes
    modules and shifts every later index, so the saved keys would no longer fit. The copy keeps the
    saved rate for these; the loader sets the rate on the built modules instead.
    """
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
