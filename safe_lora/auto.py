"""One call from an adapter to a loaded model, as ``peft.AutoPeftModelFor*`` does -- checked first.

``AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=..., device_map=...)`` reads the adapter's
config, downloads and loads the (often multi-GB) base model it names, and only then finds out
whether the adapter is usable. :func:`for_inference` and :func:`for_training` find the adapter,
fetch its two files (``adapter_config.json``, then ``adapter_model.safetensors``) and check them on
disk -- config, safetensors header, NaN/inf -- *before* the base is loaded, so a broken adapter never
costs a base download. Then the base is loaded as PEFT's Auto classes load it, and the adapter with
:func:`~safe_lora.load_for_inference` / :func:`~safe_lora.load_for_training` and all their guarantees.

Example:
    >>> from safe_lora import auto
    >>> model = auto.for_inference("org/my-adapter", dtype=torch.bfloat16)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from peft import PeftConfig, PeftModel
from torch import nn

from safe_lora._config import AdapterFiles, locate_adapter, prepared_copy
from safe_lora._loading import load_for_inference, load_for_training, read_checked_weights
from safe_lora._validate import HeaderEntry
from safe_lora.errors import AdapterConfigError

__all__ = ["for_inference", "for_training"]

# The transformers Auto class PEFT's AutoPeftModelFor* picks for each task type (peft/auto.py).
_TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_SAVED_PREFIX = "base_model.model."

AdapterSource = str | os.PathLike[str]


@dataclass(frozen=True)
class _Checked:
    """An adapter fetched and checked on disk: its files, config and safetensors header."""

    files: AdapterFiles
    config: PeftConfig
    header: dict[str, HeaderEntry]


@overload
def for_inference(
    adapter: AdapterSource,
    *,
    base_model: AdapterSource | None = ...,
    model_class: Any = ...,
    adapter_name: str = ...,
    dropout: float | None = ...,
    merge: Literal[False] = ...,
    strict: bool = ...,
    allow_pickle: bool = ...,
    revision: str | None = ...,
    subfolder: str | None = ...,
    token: str | bool | None = ...,
    cache_dir: str | os.PathLike[str] | None = ...,
    **base_kwargs: Any,
) -> PeftModel: ...
@overload
def for_inference(
    adapter: AdapterSource,
    *,
    base_model: AdapterSource | None = ...,
    model_class: Any = ...,
    adapter_name: str = ...,
    dropout: float | None = ...,
    merge: Literal[True],
    strict: bool = ...,
    allow_pickle: bool = ...,
    revision: str | None = ...,
    subfolder: str | None = ...,
    token: str | bool | None = ...,
    cache_dir: str | os.PathLike[str] | None = ...,
    **base_kwargs: Any,
) -> nn.Module: ...
def for_inference(
    adapter: AdapterSource,
    *,
    base_model: AdapterSource | None = None,
    model_class: Any = None,
    adapter_name: str = "default",
    dropout: float | None = 0.0,
    merge: bool = False,
    strict: bool = True,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **base_kwargs: Any,
) -> nn.Module:
    """Load the base model an adapter names, then the adapter for inference -- the adapter checked first.

    The safe ``AutoPeftModelForCausalLM.from_pretrained(adapter).eval()`` (and its siblings for the
    other task types).

    Args:
        adapter: A folder written by ``save_pretrained``, or a hub repo id.
        base_model: The base's id or folder; default: the adapter config's ``base_model_name_or_path``.
        model_class: The class whose ``from_pretrained`` loads the base (e.g.
            ``transformers.AutoModelForCausalLM``); default: the one PEFT's Auto classes choose for
            the config's ``task_type``.
        adapter_name: The adapter's name inside the ``PeftModel``.
        dropout: As for :func:`~safe_lora.load_for_inference`: ``0.0`` removes every adapter dropout.
        merge: Return the base model with the adapter merged into its weights.
        strict: Refuse missing or unexpected adapter keys.
        allow_pickle: Allow ``adapter_model.bin`` when there is no safetensors file.
        revision: The adapter's revision. The base is loaded at the revision the adapter config
            records (its ``revision`` field), as PEFT does.
        subfolder: The adapter's folder inside ``adapter``.
        token: For the hub: used for the adapter and for the base.
        cache_dir: The Hugging Face cache, for the adapter and for the base.
        **base_kwargs: Passed to the base's ``from_pretrained``: ``dtype``, ``device_map``,
            ``quantization_config``, ``trust_remote_code``, ``attn_implementation``, ...

    Returns:
        What :func:`~safe_lora.load_for_inference` returns: the ``PeftModel`` in eval mode with every
        parameter frozen, or with ``merge=True`` the merged transformers model.

    Raises:
        AdapterNotFoundError: The adapter (folder, repo, revision, config or weights) does not exist.
        AdapterAccessError: The hub refused the adapter (pass ``token=``).
        AdapterConfigError: The config is broken, or names no base model / task type to load it with.
        AdapterWeightsError: The weights are unreadable or hold NaN/inf -- found before the base loads.
        UnsafeAdapterError: Only pickle weights exist and ``allow_pickle`` is false.

    Example:
        >>> model = auto.for_inference("org/my-adapter", dtype=torch.bfloat16, device_map="auto")
        ... # doctest: +SKIP
    """
    checked = _check_adapter(
        adapter,
        training=False,
        dropout=dropout,
        allow_pickle=allow_pickle,
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
    )
    base = _load_base(checked, base_model, model_class, token=token, cache_dir=cache_dir, kwargs=base_kwargs)
    folder = checked.files.folder  # already fetched and checked: the loader reads it from local disk
    if merge:
        return load_for_inference(
            base,
            folder,
            adapter_name=adapter_name,
            dropout=dropout,
            merge=True,
            strict=strict,
            allow_pickle=allow_pickle,
        )
    return load_for_inference(
        base, folder, adapter_name=adapter_name, dropout=dropout, strict=strict, allow_pickle=allow_pickle
    )


def for_training(
    adapter: AdapterSource,
    *,
    base_model: AdapterSource | None = None,
    model_class: Any = None,
    adapter_name: str = "default",
    dropout: float | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **base_kwargs: Any,
) -> PeftModel:
    """Load the base model an adapter names, then the adapter for more training -- the adapter checked first.

    The safe ``AutoPeftModelForCausalLM.from_pretrained(adapter, is_trainable=True)``. Arguments as for
    :func:`for_inference`; ``dropout`` (default ``None``: keep the saved rates) as for
    :func:`~safe_lora.load_for_training`.

    Returns:
        What :func:`~safe_lora.load_for_training` returns: the ``PeftModel`` in train mode, the
        adapter trainable and the base frozen.

    Raises:
        AdapterNotFoundError, AdapterAccessError, AdapterConfigError, AdapterWeightsError,
        UnsafeAdapterError: As for :func:`for_inference`, before the base is loaded.

    Example:
        >>> model = auto.for_training("out/checkpoint-500", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    checked = _check_adapter(
        adapter,
        training=True,
        dropout=dropout,
        allow_pickle=allow_pickle,
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
    )
    base = _load_base(checked, base_model, model_class, token=token, cache_dir=cache_dir, kwargs=base_kwargs)
    return load_for_training(
        base,
        checked.files.folder,
        adapter_name=adapter_name,
        dropout=dropout,
        strict=strict,
        allow_pickle=allow_pickle,
    )


def _check_adapter(
    adapter: AdapterSource,
    *,
    training: bool,
    dropout: float | None,
    allow_pickle: bool,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
) -> _Checked:
    """Everything the loaders check on disk, done before the base model is loaded."""
    files, config = locate_adapter(
        adapter,
        allow_pickle=allow_pickle,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
    )
    prepared_copy(config, dropout=dropout, inference_mode=not training)  # an invalid dropout raises here
    _, header, _ = read_checked_weights(files, config, training=training, instead="auto.for_inference")
    return _Checked(files, config, header)


def _load_base(
    checked: _Checked,
    base_model: AdapterSource | None,
    model_class: Any,
    *,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """The base model, loaded as PEFT's ``AutoPeftModelFor*.from_pretrained`` loads it."""
    config, folder = checked.config, checked.files.folder
    base_id = os.fspath(base_model) if base_model is not None else config.base_model_name_or_path
    if not base_id:
        raise AdapterConfigError(
            f"Adapter config records no base model in {os.fspath(folder)!r}: expected "
            f"'base_model_name_or_path' — pass base_model= (the id or folder of the base it was trained on).",
            path=folder,
        )
    cls = model_class if model_class is not None else _auto_class(config, folder)
    kwargs = dict(kwargs)
    if base_model is None and getattr(config, "revision", None):
        kwargs.setdefault("revision", config.revision)  # the base revision the adapter records, as PEFT
    if token is not None:
        kwargs.setdefault("token", token)
    if cache_dir is not None:
        kwargs.setdefault("cache_dir", cache_dir)
    base: nn.Module = cls.from_pretrained(base_id, **kwargs)
    _grow_embeddings(base, checked.header)
    return base


def _auto_class(config: PeftConfig, folder: Path) -> Any:
    """The class PEFT's Auto classes would load the base with (transformers is imported only here)."""
    task = getattr(config.task_type, "value", config.task_type)
    if task is not None:
        name = _TASK_CLASSES.get(str(task))
        if name is None:
            raise AdapterConfigError(
                f"No transformers Auto class for task_type {task!r} in {os.fspath(folder)!r}: "
                f"expected one of {sorted(_TASK_CLASSES)} — pass model_class=.",
                path=folder,
            )
        import transformers

        return getattr(transformers, name)
    mapping = getattr(config, "auto_mapping", None)
    if mapping:  # a non-transformers base (e.g. diffusers): PEFT's own import allowlist decides
        import importlib

        from peft import auto as peft_auto

        untyped: Any = peft_auto
        allowlist: list[str] = untyped.get_default_import_allowlist()
        library = mapping["parent_library"]
        if not untyped.check_import_allowlist(allowlist, library):
            raise AdapterConfigError(
                f"Adapter config asks to import {library!r}, which is not on PEFT's import allowlist — "
                f"expected one of {allowlist} — pass model_class= if you trust it.",
                path=folder,
            )
        return getattr(importlib.import_module(library), mapping["base_model_class"])
    raise AdapterConfigError(
        f"Adapter config records no task_type in {os.fspath(folder)!r}: expected e.g. 'CAUSAL_LM', "
        f"from which the base's class follows — pass model_class= (e.g. transformers.AutoModelForCausalLM).",
        path=folder,
    )


def _grow_embeddings(base: nn.Module, header: dict[str, HeaderEntry]) -> None:
    """Resize the base's embeddings to what the adapter saved of them, when it saved more rows.

    An adapter trained after adding tokens saves the resized embedding (``save_embedding_layers``,
    or ``modules_to_save``). PEFT's Auto classes resize to the length of a tokenizer stored with the
    adapter, which costs fetching it; the saved tensor's own shape says the same for free.
    """
    get_input = getattr(base, "get_input_embeddings", None)
    embeddings = get_input() if callable(get_input) else None
    if not isinstance(embeddings, nn.Embedding):
        return
    name = next((n for n, m in base.named_modules() if m is embeddings), None)
    if name is None:
        return
    prefix = f"{_SAVED_PREFIX}{name}."
    rows = [
        entry.shape[0]
        for key, entry in header.items()
        if key.startswith(prefix)
        and key.endswith("weight")
        and len(entry.shape) == 2
        and entry.shape[1] == embeddings.embedding_dim
    ]
    if rows and max(rows) > embeddings.num_embeddings:
        resize: Any = getattr(base, "resize_token_embeddings", None)
        if callable(resize):
            resize(max(rows))
