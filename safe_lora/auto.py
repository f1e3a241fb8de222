"""One call from an adapter to a loaded model, as ``peft.AutoPeftModelFor*`` does -- checked first.

``AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=..., device_map=...)`` reads the adapter's
config, downloads and loads the (often multi-GB) base model it names, and only then finds out
whether the adapter is usable. :func:`for_inference` and :func:`for_training` find the adapter,
fetch its two files (``adapter_config.json``, then ``adapter_model.safetensors``) and run every check
the loaders run without a model (:func:`safe_lora._checks.read_adapter`: the same code, the same
verdict) *before* the base is loaded, so a broken adapter never costs a base download. Then the base
is loaded as PEFT's Auto classes load it, and the adapter -- the very bytes already checked, not read
again -- with :func:`~safe_lora.load_for_inference` / :func:`~safe_lora.load_for_training`.

The adapter only *names* a base model. With ``trust_remote_code=True`` that name decides whose code
runs, so the caller must choose the base (``base_model=``); nothing executable from the adapter's own
repo (code, a tokenizer) is ever loaded.

Example:
    >>> from safe_lora import auto
    >>> model = auto.for_inference("org/my-adapter", dtype=torch.bfloat16)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Literal, overload

from peft import PeftConfig, PeftModel
from torch import nn

from safe_lora._checks import AdapterOnDisk, DiskOptions, raise_first, read_adapter
from safe_lora._loading import Sha256, check_dropout, load_for_inference, load_for_training
from safe_lora._peft import SAVED_PREFIX, TASK_CLASSES, import_allowed
from safe_lora._readers import TensorInfo
from safe_lora._source import CONFIG_NAME, open_source
from safe_lora.errors import AdapterConfigError, UnsafeAdapterError

__all__ = ["for_inference", "for_training"]

AdapterPath = str | os.PathLike[str]


@overload
def for_inference(
    adapter: AdapterPath,
    *,
    base_model: AdapterPath | None = ...,
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
    expected_sha256: Sha256 | None = ...,
    signed_by: Any = ...,
    **base_kwargs: Any,
) -> PeftModel: ...
@overload
def for_inference(
    adapter: AdapterPath,
    *,
    base_model: AdapterPath | None = ...,
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
    expected_sha256: Sha256 | None = ...,
    signed_by: Any = ...,
    **base_kwargs: Any,
) -> nn.Module: ...
def for_inference(
    adapter: AdapterPath,
    *,
    base_model: AdapterPath | None = None,
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
    expected_sha256: Sha256 | None = None,
    signed_by: Any = None,
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
        expected_sha256: Pinned digests of the adapter's files, as for
            :func:`~safe_lora.load_for_inference`; checked before the base is requested.
        signed_by: A required signature over the adapter's files, as for
            :func:`~safe_lora.load_for_inference`; checked before the base is requested.
        **base_kwargs: Passed to the base's ``from_pretrained``: ``dtype``, ``device_map``,
            ``quantization_config``, ``attn_implementation``, ... ``trust_remote_code=True`` runs the
            base repo's own code, so it requires ``base_model=``: the adapter's config must not choose
            whose code runs.

    Returns:
        What :func:`~safe_lora.load_for_inference` returns: the ``PeftModel`` in eval mode with every
        parameter frozen, or with ``merge=True`` the merged transformers model.

    Raises:
        AdapterNotFoundError: The adapter (folder, repo, revision, config or weights) does not exist.
        AdapterAccessError: The hub refused the adapter (pass ``token=``).
        AdapterConfigError: The config is broken, or names no base model / task type to load it with.
        AdapterWeightsError: The weights are unreadable, hold NaN/inf, or contradict the config -- found
            before the base loads.
        AdapterIntegrityError: A pinned digest, the Hub's record or the signature disagrees.
        UnsafeAdapterError: Only pickle weights exist and ``allow_pickle`` is false, or
            ``trust_remote_code=True`` without ``base_model=``.

    Example:
        >>> model = auto.for_inference("org/my-adapter", dtype=torch.bfloat16, device_map="auto")
        ... # doctest: +SKIP
    """
    checked = _check_adapter(
        adapter,
        training=False,
        dropout=dropout,
        strict=strict,
        allow_pickle=allow_pickle,
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        expected_sha256=expected_sha256,
        signed_by=signed_by,
    )
    base = _load_base(checked, base_model, model_class, token=token, cache_dir=cache_dir, kwargs=base_kwargs)
    # The bytes already read and checked are loaded: nothing is read (or downloaded) again.
    loaded: nn.Module = load_for_inference(
        base,
        checked,
        adapter_name=adapter_name,
        dropout=dropout,
        merge=merge,
        strict=strict,
        allow_pickle=allow_pickle,  # type: ignore[call-overload]
    )
    return loaded


def for_training(
    adapter: AdapterPath,
    *,
    base_model: AdapterPath | None = None,
    model_class: Any = None,
    adapter_name: str = "default",
    dropout: float | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    expected_sha256: Sha256 | None = None,
    signed_by: Any = None,
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
        strict=strict,
        allow_pickle=allow_pickle,
        revision=revision,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        expected_sha256=expected_sha256,
        signed_by=signed_by,
    )
    base = _load_base(checked, base_model, model_class, token=token, cache_dir=cache_dir, kwargs=base_kwargs)
    return load_for_training(
        base,
        checked,  # type: ignore[arg-type]  # the bytes already read and checked
        adapter_name=adapter_name,
        dropout=dropout,
        strict=strict,
        allow_pickle=allow_pickle,
    )


def _check_adapter(
    adapter: AdapterPath,
    *,
    training: bool,
    dropout: float | None,
    strict: bool,
    allow_pickle: bool,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    expected_sha256: Sha256 | None,
    signed_by: Any,
) -> AdapterOnDisk:
    """Every check the loaders run without a model, done before the base model is loaded."""
    check_dropout(dropout)
    source = open_source(adapter, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir)
    checked = read_adapter(
        source,
        DiskOptions(
            allow_pickle=allow_pickle,
            training=training,
            strict=strict,
            expected_sha256=expected_sha256,
            signed_by=signed_by,
            instead="auto.for_inference",
        ),
    )
    raise_first(checked.findings)
    return checked


def _load_base(
    checked: AdapterOnDisk,
    base_model: AdapterPath | None,
    model_class: Any,
    *,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """The base model, loaded as PEFT's ``AutoPeftModelFor*.from_pretrained`` loads it."""
    config = checked.config
    assert config is not None
    where = checked.source.where(CONFIG_NAME)
    if kwargs.get("trust_remote_code") and base_model is None:
        raise UnsafeAdapterError(
            f"Refusing to run the code of the base model the adapter names: trust_remote_code=True with the "
            f"base taken from {where!r} ({config.base_model_name_or_path!r}) lets whoever wrote the adapter "
            f"choose whose code runs — expected base_model= chosen by you — pass base_model= (the id or "
            f"folder of the base you trust), or drop trust_remote_code=True.",
            path=where,
        )
    base_id = os.fspath(base_model) if base_model is not None else config.base_model_name_or_path
    if not base_id:
        raise AdapterConfigError(
            f"Adapter config records no base model in {where!r}: expected 'base_model_name_or_path' — pass "
            f"base_model= (the id or folder of the base it was trained on).",
            path=where,
        )
    cls = model_class if model_class is not None else _auto_class(config, where)
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


def _auto_class(config: PeftConfig, where: str) -> Any:
    """The class PEFT's Auto classes would load the base with (transformers is imported only here)."""
    task = getattr(config.task_type, "value", config.task_type)
    if task is not None:
        name = TASK_CLASSES.get(str(task))
        if name is None:
            raise AdapterConfigError(
                f"No transformers Auto class for task_type {task!r} in {where!r}: "
                f"expected one of {sorted(TASK_CLASSES)} — pass model_class=.",
                path=where,
            )
        import transformers

        return getattr(transformers, name)
    mapping = getattr(config, "auto_mapping", None)
    if mapping:  # a non-transformers base (e.g. diffusers): PEFT's own import allowlist decides
        import importlib

        library = mapping["parent_library"]
        allowed, allowlist = import_allowed(library)
        if not allowed:
            raise AdapterConfigError(
                f"Adapter config asks to import {library!r}, which is not on PEFT's import allowlist — "
                f"expected one of {allowlist} — pass model_class= if you trust it.",
                path=where,
            )
        return getattr(importlib.import_module(library), mapping["base_model_class"])
    raise AdapterConfigError(
        f"Adapter config records no task_type in {where!r}: expected e.g. 'CAUSAL_LM', "
        f"from which the base's class follows — pass model_class= (e.g. transformers.AutoModelForCausalLM).",
        path=where,
    )


def _grow_embeddings(base: nn.Module, header: dict[str, TensorInfo]) -> None:
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
    prefix = f"{SAVED_PREFIX}{name}."
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
