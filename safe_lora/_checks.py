"""Every check of an adapter's files, written once, each yielding findings.

:func:`read_adapter` reads an adapter's files -- each whole and once, with bounds -- and runs every
check that needs no model, in the order that keeps a hostile file cheap: what the files *are*
(regular files, the format), the bytes someone vouched for (pinned digests, a signature), the config,
then the weights, then the weights against the config. Each check yields :class:`Finding`\\ s; an
``"error"`` finding carries the typed error a loader raises for it.

The loaders raise the first error and emit the warnings (:func:`raise_first`, :func:`emit`);
:func:`safe_lora.inspect_adapter` lists them all; :mod:`safe_lora.auto` runs the same before a base
model is loaded. The checks against a model live in :mod:`safe_lora._fit`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft import PeftConfig

from safe_lora._config import (
    CONFIG_MAX_BYTES,
    config_error,
    dropout_rates,
    nonfinite_fields,
    nonfinite_message,
    parse_config,
)
from safe_lora._patterns import pattern_key, resolve_patterns
from safe_lora._peft import (
    EMBEDDING_LAYER_NAMES,
    FLOAT_TENSOR_NAMES,
    INCLUDE_LINEAR_LAYERS_SHORTHAND,
    INTEGER_SLOTS,
    LORA_PAIRS,
    LORA_RANK_DIM,
    NOOP_RULES,
    SAVED_PREFIX,
    TUNER_PREFIX,
    check_target_module_exists,
    external_reads,
    layer_param_names,
    peft_type_name,
    replicated_depth,
    rewrites_base,
    tuner_class,
)
from safe_lora._readers import FileBytes, PickleRefused, TensorInfo, Weights, parse_pickle, parse_safetensors
from safe_lora._source import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, AdapterSource
from safe_lora.errors import (
    AdapterConfigError,
    AdapterIntegrityError,
    AdapterNotFoundError,
    AdapterWeightsError,
    NoOpAdapterWarning,
    SafeLoraError,
    UnknownConfigFieldWarning,
    UnsafeAdapterError,
    _fmt_keys,
    warn,
)

__all__ = [
    "WEIGHTS_MAX_BYTES",
    "AdapterOnDisk",
    "DiskOptions",
    "Finding",
    "emit",
    "nonfinite_keys",
    "noop_adapter",
    "normalise_pins",
    "raise_first",
    "read_adapter",
    "wrong_dtypes",
]

Severity = Literal["error", "warning", "info"]
_ORDER = {"error": 0, "warning": 1, "info": 2}

# An adapter's weights file is read whole into memory; the bound only keeps a file that could never
# be an adapter (a device, an endless stream) from exhausting memory. 64 GiB: a full-size embedding
# matrix saved with the adapter (save_embedding_layers) of the largest open models stays well below.
WEIGHTS_MAX_BYTES = 64 << 30


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about an adapter.

    Attributes:
        severity: ``"error"`` (safe_lora's loaders refuse it), ``"warning"`` (it loads, but something
            can go wrong depending on how it is used) or ``"info"``.
        code: A stable identifier, e.g. ``"live-dropout"``, ``"pickle-only"``, ``"weights-corrupt"``.
        message: What was found and what to do about it.
        keys: The tensor keys concerned, sorted (empty when the finding is not about keys).
        error: For an error: the exception a loader raises (its message is :attr:`message`).
        warning: For a warning a loader emits too: its category (``None``: reported only).

    Example:
        >>> Finding("warning", "live-dropout", "lora_dropout=0.1 is live in train mode").severity
        'warning'
    """

    severity: Severity
    code: str
    message: str
    keys: tuple[str, ...] = ()
    error: SafeLoraError | None = field(default=None, compare=False, repr=False)
    warning: type[Warning] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def refusal(cls, code: str, error: SafeLoraError, keys: Iterable[str] = ()) -> Finding:
        """An error finding for ``error``: its message, and the keys it names."""
        return cls("error", code, str(error), tuple(sorted(keys)), error=error)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (without the exception and warning objects)."""
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "keys": list(self.keys),
        }


def raise_first(findings: Iterable[Finding]) -> None:
    """Raise the error of the first error finding, if any (the loaders' verdict)."""
    for finding in findings:
        if finding.error is not None:
            raise finding.error


def emit(findings: Iterable[Finding]) -> None:
    """Emit the warnings a loader emits (findings with a warning category), at the caller's line."""
    for finding in findings:
        if finding.warning is not None:
            warn(finding.message, finding.warning)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then infos; in discovery order within each."""
    return sorted(findings, key=lambda f: _ORDER[f.severity])


# --------------------------------------------------------------------------------------------------
# What is read, and how
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskOptions:
    """How an adapter is judged on disk; the loaders' own arguments.

    Attributes:
        allow_pickle: Accept ``adapter_model.bin`` when there is no safetensors file.
        training: The load is for training (prompt-learning adapters cannot be).
        strict: Missing and unexpected keys are errors (else warnings).
        check_values: Scan the tensors for NaN/inf and for a no-op adapter.
        key_rules: Check the file's keys against the config without a model (targets, ranks, pairs).
            The loaders leave this to the exact check against the model (:mod:`safe_lora._fit`).
        config: A config object to use instead of the file's (``config=``); the file is read anyway.
        expected_sha256: Pinned digests: the weights file's sha256, or ``{file name: sha256}``;
            checked and lower-cased here (:func:`normalise_pins`), before anything is read.
        signed_by: Who must have signed the files read (see :mod:`safe_lora._signing`).
        instead: The call to suggest for a prompt-learning adapter loaded for training.
        name: The adapter's name in the model, for messages.
        exhaustive: Read and judge the weights even when the config already failed (a report that
            lists everything); the loaders stop at the first refusal.
        unpickle: Parse a pickle the caller allowed (``torch.load(weights_only=True)``); a report
            never opens one.
    """

    allow_pickle: bool = False
    training: bool = False
    strict: bool = True
    check_values: bool = True
    key_rules: bool = True
    config: PeftConfig | None = None
    expected_sha256: str | Mapping[str, str] | None = None
    signed_by: Any = None
    instead: str = "load_for_inference"
    name: str = "default"
    exhaustive: bool = False
    unpickle: bool = True

    def __post_init__(self) -> None:
        # A pin that can never match is the caller's mistake, said before anything is read.
        object.__setattr__(self, "expected_sha256", normalise_pins(self.expected_sha256))


@dataclass
class AdapterOnDisk:
    """An adapter's files as read and judged, without a model.

    Attributes:
        source: Where the files are.
        files: Every file read, by name, with the sha256 of its bytes.
        config: The config PEFT would build (the file's, or ``config=``); ``None`` when unreadable.
        saved_config: The file's own config, when readable (``None`` when only ``config=`` is known).
        weights: The tensors and what the file says of them; ``None`` when unreadable or not read.
        weights_name: The weights file's name (``adapter_model.safetensors`` or ``.bin``).
        findings: Every finding, in discovery order.
    """

    source: AdapterSource
    files: dict[str, FileBytes] = field(default_factory=dict)
    config: PeftConfig | None = None
    saved_config: PeftConfig | None = None
    weights: Weights | None = None
    weights_name: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no finding is an error."""
        return not any(f.severity == "error" for f in self.findings)

    @property
    def header(self) -> dict[str, TensorInfo]:
        """What the weights file says of each tensor (empty when it was not read)."""
        return self.weights.header if self.weights is not None else {}

    def release_weight_bytes(self) -> None:
        """Drop the weights file's bytes once its tensors are parsed (digests stay): a load that
        hands PEFT the parsed tensors would otherwise hold the file twice."""
        if self.weights is not None and self.weights_name in self.files:
            self.files[self.weights_name].release()

    @property
    def weights_path(self) -> str:
        """The weights file's location, for messages and error attributes."""
        return self.source.where(self.weights_name or SAFETENSORS_NAME)


def read_adapter(source: AdapterSource, options: DiskOptions) -> AdapterOnDisk:
    """Read an adapter's files and run every check that needs no model; return what was found.

    Nothing is raised for what the files hold: every problem is a finding (see
    :func:`raise_first`). The order keeps a hostile file cheap: nothing is parsed before the bytes
    are known to be the ones vouched for, and the weights are not read when the config already fails.
    With ``signed_by``, ``model.sig`` is read and verified before any other file, and each file is
    compared with the signed manifest as soon as it is read.

    Raises:
        AdapterNotFoundError, AdapterAccessError: A hub file could not be fetched.
    """
    found = AdapterOnDisk(source)
    add = found.findings.append

    # 1. What the files are: a FIFO, a directory or a device where a file should be is never opened.
    special = {
        name: kind
        for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)
        if (kind := source.kind(name)) is not None and kind != "missing"
    }
    # A pickle the caller did not allow is refused for being a pickle, before what kind of file it is.
    refused_pickle = source.weights_format == "pickle" and not options.allow_pickle
    for name, kind in special.items():
        if name == PICKLE_NAME and refused_pickle:
            continue
        error_type = AdapterConfigError if name == CONFIG_NAME else AdapterWeightsError
        add(
            Finding.refusal(
                "not-a-file",
                error_type(
                    f"Adapter {'config' if name == CONFIG_NAME else 'weights'} unreadable: "
                    f"{source.where(name)!r} is {kind} — expected the regular file save_pretrained writes "
                    f"— replace it with the adapter's real {name}.",
                    path=source.where(name),
                ),
            )
        )

    # 2. Who vouches for the bytes: a required signature is read and verified before any other file,
    # so an unsigned repo or another signer's costs no download, and each file is compared with the
    # signed manifest as soon as it is read -- before it is parsed.
    manifest: dict[str, str] | None = None
    if options.signed_by is not None:
        manifest = _signed_manifest(found, options)
        if manifest is None and not options.exhaustive:
            return found

    # 3. The config: its bytes, pinned and signed, then parsed.
    if CONFIG_NAME not in special:
        config_file = _read(
            found, CONFIG_NAME, CONFIG_MAX_BYTES, config_error(source.where(CONFIG_NAME)), "config-invalid"
        )
        if config_file is not None:
            found.files[CONFIG_NAME] = config_file
            _check_pin(found, options, CONFIG_NAME)
            _check_signed(found, manifest, CONFIG_NAME)
            if found.ok:
                _parse_config(found, config_file, options)
    if options.config is not None:
        found.config = options.config
    config = found.config
    if config is not None and options.training and config.is_prompt_learning:
        add(
            Finding.refusal(
                "prompt-learning-training",
                AdapterConfigError(
                    f"Cannot load a {peft_type_name(config)} adapter for training: PEFT can only load "
                    f"prompt-learning adapters frozen — use {options.instead}, or train a fresh adapter with "
                    f"get_peft_model.",
                    path=source.where(CONFIG_NAME),
                ),
            )
        )

    # 4. Which weights file, and may it be read.
    weights_name = _weights_file(found, options, special)
    if weights_name is None or not (found.ok or options.exhaustive):
        return found
    weights_file = _read(
        found, weights_name, WEIGHTS_MAX_BYTES, _weights_error(source.where(weights_name)), "weights-corrupt"
    )
    if weights_file is None:
        return found
    found.files[weights_name] = weights_file
    found.weights_name = weights_name
    _check_pin(found, options, weights_name)
    _check_signed(found, manifest, weights_name)
    _check_unpinned(found, options)
    if not (found.ok or options.exhaustive) or (weights_name == PICKLE_NAME and not options.unpickle):
        return found
    if any(f.code in _PROVENANCE_CODES for f in found.findings):
        return found  # bytes nobody vouched for are not parsed, not even for a report that lists all

    # 5. The weights: parsed from the bytes read, then judged.
    _parse_weights(found, weights_file, weights_name)
    if found.weights is None:
        return found
    _check_tensors(found, options)
    if config is not None and found.ok and options.key_rules:
        found.findings.extend(key_findings(found.header, config, found.weights_path, strict=options.strict))
    return found


# Findings that say the bytes read are not the ones vouched for (a pin, the Hub's record, a signature).
_PROVENANCE_CODES = frozenset({"integrity", "signature"})


def _read(found: AdapterOnDisk, name: str, limit: int, error: Any, code: str) -> FileBytes | None:
    try:
        return found.source.read(name, max_bytes=limit, error=error)
    except AdapterIntegrityError as exc:  # the hub's record of the file disagrees with its bytes
        found.findings.append(Finding.refusal("integrity", exc))
    except (AdapterConfigError, AdapterWeightsError) as exc:
        found.findings.append(Finding.refusal(code, exc))
    return None


def _weights_error(where: str) -> Any:
    def error(found: str, hint: str) -> AdapterWeightsError:
        return AdapterWeightsError(
            f"Adapter weights unreadable: {where!r} {found} — expected the file save_pretrained writes — "
            f"{hint}.",
            path=where,
        )

    return error


# --------------------------------------------------------------------------------------------------
# Provenance: pinned digests and signatures (over the bytes read)
# --------------------------------------------------------------------------------------------------


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def normalise_pins(pinned: Any) -> str | dict[str, str] | None:
    """``expected_sha256=`` checked and in lower case: one sha256, or ``{file name: sha256}``.

    A digest is 64 hexadecimal digits, in either case (``sha256sum`` prints lower case, some tools
    upper case), surrounding whitespace ignored.

    Raises:
        TypeError: Not a str, a mapping of str to str, or ``None``.
        ValueError: A digest that is not 64 hex digits (e.g. a whole ``sha256sum`` line, or a git
            sha1), or an empty mapping, which would pin nothing.

    Example:
        >>> normalise_pins({"adapter_config.json": "AB" * 32})
        {'adapter_config.json': 'abababababababababababababababababababababababababababababababab'}
    """
    if pinned is None:
        return None
    if isinstance(pinned, str):
        return _pin_value(pinned, "expected_sha256")
    if not isinstance(pinned, Mapping):
        raise TypeError(
            f"expected_sha256= must be the weights file's sha256 (a str) or {{file name: sha256}}, found "
            f"{type(pinned).__name__}."
        )
    if not pinned:
        raise ValueError(
            "expected_sha256={} pins nothing — expected {file name: sha256} for the files to pin — pass the "
            "digests, or None to load unpinned."
        )
    pins: dict[str, str] = {}
    for name, digest in pinned.items():
        if not isinstance(name, str):
            raise TypeError(f"expected_sha256= keys must be file names (str), found {type(name).__name__}.")
        pins[name] = _pin_value(digest, f"expected_sha256[{name!r}]")
    return pins


def _pin_value(digest: Any, what: str) -> str:
    if not isinstance(digest, str):
        raise TypeError(f"{what} must be a sha256 in hex (a str), found {type(digest).__name__}.")
    text = digest.strip().lower()
    if not _SHA256_HEX.fullmatch(text):
        raise ValueError(
            f"{what}={digest!r:.100} is not a sha256: expected 64 hexadecimal digits, as `sha256sum FILE` "
            f"prints them (without the file name) — copy the digest alone."
        )
    return text


def _pins(found: AdapterOnDisk, options: DiskOptions) -> dict[str, str]:
    pinned = options.expected_sha256
    if pinned is None:
        return {}
    if isinstance(pinned, str):
        weights = found.weights_name or (
            found.source.weights_format
            and (SAFETENSORS_NAME if found.source.weights_format == "safetensors" else PICKLE_NAME)
        )
        return {str(weights): pinned}
    return dict(pinned)


def _check_pin(found: AdapterOnDisk, options: DiskOptions, name: str) -> None:
    expected = _pins(found, options).get(name)
    if expected is None:
        return
    file = found.files[name]
    if file.sha256 != expected:
        found.findings.append(
            Finding.refusal(
                "integrity",
                AdapterIntegrityError(
                    f"Adapter file does not match its pinned digest: {found.source.where(name)!r} has sha256 "
                    f"{file.sha256} — expected {expected} (expected_sha256=) — the file was "
                    "changed or replaced; load the reviewed file, or update the pin if the change is "
                    "intended.",
                    path=found.source.where(name),
                    expected=expected,
                    actual=file.sha256,
                ),
            )
        )


def _check_unpinned(found: AdapterOnDisk, options: DiskOptions) -> None:
    """A pin on a file that is not read is a mistake: it would silently pin nothing."""
    read = set(found.files) | {found.weights_name}
    stray = sorted(set(_pins(found, options)) - read)
    if stray:
        found.findings.append(
            Finding.refusal(
                "integrity",
                AdapterIntegrityError(
                    f"Pinned digests for files that are not read: {stray} — expected names among "
                    f"{sorted(n for n in read if n)} (the files this load reads; model.sig only with "
                    f"signed_by=) — pin {CONFIG_NAME!r} and the weights file by name.",
                    path=found.source.where(stray[0]),
                ),
            )
        )


def _signed_manifest(found: AdapterOnDisk, options: DiskOptions) -> dict[str, str] | None:
    """Read ``model.sig``, pin it, verify it with ``signed_by``: the signed ``{name: sha256}``, or
    ``None`` with a finding saying why there is none."""
    from safe_lora._signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, signed_digests

    source = found.source
    if SIGNATURE_NAME not in source.present:
        found.findings.append(
            Finding.refusal(
                "signature",
                AdapterIntegrityError(
                    f"Adapter not signed: {source.label} has no {SIGNATURE_NAME} — expected an OpenSSF "
                    f"model-signing signature beside the files (signed_by= was given) — ask the author "
                    f"to sign the folder (`model_signing sign`), or drop signed_by=.",
                    path=source.where(SIGNATURE_NAME),
                ),
            )
        )
        return None
    signature = _read(
        found,
        SIGNATURE_NAME,
        MAX_SIGNATURE_BYTES,
        _integrity_error(source.where(SIGNATURE_NAME)),
        "signature",
    )
    if signature is None:
        return None
    found.files[SIGNATURE_NAME] = signature
    before = len(found.findings)
    _check_pin(found, options, SIGNATURE_NAME)
    if len(found.findings) > before:
        return None
    try:
        return signed_digests(signature, signed_by=options.signed_by, where=source.location)
    except AdapterIntegrityError as exc:
        found.findings.append(Finding.refusal("signature", exc))
        return None


def _check_signed(found: AdapterOnDisk, manifest: Mapping[str, str] | None, name: str) -> None:
    """Compare the file just read with the signed manifest (nothing to do without a signature)."""
    from safe_lora._signing import SIGNATURE_NAME, check_digests

    if manifest is None:
        return
    try:
        check_digests(
            manifest,
            {name: found.files[name].sha256},
            where=found.source.location,
            signature_name=SIGNATURE_NAME,
        )
    except AdapterIntegrityError as exc:
        found.findings.append(Finding.refusal("signature", exc))


def _integrity_error(where: str) -> Any:
    def error(what: str, hint: str) -> AdapterIntegrityError:
        return AdapterIntegrityError(
            f"Adapter signature unreadable: {where!r} {what} — expected the model.sig bundle model-signing "
            f"writes — {hint}.",
            path=where,
        )

    return error


# --------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------


def _parse_config(found: AdapterOnDisk, file: FileBytes, options: DiskOptions) -> None:
    from safe_lora._readers import parse_json_object

    where = found.source.where(CONFIG_NAME)
    add = found.findings.append
    try:
        raw = parse_json_object(file, error=config_error(where))
    except AdapterConfigError as exc:
        add(Finding.refusal("config-invalid", exc))
        return
    long = _long_fields(raw, _weights_size(found.source))
    if long:
        add(Finding.refusal("config-oversized", _oversized(where, long, _weights_size(found.source)), ()))
        return
    bad = nonfinite_fields(raw)
    if bad:
        add(
            Finding.refusal(
                "config-nonfinite", AdapterConfigError(nonfinite_message(where, bad), path=where, fields=bad)
            )
        )
        return
    try:
        parsed = parse_config(raw, path=where)
    except AdapterConfigError as exc:
        add(Finding.refusal("config-not-adapter" if exc.fields == ["peft_type"] else "config-invalid", exc))
        return
    outside = external_reads(parsed.config)
    if outside:
        named = "; ".join(f"{field}={value!r}" for field, value in sorted(outside.items()))
        error = AdapterConfigError(
            f"Adapter config makes PEFT read a resource outside the adapter in {where!r}: {named} — "
            f"expected a config whose injection needs only the adapter's own files (PEFT loads these "
            f"while it builds the layers, whatever the weights file holds) — load it with PEFT directly "
            f"if you trust what the field names, or ask its author for a self-contained adapter.",
            path=where,
            fields=sorted(outside),
        )
        add(Finding.refusal("config-external", error))
        return
    if parsed.refused:
        add(
            Finding.refusal(
                "config-unknown-fields",
                AdapterConfigError(parsed.unknown_message(where), path=where, fields=parsed.refused),
            )
        )
        return
    if parsed.ignored:
        add(
            Finding(
                "warning",
                "config-ignored-fields",
                parsed.ignored_message(where),
                warning=UnknownConfigFieldWarning,
            )
        )
    found.config = found.saved_config = parsed.config


# What the weights file's size allows a config's lists to hold: every entry of a list PEFT acts on
# (target names, token indices, layer ranges, pattern keys) stands for at least one number in the file,
# and a number takes at least half a byte (F4). The floor keeps small legitimate files clear.
_ENTRIES_FLOOR = 4096


def _weights_size(source: AdapterSource) -> int | None:
    sizes = [source.present.get(name) for name in (SAFETENSORS_NAME, PICKLE_NAME) if name in source.present]
    known = [s for s in sizes if s is not None]
    return max(known) if known else None


def _long_fields(raw: Mapping[str, Any], weights_bytes: int | None) -> dict[str, int]:
    """The config's lists and dicts longer than the weights file could back, by dotted name.

    Walked without recursion, before PEFT builds anything from them: PEFT processes such fields one
    entry at a time (a 2-million-entry ``trainable_token_indices`` costs it tens of seconds and GBs),
    and copying the config costs as much again.
    """
    if weights_bytes is None:
        return {}
    limit = max(2 * weights_bytes, _ENTRIES_FLOOR)
    found: dict[str, int] = {}
    stack: list[tuple[str, Any]] = list(raw.items())
    while stack:
        where, value = stack.pop()
        if isinstance(value, (list, dict)):
            if len(value) > limit:
                found[where] = len(value)
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend(
                (f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]", v) for k, v in items
            )
    return dict(sorted(found.items()))


def _oversized(where: str, long: Mapping[str, int], weights_bytes: int | None) -> AdapterConfigError:
    shown = ", ".join(f"{name} ({count:,} entries)" for name, count in list(long.items())[:10])
    return AdapterConfigError(
        f"Adapter config claims more than its weights can back in {where!r}: {shown} — expected at most one "
        f"entry per number in the {weights_bytes:,}-byte weights file (each entry names modules, tokens or "
        f"layers the weights must then fill) — the config was edited or belongs to another adapter; re-save "
        f"the adapter with save_pretrained.",
        path=where,
        fields=list(long),
    )


def config_findings(config: PeftConfig) -> list[Finding]:
    """What the config alone says that is worth knowing (reported by inspect; the loaders act on it)."""
    findings = []
    live = {name: rate for name, rate in dropout_rates(config).items() if rate > 0}
    if live:
        rates = ", ".join(f"{name}={rate:g}" for name, rate in live.items())
        findings.append(
            Finding(
                "warning",
                "live-dropout",
                f"Live dropout risk: {rates}. Whenever the adapter's layers are in train mode — loaded with "
                f"load_for_training or PeftModel.from_pretrained(..., is_trainable=True), or after "
                f"model.train() — the same input gives a different output on every call, sometimes the "
                f"base model's. Load it with load_for_inference (which removes the dropout) to evaluate "
                f"or serve it; during training, evaluate inside deterministic_lora(model).",
            )
        )
    if not getattr(config, "base_model_name_or_path", None):
        findings.append(
            Finding(
                "info",
                "no-base-model",
                "The config records no base_model_name_or_path, so nothing can warn when the adapter "
                "is loaded into a different base model — make sure you know which base it was trained on.",
            )
        )
    return findings


# --------------------------------------------------------------------------------------------------
# The weights file: which one, parsed
# --------------------------------------------------------------------------------------------------


def _weights_file(found: AdapterOnDisk, options: DiskOptions, special: Mapping[str, str]) -> str | None:
    """The weights file the loaders read, or ``None`` with a finding saying why none can be."""
    source = found.source
    add = found.findings.append
    fmt = source.weights_format
    if fmt == "safetensors":
        if PICKLE_NAME in source.present and PICKLE_NAME not in special:
            size = source.present.get(PICKLE_NAME) or 0
            add(
                Finding(
                    "warning",
                    "pickle-present",
                    f"Pickle file present: {PICKLE_NAME} ({size} bytes) sits next to {SAFETENSORS_NAME}. "
                    f"safe_lora loads the safetensors file and never unpickles, and this report did not "
                    f"open the pickle — but a tool that prefers .bin files would run whatever code it holds "
                    f"— delete it unless you trust its source.",
                )
            )
        return None if SAFETENSORS_NAME in special else SAFETENSORS_NAME
    if fmt == "pickle":
        size = source.present.get(PICKLE_NAME) or 0
        if not options.allow_pickle:
            add(
                Finding.refusal(
                    "pickle-only",
                    UnsafeAdapterError(
                        f"Refusing to {'download and ' if source.hub is not None else ''}unpickle "
                        f"{source.where(PICKLE_NAME)!r} ({size} bytes): the adapter has no "
                        f"{SAFETENSORS_NAME}, and loading a pickle can run arbitrary code — expected "
                        f"safetensors weights — ask for a safetensors copy, re-save it with "
                        "save_pretrained(safe_serialization=True), or pass allow_pickle=True "
                        "(--allow-pickle) "
                        f"if you trust its source.",
                        path=source.where(PICKLE_NAME),
                    ),
                )
            )
            if PICKLE_NAME in special:  # reported as well, for inspect's full list
                add(
                    Finding.refusal(
                        "not-a-file",
                        AdapterWeightsError(
                            f"Adapter weights unreadable: {source.where(PICKLE_NAME)!r} is "
                            f"{special[PICKLE_NAME]} — "
                            "expected the regular file save_pretrained writes — replace it with the "
                            "adapter's "
                            f"real {PICKLE_NAME}.",
                            path=source.where(PICKLE_NAME),
                        ),
                    )
                )
            return None
        if PICKLE_NAME in special:
            return None
        add(
            Finding(
                "warning",
                "pickle-only",
                f"Pickle weights only: {PICKLE_NAME} ({size} bytes) and no {SAFETENSORS_NAME}. With "
                "allow_pickle=True it is loaded with torch.load(weights_only=True) — prefer a safetensors "
                "copy.",
            )
        )
        return PICKLE_NAME
    add(
        Finding.refusal(
            "weights-missing",
            AdapterNotFoundError(
                f"Adapter weights not found: {source.label} has no {SAFETENSORS_NAME}{_where_hub(source)} "
                "(nor "
                f"{PICKLE_NAME}) — expected {SAFETENSORS_NAME} next to {CONFIG_NAME} — re-save the adapter "
                "with "
                f"save_pretrained, or upload or copy its weights file too.",
                path=source.where(SAFETENSORS_NAME),
            ),
        )
    )
    return None


def _where_hub(source: AdapterSource) -> str:
    return f" {source.hub.where}" if source.hub is not None else ""


def _parse_weights(found: AdapterOnDisk, file: FileBytes, name: str) -> None:
    where = found.source.where(name)
    error = _weights_error(where)
    try:
        if name == SAFETENSORS_NAME:
            found.weights = parse_safetensors(file, error=error)
        else:
            found.weights = parse_pickle(file, error=error)
    except PickleRefused as exc:
        found.findings.append(
            Finding.refusal(
                "pickle-unsafe",
                UnsafeAdapterError(
                    f"Refusing to unpickle {where!r}: it holds objects that torch.load(weights_only=True) "
                    f"will not build ({exc}) — expected only tensors — ask for a safetensors copy of the "
                    f"adapter; do not load it with weights_only=False unless you trust its source.",
                    path=where,
                ),
            )
        )
    except AdapterWeightsError as exc:
        found.findings.append(Finding.refusal("weights-corrupt", exc))


# --------------------------------------------------------------------------------------------------
# The tensors: count, shapes, dtypes, values
# --------------------------------------------------------------------------------------------------


def _check_tensors(found: AdapterOnDisk, options: DiskOptions) -> None:
    assert found.weights is not None
    add = found.findings.append
    where = found.weights_path
    header = found.weights.header
    if not header and options.key_rules:  # with a model, the exact check names the missing keys
        add(
            Finding.refusal(
                "no-tensors",
                AdapterWeightsError(
                    f"Adapter weights empty: expected the adapter's tensors in {where!r}, found none — "
                    "re-save "
                    f"the adapter with save_pretrained.",
                    path=where,
                ),
            )
        )
        return
    if not header:
        return
    empty = sorted(k for k, info in header.items() if 0 in info.shape)
    if empty:
        all_empty = len(empty) == len(header)
        add(
            Finding.refusal(
                "empty-tensors",
                AdapterWeightsError(
                    f"Adapter weights hold {'only ' if all_empty else ''}empty tensors in {where!r}: "
                    f"{_fmt_keys(f'{k} {list(header[k].shape)}' for k in empty)} — expected every tensor to "
                    "hold values (a DeepSpeed ZeRO-3 run saves shape-[0] placeholders unless the weights "
                    "are "
                    f"gathered) — re-save with the weights gathered (e.g. "
                    f"stage3_gather_16bit_weights_on_model_save=true, or save from the unwrapped model).",
                    path=where,
                    mismatched_keys={k: (header[k].shape, ()) for k in empty},
                ),
                empty,
            )
        )
        return
    config = found.config
    depth = replicated_depth(config) if config is not None else None
    if depth is not None and depth > len(header):
        add(
            Finding.refusal(
                "config-oversized",
                AdapterConfigError(
                    "Adapter config claims more than its weights can back in "
                    f"{found.source.where(CONFIG_NAME)!r}: "
                    f"layer_replication builds {depth:,} layers, and the weights file holds {len(header):,} "
                    f"tensors — expected at most one replicated layer per tensor (each replicated layer is a "
                    "module the adapter's targets select again, to be filled by the file) — re-save the "
                    "adapter, "
                    f"or fix 'layer_replication'.",
                    path=found.source.where(CONFIG_NAME),
                    fields=["layer_replication"],
                ),
            )
        )
        return
    if config is not None:
        bad = wrong_dtypes(config, header)
        if bad:
            add(
                Finding.refusal(
                    "wrong-dtype",
                    AdapterWeightsError(dtype_message(where, bad), path=where, wrong_dtypes=bad),
                    bad,
                )
            )
            return
    if not options.check_values:
        return
    tensors = found.weights.tensors
    bad_values = nonfinite_keys(tensors.items())
    if bad_values:
        add(
            Finding.refusal(
                "nonfinite",
                AdapterWeightsError(
                    f"Adapter weights hold NaN or inf in {where!r}: {_fmt_keys(bad_values)} — expected "
                    "finite "
                    f"values — the adapter's training diverged; use an earlier checkpoint.",
                    path=where,
                    nonfinite_keys=bad_values,
                ),
                bad_values,
            )
        )
        return
    if config is not None and noop_adapter(config, tensors):
        subject = f"Adapter {options.name!r} from {found.source.label}"
        add(Finding("warning", "noop-adapter", noop_message(config, subject), warning=NoOpAdapterWarning))


# Float dtypes torch can sum as they are; the float8 ones (refused later, by dtype) are widened first.
_SUMMABLE = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def nonfinite_keys(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The keys whose floating-point tensors hold NaN or inf, sorted.

    A sum carries any NaN or inf through, so one sum per tensor and one check in all answer the
    usual "all finite" case (~10x cheaper than isfinite per tensor). A sum can also overflow on
    finite values; then the exact per-tensor scan decides, so the answer is always exact.

    Each sum is taken in the tensor's own dtype: ``sum(dtype=torch.float64)`` first makes a float64
    copy of the tensor, and freeing copies of that size moves glibc's mmap threshold, which made the
    load's peak memory 15% higher in some runs. A half-precision sum overflows sooner; the exact scan
    then answers.

    Example:
        >>> nonfinite_keys([("a", torch.ones(2)), ("b", torch.tensor([float("nan")]))])
        ['b']
    """
    floats = [(k, t) for k, t in tensors if t.is_floating_point()]
    if not floats:
        return []
    total = sum(float(t.sum() if t.dtype in _SUMMABLE else t.to(torch.float64).sum()) for _, t in floats)
    if math.isfinite(total):
        return []
    return sorted(k for k, t in floats if not bool(torch.isfinite(t).all()))


# The dtypes an adapter's own tensors are trained and saved in.
_ADAPTER_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# Dtypes no torch layer keeps as its `weight` or `bias` (int8/uint8 remain: bitsandbytes storage
# of a quantized module saved whole).
_NEVER_WEIGHT_DTYPES = frozenset(
    {"BOOL", "I16", "U16", "I32", "U32", "I64", "U64", "C64", "complex128", "complex32"}
)


def wrong_dtypes(config: PeftConfig, header: Mapping[str, TensorInfo]) -> dict[str, str]:
    """The keys whose dtype the adapter cannot hold, with that dtype (``{key: "I32"}``), sorted.

    The adapter's own tensors (those under the tuner's layer attribute names, and prompt
    embeddings) must be float16/bfloat16/float32/float64 -- what PEFT trains and saves -- except the
    index buffers PEFT saves as integers (:data:`~safe_lora._peft.INTEGER_SLOTS`). A float tensor
    relabelled as ``I32`` in the header has the same bytes and shape, and PEFT would load it and fail
    at the first forward. Modules saved whole (``modules_to_save``, embedding layers) may hold
    integer buffers, but never a ``weight`` or ``bias`` of bool or integers wider than 8 bits.
    """
    peft_type = peft_type_name(config)
    names = layer_param_names(tuner_class(peft_type)) | FLOAT_TENSOR_NAMES
    bad = {}
    for key, entry in header.items():
        if entry.dtype in _ADAPTER_DTYPES:
            continue
        parts = key.split(".")
        if any(part in INTEGER_SLOTS for part in parts):
            continue
        own = config.is_prompt_learning or any(part in names for part in parts)
        if own or (parts[-1] in ("weight", "bias") and entry.dtype in _NEVER_WEIGHT_DTYPES):
            bad[key] = entry.dtype
    return dict(sorted(bad.items()))


def dtype_message(where: str, bad: Mapping[str, str]) -> str:
    """The refusal for :func:`wrong_dtypes`' findings, naming the keys and their dtypes."""
    shown = _fmt_keys(f"{k} ({v})" for k, v in bad.items())
    return (
        f"Adapter weights have dtypes the adapter cannot hold in {where!r}: {shown} — expected "
        f"float16/bfloat16/float32/float64 adapter tensors (integer only for index buffers) — the file is "
        f"corrupt or was edited; re-save or re-download the adapter."
    )


def noop_adapter(config: PeftConfig, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether loading these saved tensors with this config provably changes nothing.

    True when every module's output factor is exactly zero (LoRA's ``lora_B``, AdaLoRA's
    ``lora_E``, VeRA's ``lambda_b``, ...) or at its identity value (IA3's scale at one, a BOFT/OFT
    rotation generator at zero), per the tuner's rule in :data:`~safe_lora._peft.NOOP_RULES`. False
    whenever the file holds a tensor the rule does not cover (``modules_to_save``, a DoRA magnitude,
    biases, a variant's extra tensors), for tuners without a rule, and for configs that change the
    model by themselves (``layer_replication``, inits that rewrite the base weights).

    Example:
        >>> from peft import LoraConfig
        >>> noop_adapter(LoraConfig(), {"base_model.model.fc1.lora_A.weight": torch.ones(4, 2),
        ...                             "base_model.model.fc1.lora_B.weight": torch.zeros(8, 4)})
        True
    """
    peft_type = peft_type_name(config)
    rule = NOOP_RULES.get(peft_type)
    if rule is None or not tensors:
        return False
    # Inits that rewrite the base weights when the adapter is injected (PiSSA, OLoRA, KaSA, ...):
    # then a zero lora_B does not mean "unchanged".
    if peft_type == "LORA" and (getattr(config, "layer_replication", None) or rewrites_base(config)):
        return False
    modules: dict[str, dict[str, list[str]]] = {}
    for key in tensors:
        parts = key.split(".")
        index = next((i for i, part in enumerate(parts) if part in rule.slots), None)
        if index is None:
            return False  # a tensor no rule covers: it may change the output
        factor = rule.factor(parts[index], ".".join(parts[index + 1 :]))
        if factor is None:
            return False
        module = modules.setdefault(".".join(parts[:index]), {})
        module.setdefault(factor, []).append(key)

    def all_zero(factor: str, found: dict[str, list[str]]) -> bool:
        return all(not bool(tensors[k].any()) for k in found[factor])

    effect_seen = False
    for found in modules.values():
        for factor in rule.ones:
            if factor in found:
                effect_seen = True
                if not all(bool((tensors[k] == 1).all()) for k in found[factor]):
                    return False
        for term in rule.terms:
            present = [f for f in term if f in found]
            if not present:
                continue
            effect_seen = True
            if not any(all_zero(f, found) for f in present):
                return False
    return effect_seen


def noop_message(config: PeftConfig, subject: str) -> str:
    """What an adapter that changes nothing is told, ``subject`` naming it (e.g. ``"Adapter 'a'"``)."""
    return (
        f"{subject} changes nothing: every output factor of its {peft_type_name(config)} layers is exactly "
        f"zero (or at its identity value), so the model computes what the base model computes — it "
        f"was probably saved before the first training step, or its weights were gathered wrongly; "
        f"load the trained checkpoint."
    )


# --------------------------------------------------------------------------------------------------
# The file's keys against the config, without a model
# --------------------------------------------------------------------------------------------------

_PROMPT_KEYS = frozenset({"prompt_embeddings"})
_LORA_TYPES = frozenset({"LORA", "ADALORA"})


def _module_path(parts: list[str]) -> str:
    # A layer wrapped twice (LoRA on several parameters of one module) nests under "base_layer".
    return ".".join(p for p in parts if p != "base_layer")


def _explained_extra(config: PeftConfig, parts: list[str]) -> bool:
    """Whether a key that is not an adapter-layer tensor is one PEFT saves on purpose."""
    if parts[-1] == "bias" and getattr(config, "bias", "none") != "none":
        return True
    if "trainable_tokens_delta" in parts and getattr(config, "trainable_token_indices", None):
        return True
    for target in getattr(config, "modules_to_save", None) or []:
        # The same suffix test as PEFT's ModulesToSaveWrapper placement.
        if any(".".join(parts[:i]).endswith(target) for i in range(1, len(parts))):
            return True
    modules = [p for p in parts[:-1] if p != "base_layer"]
    # Embedding layers saved whole (save_embedding_layers, e.g. after resizing the vocabulary).
    return bool(modules) and modules[-1] in EMBEDDING_LAYER_NAMES


@dataclass
class _KeyScan:
    """The keys of a file sorted by what is wrong with them (empty lists: nothing)."""

    off_target: list[str] = field(default_factory=list)
    unknown_names: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    rank_errors: dict[str, tuple[int, int]] = field(default_factory=dict)
    # LoRA factors seen per module path, to find an A without its B.
    factors: dict[str, set[str]] = field(default_factory=dict)


def _expected_rank(config: PeftConfig) -> int | None:
    """The LoRA rank every factor should have, or ``None`` when shapes do not show it plainly."""
    rank = getattr(config, "r", None)
    if peft_type_name(config) != "LORA" or not isinstance(rank, int):
        return None
    if getattr(config, "target_parameters", None):  # LoRA on parameters: rank * num_experts
        return None
    if getattr(config, "use_bdlora", None):  # block-diagonal factors have other shapes
        return None
    return rank


def _scan_keys(
    header: Mapping[str, TensorInfo], config: PeftConfig, names: frozenset[str], prefix: str
) -> _KeyScan:
    scan = _KeyScan()
    is_lora = peft_type_name(config) in _LORA_TYPES
    rank = _expected_rank(config)
    module_paths: dict[str, tuple[list[str], int]] = {}
    for key in header:
        if key.startswith(SAVED_PREFIX):
            parts = key[len(SAVED_PREFIX) :].split(".")
            index = next((i for i, part in enumerate(parts) if part in names), None)
            if index is not None:
                module_paths[key] = (parts, index)
    # Patterns in the config are decided once, with a time bound, over the module paths the file
    # names (PEFT's matcher would run them with no limit).
    config = resolve_patterns(config, sorted({_module_path(p[:i]) for p, i in module_paths.values()}))
    rank_pattern: dict[str, int] = dict(getattr(config, "rank_pattern", None) or {})
    for key, entry in header.items():
        if not key.startswith(SAVED_PREFIX):
            if not key.startswith(TUNER_PREFIX):
                scan.unexplained.append(key)
            # else: a tensor shared by all layers, held by the tuner itself (VeRA's vera_A / vera_B).
            continue
        if key not in module_paths:
            parts = key[len(SAVED_PREFIX) :].split(".")
            if any(part.startswith(prefix) for part in parts):
                scan.unknown_names.append(key)
            elif not _explained_extra(config, parts):
                scan.unexplained.append(key)
            continue
        parts, index = module_paths[key]
        module_path = _module_path(parts[:index])
        if _matches_targets(config, module_path) is False:
            scan.off_target.append(key)
            continue
        factor = parts[index]
        if not (is_lora and factor in LORA_RANK_DIM):
            continue
        scan.factors.setdefault(module_path, set()).add(factor)
        # The factor's weight: "lora_A.weight", or the parameter itself ("lora_embedding_A"), not a bias.
        is_weight = parts[index + 1 :] in ([], ["weight"])
        if rank is not None and is_weight and len(entry.shape) >= 2:
            expected = rank_pattern.get(pattern_key(rank_pattern, module_path), rank)
            found = entry.shape[LORA_RANK_DIM[factor]]
            if found != expected:
                scan.rank_errors[key] = (found, expected)
    return scan


def _matches_targets(config: PeftConfig, module_path: str) -> bool | None:
    """Whether PEFT would put an adapter layer on ``module_path``; ``None`` when the config cannot say."""
    targets = getattr(config, "target_modules", None)
    target_parameters = getattr(config, "target_parameters", None) or []
    for target in target_parameters:
        owner = target.rpartition(".")[0]
        if module_path == owner or module_path.endswith(f".{owner}"):
            return True
    if targets is None:
        return None if not target_parameters else False
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        return None  # "all-linear" depends on the base model's layer types
    # PEFT's own matcher (exclude_modules, layers_to_transform, suffixes) on the resolved patterns;
    # an excluded module comes back as a falsy marker object.
    return bool(check_target_module_exists(config, module_path))


def key_findings(
    header: Mapping[str, TensorInfo], config: PeftConfig, where: str, *, strict: bool = True
) -> list[Finding]:
    """What the file's keys say against the config alone: tensors on modules the config does not
    target, LoRA ranks that contradict ``r`` / ``rank_pattern``, an ``A`` without its ``B``, names
    the tuner does not know, keys nothing explains.

    A rank that contradicts the config is always an error (the shapes cannot fit any model); the
    other findings are about missing or unexpected keys, errors only with ``strict``.
    """
    peft_type = peft_type_name(config)
    keyed: Severity = "error" if strict else "warning"
    if config.is_prompt_learning:
        unknown = sorted(set(header) - _PROMPT_KEYS)
        if not unknown:
            return []
        return [
            _key_finding(
                keyed,
                "unknown-keys",
                f"Keys do not fit the {peft_type} config in {where!r}: expected only {sorted(_PROMPT_KEYS)}, "
                f"found {_fmt_keys(unknown)} — re-save the adapter with save_pretrained.",
                unknown,
                where,
                unexpected=unknown,
            )
        ]

    tuner_cls = tuner_class(peft_type)
    names = layer_param_names(tuner_cls)
    prefix: str = getattr(tuner_cls, "prefix", None) or ""
    if not names or not prefix:
        return [
            Finding(
                "info",
                "keys-unchecked",
                f"Keys not checked against the config: peft's {peft_type} declares no layer parameter "
                f"names — loading checks them against the base model.",
            )
        ]
    try:
        scan = _scan_keys(header, config, names, prefix)
    except AdapterConfigError as exc:  # a pattern that does not finish in time, or does not compile
        return [Finding.refusal("config-pattern", exc)]
    findings = []
    if scan.rank_errors:
        detail = "; ".join(f"{k}: rank {found}" for k, (found, _) in sorted(scan.rank_errors.items())[:10])
        more = f"; and {len(scan.rank_errors) - 10} more" if len(scan.rank_errors) > 10 else ""
        rank_pattern = getattr(config, "rank_pattern", None)
        expected = f"r={getattr(config, 'r', None)}" + (
            f" (rank_pattern {rank_pattern})" if rank_pattern else ""
        )
        findings.append(
            Finding.refusal(
                "rank-mismatch",
                AdapterWeightsError(
                    f"LoRA rank does not fit the config in {where!r}: expected {expected}, found "
                    f"{detail}{more} "
                    f"— the config and the weights come from different adapters; re-save the adapter, or fix "
                    f"'r' / 'rank_pattern'.",
                    path=where,
                    mismatched_keys={k: ((found,), (exp,)) for k, (found, exp) in scan.rank_errors.items()},
                ),
                scan.rank_errors,
            )
        )
    if scan.off_target:
        targets = getattr(config, "target_modules", None)
        shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        findings.append(
            _key_finding(
                keyed,
                "keys-off-target",
                f"Keys do not fit the config in {where!r}: expected adapter tensors only on modules that "
                f"target_modules={_short(shown)} selects, found {len(scan.off_target)} elsewhere: "
                f"{_fmt_keys(scan.off_target)} — the config and the weights come from different adapters; "
                f"re-save the adapter, or fix 'target_modules'.",
                scan.off_target,
                where,
                unexpected=scan.off_target,
            )
        )
    incomplete = sorted(
        f"{module} has {have} without {other}"
        for module, present in scan.factors.items()
        for pair in LORA_PAIRS
        for have, other in (pair, pair[::-1])
        if have in present and other not in present
    )
    if incomplete:
        findings.append(
            _key_finding(
                keyed,
                "incomplete-lora-pair",
                f"LoRA factors incomplete in {where!r}: expected lora_A and lora_B for every targeted "
                f"module, found {_fmt_keys(incomplete)} — the file is partial; re-save the adapter.",
                (),
                where,
            )
        )
    if scan.unknown_names:
        known = sorted(n for n in names if n.startswith(prefix))
        findings.append(
            _key_finding(
                keyed,
                "unknown-parameter",
                f"Unknown adapter parameter names in {where!r}: expected peft's {peft_type} names {known}, "
                f"found {_fmt_keys(scan.unknown_names)} — the adapter comes from another tool or a newer "
                f"peft; re-save it with save_pretrained, or upgrade peft.",
                scan.unknown_names,
                where,
                unexpected=scan.unknown_names,
            )
        )
    if scan.unexplained:
        findings.append(
            _key_finding(
                keyed,
                "unknown-keys",
                f"Keys do not fit the config in {where!r}: expected adapter tensors "
                f"('base_model.model.<module>.{prefix}...') or modules_to_save, found "
                f"{len(scan.unexplained)} other tensor(s): {_fmt_keys(scan.unexplained)} — re-save the "
                f"adapter with save_pretrained, or list those modules in 'modules_to_save'.",
                scan.unexplained,
                where,
                unexpected=scan.unexplained,
            )
        )
    return findings


def _key_finding(
    severity: Severity,
    code: str,
    message: str,
    keys: Iterable[str],
    where: str,
    *,
    unexpected: Iterable[str] = (),
) -> Finding:
    if severity != "error":
        return Finding(severity, code, message, tuple(sorted(keys)))
    return Finding.refusal(
        code, AdapterWeightsError(message, path=where, unexpected_keys=list(unexpected)), keys
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "...]"
