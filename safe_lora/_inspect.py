"""What is in an adapter folder, and would it load safely? Answered without a base model.

Everything here reads the folder, never a model: the config through :func:`read_config`, sizes and
keys from the safetensors *header* (:func:`read_header`), values (optionally) one memory-mapped
tensor at a time. A pickle file (``adapter_model.bin``) is never opened: unpickling can run code,
so only its presence and size are reported.

Without the base model the key check is PEFT's own target matching
(:func:`peft.tuners.tuners_utils.check_target_module_exists`) applied to the module path of each
key, plus the parameter names the tuner's layer classes declare and, for LoRA, the rank dimension of
every ``lora_A`` / ``lora_B``. Shapes against a concrete base model are checked when loading.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peft import PeftConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import EMBEDDING_LAYER_NAMES, INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils.other import get_pattern_key

from safe_lora._config import (
    CONFIG_NAME,
    PICKLE_NAME,
    SAFETENSORS_NAME,
    AdapterFiles,
    WeightsFormat,
    dropout_rates,
    nonfinite_fields,
    nonfinite_message,
    open_adapter,
    parse_config,
    read_config_json,
    special_file,
)
from safe_lora._validate import (
    HeaderEntry,
    check_finite,
    dtype_message,
    iter_tensors,
    layer_param_names,
    lazy_tensors,
    noop_adapter,
    noop_message,
    read_header,
    tuner_class,
    wrong_dtypes,
)
from safe_lora.errors import AdapterConfigError, AdapterWeightsError, _fmt_keys

__all__ = ["AdapterReport", "Finding", "WeightFile", "inspect_adapter"]

Severity = Literal["error", "warning", "info"]

# Bits per element of every safetensors dtype (F4/F6 pack several elements per byte).
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}

# How PEFT prefixes the keys it saves: "base_model.model.<module path>.<adapter param>...".
_MODEL_PREFIX = "base_model.model."
_TUNER_PREFIX = "base_model."
_PROMPT_KEYS = frozenset({"prompt_embeddings"})
_LORA_TYPES = frozenset({"LORA", "ADALORA"})
# Which dimension of each LoRA factor is the rank: A is (r, in, ...), B is (out, r, ...).
_RANK_DIM = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about an adapter folder.

    Attributes:
        severity: ``"error"`` (safe_lora would refuse to load the folder), ``"warning"`` (it loads,
            but something can go wrong depending on how it is used) or ``"info"``.
        code: A stable identifier, e.g. ``"live-dropout"``, ``"pickle-only"``, ``"weights-corrupt"``.
        message: What was found and what to do about it.
        keys: The tensor keys concerned, sorted (empty when the finding is not about keys).

    Example:
        >>> Finding("warning", "live-dropout", "lora_dropout=0.1 is live in train mode").severity
        'warning'
    """

    severity: Severity
    code: str
    message: str
    keys: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "keys": list(self.keys),
        }


@dataclass(frozen=True)
class WeightFile:
    """One weights file of the folder.

    Attributes:
        name: The file name, e.g. ``"adapter_model.safetensors"``.
        format: ``"safetensors"`` or ``"pickle"``.
        size_bytes: The file's size on disk.
    """

    name: str
    format: WeightsFormat
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {"name": self.name, "format": self.format, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`inspect_adapter` found in an adapter folder.

    Config fields are ``None`` when the config cannot be read (an ``"config-invalid"`` finding
    says why); tensor fields are ``None`` when there is no readable safetensors file.

    Attributes:
        path: The folder inspected.
        peft_type: E.g. ``"LORA"``, ``"LOHA"``, ``"PROMPT_TUNING"``.
        task_type: E.g. ``"CAUSAL_LM"``; ``None`` when the config names none.
        rank: The config's ``r`` (the default rank), when the tuner has one.
        alpha: ``lora_alpha`` or ``alpha``, when the tuner has one.
        rank_pattern: Per-module ranks that override ``rank``.
        alpha_pattern: Per-module alphas that override ``alpha``.
        dropout: Every dropout rate the config holds, e.g. ``{"lora_dropout": 0.1}``.
        target_modules: The config's ``target_modules``: a sorted list, or a regex string.
        target_parameters: The config's ``target_parameters`` (LoRA on parameters), if any.
        modules_to_save: Modules saved whole next to the adapter, if any.
        base_model_name_or_path: The base model the adapter was trained on, as recorded.
        inference_mode: The config's ``inference_mode`` as saved (PEFT overrides it when loading).
        weight_files: Every weights file present, safetensors first.
        weights_format: The format a safe_lora loader would read (safetensors preferred).
        tensor_count: Tensors in the safetensors file.
        parameter_count: Elements in all of them.
        tensor_bytes: Bytes of tensor data, from dtypes and shapes.
        dtypes: Tensor count per safetensors dtype, e.g. ``{"F32": 2}``.
        findings: Errors first, then warnings, then infos.

    Example:
        >>> report = inspect_adapter("out/my-adapter")  # doctest: +SKIP
        >>> report.loads_safely, report.dropout  # doctest: +SKIP
        (True, {'lora_dropout': 0.1})
    """

    path: Path
    peft_type: str | None = None
    task_type: str | None = None
    rank: int | None = None
    alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool | None = None
    weight_files: list[WeightFile] = field(default_factory=list)
    weights_format: WeightsFormat | None = None
    tensor_count: int | None = None
    parameter_count: int | None = None
    tensor_bytes: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def loads_safely(self) -> bool:
        """Whether safe_lora's loaders would accept the folder: no finding of severity ``"error"``."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity ``"error"``: why the folder would not load."""
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, ``path`` as a string, plus ``loads_safely``.

        Example:
            >>> json.dumps(inspect_adapter("out/my-adapter").to_dict())  # doctest: +SKIP
        """
        return {
            "path": os.fspath(self.path),
            "loads_safely": self.loads_safely,
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "dropout": dict(self.dropout),
            "target_modules": (
                list(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
            ),
            "target_parameters": None if self.target_parameters is None else list(self.target_parameters),
            "modules_to_save": None if self.modules_to_save is None else list(self.modules_to_save),
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": self.inference_mode,
            "weight_files": [w.to_dict() for w in self.weight_files],
            "weights_format": self.weights_format,
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "tensor_bytes": self.tensor_bytes,
            "dtypes": dict(self.dtypes),
            "findings": [f.to_dict() for f in self.findings],
        }


def inspect_adapter(
    adapter: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    check_values: bool = True,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
) -> AdapterReport:
    """Report what an adapter folder holds and whether safe_lora would load it, without a base model.

    Nothing is unpickled and no model is built. Sizes, keys and shapes come from the safetensors
    header; with ``check_values`` the tensors are also scanned for NaN/inf, one memory-mapped tensor
    at a time (the loaders refuse non-finite weights).

    Args:
        adapter: A folder written by ``save_pretrained``, or a hub repo id. From a hub repo only what
            the loaders would fetch is downloaded: ``adapter_config.json`` and
            ``adapter_model.safetensors`` (a pickle-only repo's ``adapter_model.bin`` never: its size
            comes from the hub's file listing).
        allow_pickle: Judge a folder with only ``adapter_model.bin`` as a loader called with
            ``allow_pickle=True`` would (a warning instead of an error). The pickle is never opened.
        check_values: Scan the tensors for NaN/inf; ``False`` reads the header only.
        subfolder: The adapter's folder inside ``adapter``, as the loaders take it.
        revision: With a hub repo id, the branch, tag or commit to inspect.
        token: With a hub repo id, the token for a gated or private repo.
        cache_dir: With a hub repo id, the Hugging Face cache to use.
        force_download: With a hub repo id, download again even when cached.

    Returns:
        The report; ``report.loads_safely`` is false when a finding has severity ``"error"``.

    Raises:
        AdapterNotFoundError: The folder (or repo, revision) does not exist or holds no
            ``adapter_config.json``.
        AdapterAccessError: The hub refused the repo (gated or private: pass ``token=``).

    Example:
        >>> report = inspect_adapter("out/my-adapter")  # doctest: +SKIP
        >>> [f.code for f in report.findings]  # doctest: +SKIP
        ['live-dropout']
    """
    location = open_adapter(
        adapter,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
    )
    folder = location.folder
    # A pickle-only adapter is reported as a finding here, not raised; its pickle is never fetched.
    sizes, weights_format = location.weight_sizes, location.weights_format
    weights = location.fetch(SAFETENSORS_NAME) if weights_format == "safetensors" else None
    files = AdapterFiles(folder, weights, weights_format)
    fields: dict[str, Any] = {}
    # A FIFO, a directory or a link to a device where a file should be: reported, never opened.
    special = {
        name: kind
        for name in (CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME)
        if (kind := special_file(folder / name)) not in (None, "missing")
    }
    findings = [
        Finding(
            "error",
            "not-a-file",
            f"Not a regular file: {os.fspath(folder / name)!r} is {kind} — expected the file "
            f"save_pretrained writes; the loaders refuse it without reading — replace it with the "
            f"adapter's real {name}.",
        )
        for name, kind in special.items()
    ]

    config = None if CONFIG_NAME in special else _read_config(folder / CONFIG_NAME, findings)
    if config is not None:
        fields.update(_config_fields(config))
        findings.extend(_config_findings(config, fields))

    weight_files, file_findings = _weight_files(files, sizes, allow_pickle=allow_pickle)
    findings.extend(file_findings)

    if files.weights is not None and weights_format == "safetensors" and SAFETENSORS_NAME not in special:
        path = files.weights
        try:
            header = read_header(path)
        except AdapterWeightsError as exc:
            findings.append(Finding("error", "weights-corrupt", str(exc)))
        else:
            fields.update(_header_fields(header))
            findings.extend(_header_findings(header, config, path, check_values=check_values))

    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order[f.severity])  # stable: codes keep their discovery order
    return AdapterReport(
        path=folder, weight_files=weight_files, weights_format=weights_format, findings=findings, **fields
    )


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _read_config(path: Path, findings: list[Finding]) -> PeftConfig | None:
    """The config as the loaders read it, each refusal turned into a finding with the loaders' message.

    Fields unknown to the installed PEFT are reported, and the report still describes the config
    PEFT would build without them; a config with non-finite numbers is not described (its numbers
    could not be printed as JSON).
    """
    try:
        raw = read_config_json(path)
    except AdapterConfigError as exc:
        findings.append(Finding("error", "config-invalid", str(exc)))
        return None
    nonfinite = nonfinite_fields(raw)
    if nonfinite:
        findings.append(Finding("error", "config-nonfinite", nonfinite_message(path, nonfinite)))
        return None
    try:
        parsed = parse_config(raw, path=path)
    except AdapterConfigError as exc:
        findings.append(Finding("error", "config-invalid", str(exc)))
        return None
    if parsed.refused:
        findings.append(Finding("error", "config-unknown-fields", parsed.unknown_message(path)))
    if parsed.ignored:
        findings.append(Finding("warning", "config-ignored-fields", parsed.ignored_message(path)))
    return parsed.config


def _enum_value(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _config_fields(config: PeftConfig) -> dict[str, Any]:
    rank = getattr(config, "r", None)
    alpha = getattr(config, "lora_alpha", getattr(config, "alpha", None))
    targets = getattr(config, "target_modules", None)
    target_parameters = getattr(config, "target_parameters", None)
    modules_to_save = getattr(config, "modules_to_save", None)
    return {
        "peft_type": _enum_value(config.peft_type),
        "task_type": _enum_value(config.task_type),
        "rank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        "alpha": float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
        "rank_pattern": dict(getattr(config, "rank_pattern", None) or {}),
        "alpha_pattern": dict(getattr(config, "alpha_pattern", None) or {}),
        "dropout": dropout_rates(config),
        # PEFT turns a target list into a set; a sorted list reads (and serialises) reproducibly.
        "target_modules": targets if targets is None or isinstance(targets, str) else sorted(targets),
        "target_parameters": None if target_parameters is None else sorted(target_parameters),
        "modules_to_save": None if modules_to_save is None else sorted(modules_to_save),
        "base_model_name_or_path": getattr(config, "base_model_name_or_path", None) or None,
        "inference_mode": bool(config.inference_mode),
    }


def _config_findings(config: PeftConfig, fields: dict[str, Any]) -> list[Finding]:
    findings = []
    live = {name: rate for name, rate in fields["dropout"].items() if rate > 0}
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
    if fields["base_model_name_or_path"] is None:
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
# Weight files
# --------------------------------------------------------------------------------------------------


def _weight_files(
    files: AdapterFiles, sizes: dict[str, int | None], *, allow_pickle: bool
) -> tuple[list[WeightFile], list[Finding]]:
    """The weight files of the adapter with their sizes, and what their layout means for loading.

    ``sizes`` holds every weights file the adapter has, downloaded or not (a hub repo's pickle is
    never fetched). Which file the loaders would pick is ``locate_adapter``'s answer; this only
    describes it.
    """
    layout: tuple[tuple[str, WeightsFormat], ...] = (
        (SAFETENSORS_NAME, "safetensors"),
        (PICKLE_NAME, "pickle"),
    )
    # A special file (a FIFO, a directory, ...) where a weights file should be is listed by the
    # "not-a-file" finding instead; a hub file not downloaded has its size from the hub's listing.
    present = [
        WeightFile(name, fmt, sizes[name] or 0)
        for name, fmt in layout
        if name in sizes and special_file(files.folder / name) in (None, "missing")
    ]
    if files.weights is not None and special_file(files.weights) is not None:
        return present, []  # the "not-a-file" finding says what is wrong with it
    pickle = next((f for f in present if f.format == "pickle"), None)
    if files.weights_format == "safetensors":
        if pickle is None:
            return present, []
        finding = Finding(
            "warning",
            "pickle-present",
            f"Pickle file present: {PICKLE_NAME} ({pickle.size_bytes} bytes) sits next to "
            f"{SAFETENSORS_NAME}. safe_lora loads the safetensors file and never unpickles, and this "
            f"report did not open the pickle — but a tool that prefers .bin files would run whatever "
            f"code it holds — delete it unless you trust its source.",
        )
        return present, [finding]
    if pickle is not None:
        if allow_pickle:
            finding = Finding(
                "warning",
                "pickle-only",
                f"Pickle weights only: {PICKLE_NAME} ({pickle.size_bytes} bytes) and no {SAFETENSORS_NAME}. "
                f"With allow_pickle=True it is loaded with torch.load(weights_only=True); its contents "
                f"were not inspected (unpickling can run code) — prefer a safetensors copy.",
            )
        else:
            finding = Finding(
                "error",
                "pickle-only",
                f"Pickle weights only: expected {SAFETENSORS_NAME}, found only {PICKLE_NAME} "
                f"({pickle.size_bytes} bytes), which safe_lora refuses because unpickling can run "
                f"arbitrary code (its contents were not inspected) — ask for a safetensors copy, "
                f"re-save it with save_pretrained(safe_serialization=True), or pass allow_pickle=True "
                f"(--allow-pickle) if you trust its source.",
            )
        return present, [finding]
    finding = Finding(
        "error",
        "weights-missing",
        f"Adapter weights missing: expected {SAFETENSORS_NAME} in {os.fspath(files.folder)!r}, found "
        f"neither it nor {PICKLE_NAME} — re-save the adapter with save_pretrained, or copy its weights "
        f"file too.",
    )
    return present, [finding]


# --------------------------------------------------------------------------------------------------
# Header and keys
# --------------------------------------------------------------------------------------------------


def _header_fields(header: dict[str, HeaderEntry]) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    parameters = 0
    data_bytes = 0
    for entry in header.values():
        count = math.prod(entry.shape)
        parameters += count
        bits = _DTYPE_BITS.get(entry.dtype.upper())
        if bits is None:  # a dtype newer than this table: fall back to the widest element
            bits = 64
        data_bytes += math.ceil(count * bits / 8)
        dtypes[entry.dtype] = dtypes.get(entry.dtype, 0) + 1
    return {
        "tensor_count": len(header),
        "parameter_count": parameters,
        "tensor_bytes": data_bytes,
        "dtypes": dict(sorted(dtypes.items())),
    }


def _header_findings(
    header: dict[str, HeaderEntry], config: PeftConfig | None, path: Path, *, check_values: bool
) -> list[Finding]:
    where = os.fspath(path)
    if not header:
        return [
            Finding(
                "error",
                "no-tensors",
                f"Adapter weights empty: expected the adapter's tensors in {where!r}, found none — "
                f"re-save the adapter with save_pretrained.",
            )
        ]
    findings = [] if config is None else _key_findings(header, config, where)
    bad_dtypes = {} if config is None else wrong_dtypes(config, header)
    if bad_dtypes:
        findings.append(Finding("error", "wrong-dtype", dtype_message(path, bad_dtypes), tuple(bad_dtypes)))
    if check_values:
        try:
            check_finite(path, iter_tensors(path))
        except AdapterWeightsError as exc:  # the loaders' own verdict and message
            code = "nonfinite" if exc.nonfinite_keys else "weights-corrupt"
            findings.append(Finding("error", code, str(exc), tuple(exc.nonfinite_keys)))
        else:
            findings.extend(_noop_findings(path, config))
    return findings


def _noop_findings(path: Path, config: PeftConfig | None) -> list[Finding]:
    """A warning when every output factor is zero: the loaders warn the same (NoOpAdapterWarning)."""
    if config is None:
        return []
    try:
        with lazy_tensors(path) as tensors:
            noop = noop_adapter(config, tensors)
    except AdapterWeightsError as exc:
        return [Finding("error", "weights-corrupt", str(exc))]
    if not noop:
        return []
    return [Finding("warning", "noop-adapter", noop_message(config, f"Adapter {os.fspath(path.parent)!r}"))]


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
    # PEFT's own matcher (exclude_modules, layers_to_transform, regex strings, suffixes); an excluded
    # module comes back as a falsy marker object.
    return bool(check_target_module_exists(config, module_path))


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
    if _enum_value(config.peft_type) != "LORA" or not isinstance(rank, int):
        return None
    if getattr(config, "target_parameters", None):  # LoRA on parameters: rank * num_experts
        return None
    if getattr(config, "use_bdlora", None):  # block-diagonal factors have other shapes
        return None
    return rank


def _scan_keys(
    header: dict[str, HeaderEntry], config: PeftConfig, names: frozenset[str], prefix: str
) -> _KeyScan:
    scan = _KeyScan()
    is_lora = _enum_value(config.peft_type) in _LORA_TYPES
    rank = _expected_rank(config)
    rank_pattern: dict[str, int] = dict(getattr(config, "rank_pattern", None) or {})
    for key, entry in header.items():
        if not key.startswith(_MODEL_PREFIX):
            if not key.startswith(_TUNER_PREFIX):
                scan.unexplained.append(key)
            # else: a tensor shared by all layers, held by the tuner itself (VeRA's vera_A / vera_B).
            continue
        parts = key[len(_MODEL_PREFIX) :].split(".")
        index = next((i for i, part in enumerate(parts) if part in names), None)
        if index is None:
            if any(part.startswith(prefix) for part in parts):
                scan.unknown_names.append(key)
            elif not _explained_extra(config, parts):
                scan.unexplained.append(key)
            continue
        module_path = _module_path(parts[:index])
        if _matches_targets(config, module_path) is False:
            scan.off_target.append(key)
            continue
        factor = parts[index]
        if not (is_lora and factor in _RANK_DIM):
            continue
        scan.factors.setdefault(module_path, set()).add(factor)
        # The factor's weight: "lora_A.weight", or the parameter itself ("lora_embedding_A"), not a bias.
        is_weight = parts[index + 1 :] in ([], ["weight"])
        if rank is not None and is_weight and len(entry.shape) >= 2:
            expected = rank_pattern.get(get_pattern_key(list(rank_pattern), module_path), rank)
            found = entry.shape[_RANK_DIM[factor]]
            if found != expected:
                scan.rank_errors[key] = (found, expected)
    return scan


def _key_findings(header: dict[str, HeaderEntry], config: PeftConfig, where: str) -> list[Finding]:
    peft_type = _enum_value(config.peft_type) or ""
    if config.is_prompt_learning:
        unknown = sorted(set(header) - _PROMPT_KEYS)
        if not unknown:
            return []
        return [
            Finding(
                "error",
                "unknown-keys",
                f"Keys do not fit the {peft_type} config in {where!r}: expected only "
                f"{sorted(_PROMPT_KEYS)}, found {_fmt_keys(unknown)} — re-save the adapter with "
                f"save_pretrained.",
                tuple(unknown),
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

    scan = _scan_keys(header, config, names, prefix)
    findings = []
    if scan.off_target:
        targets = getattr(config, "target_modules", None)
        shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        findings.append(
            Finding(
                "error",
                "keys-off-target",
                f"Keys do not fit the config in {where!r}: expected adapter tensors only on modules that "
                f"target_modules={shown!r} selects, found {len(scan.off_target)} elsewhere: "
                f"{_fmt_keys(scan.off_target)} — the config and the weights come from different adapters; "
                f"re-save the adapter, or fix 'target_modules'.",
                tuple(sorted(scan.off_target)),
            )
        )
    if scan.rank_errors:
        detail = "; ".join(f"{k}: rank {found}" for k, (found, _) in sorted(scan.rank_errors.items()))
        rank_pattern = getattr(config, "rank_pattern", None)
        expected = f"r={getattr(config, 'r', None)}" + (
            f" (rank_pattern {rank_pattern})" if rank_pattern else ""
        )
        findings.append(
            Finding(
                "error",
                "rank-mismatch",
                f"LoRA rank does not fit the config in {where!r}: expected {expected}, found "
                f"{detail} — the config and the weights come from different adapters; re-save the "
                f"adapter, or fix 'r' / 'rank_pattern'.",
                tuple(sorted(scan.rank_errors)),
            )
        )
    incomplete = sorted(
        f"{module} has {have} without {other}"
        for module, present in scan.factors.items()
        for pair in _PAIRS
        for have, other in (pair, pair[::-1])
        if have in present and other not in present
    )
    if incomplete:
        findings.append(
            Finding(
                "error",
                "incomplete-lora-pair",
                f"LoRA factors incomplete in {where!r}: expected lora_A and lora_B for every targeted "
                f"module, found {_fmt_keys(incomplete)} — the file is partial; re-save the adapter.",
            )
        )
    if scan.unknown_names:
        known = sorted(n for n in names if n.startswith(prefix))
        findings.append(
            Finding(
                "error",
                "unknown-parameter",
                f"Unknown adapter parameter names in {where!r}: expected peft's {peft_type} names "
                f"{known}, found {_fmt_keys(scan.unknown_names)} — the adapter comes from another tool "
                f"or a newer peft; re-save it with save_pretrained, or upgrade peft.",
                tuple(sorted(scan.unknown_names)),
            )
        )
    if scan.unexplained:
        findings.append(
            Finding(
                "error",
                "unknown-keys",
                f"Keys do not fit the config in {where!r}: expected adapter tensors "
                f"('base_model.model.<module>.{prefix}...') or modules_to_save, found "
                f"{len(scan.unexplained)} other tensor(s): {_fmt_keys(scan.unexplained)} — re-save the "
                f"adapter with save_pretrained, or list those modules in 'modules_to_save'.",
                tuple(sorted(scan.unexplained)),
            )
        )
    return findings
