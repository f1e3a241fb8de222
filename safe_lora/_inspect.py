"""What is in an adapter, and would it load safely? The loaders' own verdict, every finding listed.

:func:`inspect_adapter` runs the checks the loaders run (:func:`safe_lora._checks.read_adapter`),
lists every finding instead of raising the first, and describes the adapter. With ``base_model=`` it
also runs the loaders' check against that model -- PEFT's injection on the meta device, compared with
the weights file (:func:`safe_lora._attach.inject_checked`) -- and undoes it, so that
``report.loads_safely`` is exactly "the loader would accept it". A base given as a folder or hub id is
built from its ``config.json`` on the meta device: no base weights are downloaded or allocated. A pickle
is opened only with ``allow_pickle=True``, as the loaders open it (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig
from torch import nn

from safe_lora._attach import AttachOptions, inject_checked, prepare_for_model
from safe_lora._checks import (
    AdapterOnDisk,
    DiskOptions,
    Finding,
    config_findings,
    read_adapter,
    sort_findings,
)
from safe_lora._config import dropout_rates, prepared_copy
from safe_lora._fit import evidence_findings
from safe_lora._meta import on_meta
from safe_lora._peft import TASK_CLASSES
from safe_lora._rollback import Snapshot
from safe_lora._source import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME, WeightsFormat, open_source
from safe_lora._unwrap import unwrap
from safe_lora.errors import SafeLoraError

__all__ = ["AdapterReport", "Finding", "WeightFile", "inspect_adapter"]


@dataclass(frozen=True)
class WeightFile:
    """One weights file of the adapter.

    Attributes:
        name: The file name, e.g. ``"adapter_model.safetensors"``.
        format: ``"safetensors"`` or ``"pickle"``.
        size_bytes: The file's size (for a hub file not downloaded, from the hub's listing).
    """

    name: str
    format: WeightsFormat
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {"name": self.name, "format": self.format, "size_bytes": self.size_bytes}


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`inspect_adapter` found in an adapter.

    Config fields are ``None`` when the config cannot be read (a ``"config-invalid"`` finding says
    why); tensor fields are ``None`` when there is no readable weights file.

    Attributes:
        path: The folder inspected (for a hub repo, the folder of its files in the local cache).
        source: What was asked for: the path, or the hub repo id.
        commit: The hub commit the files came from (``None`` for a local folder).
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
        sha256: ``{file name: sha256}`` of every file read (the bytes that were judged).
        tensor_count: Tensors in the weights file.
        parameter_count: Elements in all of them.
        tensor_bytes: Bytes of tensor data.
        dtypes: Tensor count per dtype (safetensors spelling), e.g. ``{"F32": 2}``.
        checked_against: The base model the verdict includes (``None``: checked without one).
        findings: Errors first, then warnings, then infos.

    Example:
        >>> report = inspect_adapter("out/my-adapter")  # doctest: +SKIP
        >>> report.loads_safely, report.dropout  # doctest: +SKIP
        (True, {'lora_dropout': 0.1})
    """

    path: Path
    source: str = ""
    commit: str | None = None
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
    sha256: dict[str, str] = field(default_factory=dict)
    tensor_count: int | None = None
    parameter_count: int | None = None
    tensor_bytes: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    checked_against: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def loads_safely(self) -> bool:
        """Whether safe_lora's loaders would accept the adapter: no finding of severity ``"error"``."""
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity ``"error"``: why the adapter would not load."""
        return [f for f in self.findings if f.severity == "error"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field, ``path`` as a string, plus ``loads_safely``.

        Example:
            >>> json.dumps(inspect_adapter("out/my-adapter").to_dict())  # doctest: +SKIP
        """
        return {
            "path": os.fspath(self.path),
            "source": self.source,
            "commit": self.commit,
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
            "sha256": dict(self.sha256),
            "tensor_count": self.tensor_count,
            "parameter_count": self.parameter_count,
            "tensor_bytes": self.tensor_bytes,
            "dtypes": dict(self.dtypes),
            "checked_against": self.checked_against,
            "findings": [f.to_dict() for f in self.findings],
        }


BaseModel = nn.Module | str | os.PathLike[str]


def inspect_adapter(
    adapter: str | os.PathLike[str],
    *,
    base_model: BaseModel | None = None,
    allow_pickle: bool = False,
    check_values: bool = True,
    strict: bool = True,
    expected_sha256: str | dict[str, str] | None = None,
    signed_by: Any = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
) -> AdapterReport:
    """Report what an adapter holds and whether safe_lora's loaders would accept it.

    The same checks as the loaders, in the same code, so the verdicts cannot drift: every finding is
    listed instead of the first raised. Without ``base_model`` every check that needs no model runs
    (the files, digests and signature, the config, the weights and their values, the keys against the
    config -- a shape-``[0]`` tensor or a rank that contradicts the config is refused either way). With
    ``base_model`` the loaders' check against that model runs too -- PEFT's own injection on the meta
    device, every key, shape and dtype compared with the file -- and is undone: the model is left
    exactly as it was, and ``loads_safely`` is exactly whether ``load_for_inference(base_model,
    adapter)`` would accept it. Nothing is unpickled.

    Args:
        adapter: A folder written by ``save_pretrained``, or a hub repo id. From a hub repo only what
            the loaders would fetch is downloaded: ``adapter_config.json`` and
            ``adapter_model.safetensors`` (a pickle-only repo's ``adapter_model.bin`` never).
        base_model: The model to check against: an ``nn.Module``, or the folder / hub id of a base
            model, whose ``config.json`` alone is read and built on the meta device (nothing else is
            downloaded, nothing allocated).
        allow_pickle: Judge a pickle-only adapter as a loader called with ``allow_pickle=True`` would: a
            warning instead of an error, and the pickle read as the loaders read it
            (``torch.load(weights_only=True)``, which builds tensors only). Without it a pickle is never
            opened.
        check_values: Scan the tensors for NaN/inf and for an all-zero (no-op) adapter.
        strict: Judge missing or unexpected keys as a loader with this ``strict`` would.
        expected_sha256: Pinned digests, as the loaders take them.
        signed_by: A required signature, as the loaders take it.
        subfolder: The adapter's folder inside ``adapter``, as the loaders take it.
        revision: With a hub repo id, the branch, tag or commit to inspect.
        token: With a hub repo id, the token for a gated or private repo.
        cache_dir: With a hub repo id, the Hugging Face cache to use.
        force_download: With a hub repo id, download again even when cached.

    Returns:
        The report; ``report.loads_safely`` is false when a finding has severity ``"error"``.

    Raises:
        AdapterNotFoundError: The folder (or repo, revision) does not exist or holds no
            ``adapter_config.json``; a base model's folder or repo without ``config.json``.
        AdapterAccessError: The hub refused the repo (gated or private: pass ``token=``).

    Example:
        >>> report = inspect_adapter("out/my-adapter", base_model="meta-llama/Llama-3.2-1B")  # doctest: +SKIP
        >>> report.loads_safely, [f.code for f in report.findings]  # doctest: +SKIP
        (True, ['live-dropout'])
    """
    source = open_source(
        adapter,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        force_download=force_download,
    )
    found = read_adapter(
        source,
        DiskOptions(
            allow_pickle=allow_pickle,
            strict=strict,
            check_values=check_values,
            key_rules=base_model is None,
            expected_sha256=expected_sha256,
            signed_by=signed_by,
            exhaustive=True,
            # A pickle is opened only when the caller allows it, as the loaders would open it
            # (torch.load(weights_only=True)): then the verdict is theirs too.
            unpickle=allow_pickle,
        ),
    )
    findings = list(found.findings)
    if found.config is not None:
        findings += config_findings(found.config)
    checked_against = None
    if base_model is not None and found.ok and found.config is not None and found.weights is not None:
        model, checked_against = _base(base_model, found.config, token=token, cache_dir=cache_dir)
        findings += _check_against(model, found, found.config, strict=strict)
    return _report(found, sort_findings(findings), checked_against)


def _check_against(
    model: nn.Module, found: AdapterOnDisk, config: PeftConfig, *, strict: bool
) -> list[Finding]:
    """The loaders' check against ``model`` (:func:`safe_lora._attach.inject_checked`), undone."""
    target = unwrap(model)
    snapshot = Snapshot(target)
    findings: list[Finding] = []  # a pattern refused by prepare_for_model comes before the evidence
    try:
        prepared = prepare_for_model(
            prepared_copy(config, dropout=0.0, inference_mode=True),
            target,
            where=found.source.where(CONFIG_NAME),
        )
        findings = evidence_findings(target, config, found.header, name="default")
        injected = inject_checked(
            target,
            found,
            prepared,
            name="default",
            training=False,
            strict=strict,
            options=AttachOptions(),
            snapshot=snapshot,
        )
        return findings + injected.findings
    except SafeLoraError as exc:
        return [*findings, Finding.refusal(_code(exc), exc)]
    finally:
        snapshot.restore()


def _code(exc: SafeLoraError) -> str:
    from safe_lora.errors import AdapterWeightsError

    if isinstance(exc, AdapterWeightsError):
        if exc.mismatched_keys:
            return "shape-mismatch"
        if exc.wrong_dtypes:
            return "wrong-dtype"
        return "missing-keys" if exc.missing_keys else "unexpected-keys"
    return "does-not-fit"


def _base(
    base_model: BaseModel, config: PeftConfig, *, token: str | bool | None, cache_dir: Any
) -> tuple[nn.Module, str]:
    """The model to check against: the module given, or one built on the meta device from a config."""
    if isinstance(base_model, nn.Module):
        return base_model, type(unwrap(base_model)).__name__
    if not isinstance(base_model, (str, os.PathLike)):
        raise TypeError(
            f"base_model= must be an nn.Module, or the folder or hub id of a base model, found "
            f"{type(base_model).__name__}."
        )
    import transformers

    name = os.fspath(base_model)
    model_config = _model_config(name, token=token, cache_dir=cache_dir)
    task = getattr(config.task_type, "value", config.task_type)
    cls: Any = getattr(transformers, TASK_CLASSES.get(str(task), "AutoModel"))
    with on_meta():
        model = cls.from_config(model_config)
    model.config.name_or_path = name
    model.name_or_path = name
    return model.eval(), name


def _model_config(name: str, *, token: str | bool | None, cache_dir: Any) -> Any:
    """A base model's ``config.json`` only, from a folder or the hub (no weights, no code)."""
    import transformers

    from safe_lora.errors import AdapterNotFoundError

    try:
        return transformers.AutoConfig.from_pretrained(
            name, token=token, cache_dir=cache_dir, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise AdapterNotFoundError(
            f"Base model config not found: {name!r} ({type(exc).__name__}: {first_line}) "
            f"— expected a folder or hub repo holding the base model's config.json — check base_model=.",
            path=name,
        ) from exc


def _report(found: AdapterOnDisk, findings: list[Finding], checked_against: str | None) -> AdapterReport:
    source = found.source
    fields: dict[str, Any] = {}
    if found.config is not None:
        fields.update(_config_fields(found.config))
    if found.weights is not None:
        dtypes: dict[str, int] = {}
        parameters = 0
        for info in found.weights.header.values():
            count = 1
            for dim in info.shape:
                count *= dim
            parameters += count
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + 1
        fields.update(
            tensor_count=len(found.weights.header),
            parameter_count=parameters,
            tensor_bytes=found.weights.nbytes,
            dtypes=dict(sorted(dtypes.items())),
        )
    layout: tuple[tuple[str, WeightsFormat], ...] = (
        (SAFETENSORS_NAME, "safetensors"),
        (PICKLE_NAME, "pickle"),
    )
    weight_files = [
        WeightFile(name, fmt, source.present.get(name) or 0)
        for name, fmt in layout
        if name in source.present and source.kind(name) is None
    ]
    path = source.folder if source.folder is not None else Path(source.where(CONFIG_NAME)).parent
    config_file = found.files.get(CONFIG_NAME)
    if source.hub is not None and config_file is not None:
        path = config_file.path.parent
    return AdapterReport(
        path=path,
        source=source.name,
        commit=source.commit,
        weight_files=weight_files,
        weights_format=source.weights_format,
        sha256={name: file.sha256 for name, file in sorted(found.files.items())},
        checked_against=checked_against,
        findings=findings,
        **fields,
    )


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
