"""Several adapters on one base: add one, replace one's weights in place, switch between them.

PEFT's ``set_adapter`` switches ``requires_grad`` on for the adapter it activates and off for the
others; its ``load_adapter`` puts the whole model in eval mode. Here nothing changes but what was
asked: every module's mode and every parameter's ``requires_grad`` stay exactly as they were.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal

from peft import PeftModel
from torch import nn

from safe_lora._checks import emit
from safe_lora._loading import (
    AdapterPath,
    Sha256,
    _split_kwargs,
    attach_plan,
    check_dropout,
    check_type,
    plan_adapter,
)
from safe_lora._peft import (
    AuxiliaryTrainingWrapper,
    BaseTuner,
    BaseTunerLayer,
    adapters_disabled,
    base_modules,
    refuses_inference_mode,
    rewrites_base,
    set_adapters_disabled,
    set_layer_active_adapters,
    switches_layer_by_layer,
)
from safe_lora._provenance import record
from safe_lora._replace import replace as replace_in_place
from safe_lora._rollback import rollback_on_error
from safe_lora._unwrap import unwrap
from safe_lora.errors import (
    AdapterConfigError,
    AdapterExistsError,
    UnknownAdapterError,
    _fmt_keys,
)

__all__ = ["load_adapter", "set_active_adapter", "use_adapter"]


# --------------------------------------------------------------------------------------------------
# Switching
# --------------------------------------------------------------------------------------------------


def _peft_model(model: nn.Module, what: str) -> PeftModel:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes a PeftModel, found {type(model).__name__}.")
    inner = unwrap(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(
            f"{what} takes a PeftModel, found {type(model).__name__} — load the first adapter with "
            f"load_for_inference or load_for_training."
        )
    return inner


def _check_names(model: PeftModel, names: Sequence[str]) -> None:
    for name in names:
        if name not in model.peft_config:
            raise UnknownAdapterError(
                f"Unknown adapter: expected one of {sorted(model.peft_config)}, found {name!r} — load it "
                f"first with safe_lora.load_adapter, or pick a loaded name.",
                name=name,
                available=model.peft_config,
            )


def _switch(model: PeftModel, names: list[str]) -> None:
    """Make exactly ``names`` active; no ``requires_grad`` and no mode changes.

    For the standard tuner layers this sets what PEFT's ``set_adapter`` sets, minus its gradient
    side effect, in one walk. Layers or wrappers with their own ``set_adapter`` (modules_to_save,
    trainable tokens, prompt learning, merged layers, ...) go through PEFT's, with every
    ``requires_grad`` it touches put back.
    """
    tuner: Any = model.base_model
    plain = not model.peft_config[names[0]].is_prompt_learning and (
        type(tuner).set_adapter is BaseTuner.set_adapter
    )
    layers: list[BaseTunerLayer] = []
    if plain:
        for module in tuner.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                plain = False
                break
            if isinstance(module, BaseTunerLayer):
                if module.merged or type(module).set_adapter is not BaseTunerLayer.set_adapter:
                    plain = False
                    break
                layers.append(module)
    if plain:
        for layer in layers:
            set_layer_active_adapters(layer, names)
        tuner.active_adapter = names[0] if len(names) == 1 else list(names)
        if len(names) == 1:
            model.active_adapter = names[0]
        return
    grads = [(p, p.requires_grad) for p in model.parameters()]
    frozen = {} if refuses_inference_mode(tuner) else {"inference_mode": True}
    if len(names) == 1:
        model.set_adapter(names[0], **frozen)
    else:
        tuner.set_adapter(names, **frozen)
    for param, requires_grad in grads:
        if param.requires_grad is not requires_grad:
            param.requires_grad_(requires_grad)


def set_active_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Activate adapter(s) for good, without PEFT's side effect on gradients.

    ``model.set_adapter(name)`` in PEFT switches ``requires_grad`` on for the adapter it
    activates -- in a frozen inference model that silently makes it trainable. This keeps every
    module's mode and every parameter's ``requires_grad`` exactly as they were.

    There is no ``set_active_adapter(model, None)``: switching every adapter off for good would
    leave a model that silently computes its base model. Run the base model for a block with
    ``with use_adapter(model, None):`` instead.

    Args:
        model: A ``PeftModel`` (or a ``torch.compile`` of one) holding the adapter(s).
        name_or_names: One adapter name, or several to combine (tuners that support it, e.g. LoRA).

    Raises:
        UnknownAdapterError: A name that is not loaded; nothing changes.
        TypeError: ``None`` (see above), or not a name or a sequence of names.

    Example:
        >>> model = load_for_inference(base, {"chat": "out/chat", "sql": "out/sql"})  # doctest: +SKIP
        >>> set_active_adapter(model, "sql")  # still frozen, still in eval  # doctest: +SKIP
    """
    peft_model = _peft_model(model, "set_active_adapter")
    if name_or_names is None:
        raise TypeError(
            "set_active_adapter(model, None) is not supported: switching every adapter off for good leaves a "
            "model that silently computes its base model — expected an adapter name or a list of names — "
            "for the base model's outputs in a block, use `with use_adapter(model, None):`."
        )
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    if not names:
        raise ValueError("set_active_adapter: expected at least one adapter name, found none.")
    for name in names:
        check_type("name_or_names", name, str, "an adapter name (str) or a list of names")
    _check_names(peft_model, names)
    _switch(peft_model, names)


@contextmanager
def _grads_kept(model: nn.Module) -> Iterator[None]:
    """Put back every ``requires_grad`` a PEFT switch changed in the block.

    PEFT's ``enable_adapters(True)`` calls ``set_adapter``, which sets ``requires_grad=True`` on the
    active adapter (a frozen inference model becomes trainable: 0 -> 8 trainable tensors on a tiny
    Llama), and ``enable_adapters(False)`` freezes every adapter. Each flag is put back to what it
    was just before the switch, so a flag the caller changed earlier stays as the caller set it.
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            if param.requires_grad is not flag:
                param.requires_grad_(flag)


class _AdaptersOff:
    """The switch of one ``use_adapter(model, None)`` block: every adapter off, by PEFT's own means.

    For the tuners PEFT switches layer by layer, each ``BaseTunerLayer`` and auxiliary wrapper that is
    on is switched off with its own ``enable_adapters(False)`` (and back on with
    ``enable_adapters(True)``): layers the caller had switched off stay off. Prompt learning, adaption
    prompt and X-LoRA go through PEFT's ``disable_adapter()`` context manager, which knows their
    mechanisms. Either way every ``requires_grad`` PEFT touches is put back, and no module's
    ``training`` flag is touched.
    """

    def __init__(self, model: PeftModel) -> None:
        self.model = model
        self.layer_by_layer = switches_layer_by_layer(model)
        self.switched: list[Any] = []  # the layers this block turned off
        self.peft_block: AbstractContextManager[None] | None = None
        self.was_disabled = False
        self.is_off = False
        # The instance attributes of what PEFT's switch touches, before it did (see on()).
        self.attributes: list[tuple[object, set[str]]] = []

    def off(self) -> None:
        with _grads_kept(self.model):
            if self.layer_by_layer:
                tuner: Any = self.model.base_model
                self.switched = [
                    module
                    for module in tuner.model.modules()
                    if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
                    and not module.disable_adapters
                ]
                self.attributes = [(layer, set(vars(layer))) for layer in self.switched]
                for layer in self.switched:
                    layer.enable_adapters(False)
                self.was_disabled = adapters_disabled(self.model)
                set_adapters_disabled(self.model, True)
            else:
                objects = (self.model, self.model.base_model)
                self.attributes = [(obj, set(vars(obj))) for obj in objects]
                block = self.model.disable_adapter()
                block.__enter__()
                self.peft_block = block
        self.is_off = True

    def on(self) -> None:
        if not self.is_off:
            return
        self.is_off = False
        with _grads_kept(self.model):
            if self.peft_block is not None:
                block, self.peft_block = self.peft_block, None
                block.__exit__(None, None, None)
            else:
                for layer in self.switched:
                    layer.enable_adapters(True)
                self.switched = []
                set_adapters_disabled(self.model, self.was_disabled)
        # PEFT's switch leaves instance attributes that only repeat what the class gives: a layer's
        # ``_disable_adapters = False`` (a class default), the PeftModel's ``forward`` put back as
        # its own bound method. Dropped, so that every object has exactly its attributes of before.
        for obj, before in self.attributes:
            state = vars(obj)
            for key in [k for k in state if k not in before]:
                value = state.pop(key)
                if getattr(obj, key, _MISSING) != value:
                    state[key] = value  # not a mere repeat: the switch's own state, kept
        self.attributes = []


_MISSING = object()


# The use_adapter(model, None) blocks open on each model, outermost first: a use_adapter(model, name)
# nested inside them switches them on for its own block, and off again after it.
_OFF_BLOCKS: weakref.WeakKeyDictionary[PeftModel, list[_AdaptersOff]] = weakref.WeakKeyDictionary()


def _has_biases(model: PeftModel) -> bool:
    return any(module._parameters.get("bias") is not None for _, module in base_modules(model))


def _refuse_switching_off(model: PeftModel) -> None:
    """Raise unless switching every adapter off gives exactly the base model's outputs; change nothing.

    Raises:
        AdapterConfigError: An adapter changed the base model itself when it loaded: an init that
            rewrites the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA, KaSA), layer replication,
            or base biases trained with it (``bias="all"`` / ``"lora_only"``).
        ValueError: An adapter is merged into the base weights.
    """
    changed: dict[str, list[str]] = {}
    for adapter, config in model.peft_config.items():
        if rewrites_base(config):
            init = getattr(config, "init_lora_weights", None)
            changed.setdefault(adapter, []).append(
                f"init_lora_weights={init!r}" if isinstance(init, str) else "kasa_config"
            )
        replication = getattr(config, "layer_replication", None)
        if replication:
            changed.setdefault(adapter, []).append(f"layer_replication={replication!r}")
        bias = getattr(config, "bias", "none")
        # bias="all" / "lora_only" load the adapter's biases into the base layers' own bias tensors
        # (PEFT saves them with the adapter): only a base without biases is left as it was.
        if isinstance(bias, str) and bias != "none" and _has_biases(model):
            changed.setdefault(adapter, []).append(f"bias={bias!r}")
    if changed:
        described = "; ".join(f"{name!r}: {', '.join(why)}" for name, why in sorted(changed.items()))
        raise AdapterConfigError(
            f"use_adapter(model, None) cannot give the base model's outputs: loading changed the base model "
            f"itself ({described}: the base weights were rewritten, layers replicated, or base biases "
            f"overwritten) — expected adapters that leave the base model alone — compare against a freshly "
            f"loaded base model instead.",
            fields=sorted({why.split("=")[0] for reasons in changed.values() for why in reasons}),
        )
    tuner: Any = model.base_model
    merged = sorted(
        key
        for key, module in (tuner.model.named_modules() if isinstance(tuner, BaseTuner) else ())
        if isinstance(module, BaseTunerLayer) and module.merged
    )
    if merged:
        raise ValueError(
            f"use_adapter(model, None) cannot switch the adapters off while they are merged into the base "
            f"weights ({_fmt_keys(merged)}) — PEFT would unmerge them in place at the next forward and the "
            f"model would not be the same after the block — call model.unmerge_adapter() first."
        )


@contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[PeftModel]:
    """Activate one adapter -- or none -- for a block; restore the previous state on exit.

    ``use_adapter(model, name)`` makes ``name`` the one active adapter. ``use_adapter(model, None)``
    switches every adapter off, with PEFT's own switches: inside the block the model computes exactly
    what its base model computes (bit for bit). PEFT's ``disable_adapter()`` does the same but turns
    ``requires_grad`` **on** for the active adapter when it ends (a frozen inference model becomes
    trainable); here every module's mode and every parameter's ``requires_grad`` are exactly as before,
    inside the block and after it, also when the block raises.

    Blocks nest, with each other and with :class:`~safe_lora.deterministic_lora`: a
    ``use_adapter(model, "b")`` inside a ``use_adapter(model, None)`` computes ``"b"`` (the adapters are
    back on for its block), and a ``use_adapter(model, None)`` inside ``use_adapter(model, "b")``
    computes the base model. In a training model a backward pass inside a ``None`` block leaves the
    adapters' gradients untouched (they took no part), and they stay trainable.

    Args:
        model: A ``PeftModel`` (or a ``torch.compile`` of one) holding ``name``.
        name: The adapter to activate inside the block, or ``None`` for the base model.

    Yields:
        The ``PeftModel``, with ``name`` active (or every adapter off).

    Raises:
        UnknownAdapterError: The model holds no adapter called ``name``.
        AdapterConfigError: ``None``, and loading an adapter changed the base model itself (an init
            that rewrites the base weights such as PiSSA, layer replication, trained base biases):
            switching adapters off cannot give the base model's outputs (``fields`` names why).
        ValueError: ``None``, and an adapter is merged into the base weights.

    Example:
        >>> model = load_for_inference(base, {"chat": "out/chat", "sql": "out/sql"})  # doctest: +SKIP
        >>> with use_adapter(model, "sql"):  # doctest: +SKIP
        ...     answer = model(**batch)
        >>> with use_adapter(model, None):  # the base model, e.g. a reference in DPO  # doctest: +SKIP
        ...     reference = model(**batch).logits
    """
    peft_model = _peft_model(model, "use_adapter")
    if name is None:
        _refuse_switching_off(peft_model)
        block = _AdaptersOff(peft_model)
        blocks = _OFF_BLOCKS.setdefault(peft_model, [])
        block.off()
        blocks.append(block)
        try:
            yield peft_model
        finally:
            blocks.remove(block)
            block.on()
        return
    check_type("name", name, str, "an adapter name (str) or None")
    _check_names(peft_model, [name])
    previous = list(peft_model.active_adapters)
    # The None blocks this one is nested in: back on for this block, innermost first, and off again
    # after it, outermost first (each re-records what it turns off).
    suspended = [block for block in _OFF_BLOCKS.get(peft_model, ()) if block.is_off]
    try:
        for block in reversed(suspended):
            block.on()
        _switch(peft_model, [name])
        yield peft_model
    finally:
        try:
            _switch(peft_model, previous)
        finally:
            for block in suspended:
                block.off()


# --------------------------------------------------------------------------------------------------
# Adding and replacing
# --------------------------------------------------------------------------------------------------


def _is_training_model(model: PeftModel) -> bool:
    return not all(getattr(c, "inference_mode", False) for c in model.peft_config.values())


def _adapter_kind(model: PeftModel, name: str, *, trainable: bool | None, replace: bool) -> bool:
    """Whether adapter ``name`` is loaded for training (``True``) or frozen, as for inference.

    Raises:
        ValueError: ``trainable=True`` on an inference model; with ``replace=True``, a ``trainable``
            that is not the loaded adapter's kind.
    """
    if replace:
        kind = not getattr(model.peft_config[name], "inference_mode", False)
        if trainable is not None and trainable is not kind:
            raise ValueError(
                f"replace=True keeps adapter {name!r} as it was loaded — expected trainable=None or "
                f"{kind}, found trainable={trainable} — to change its kind, load the new weights under a "
                f"new adapter_name."
            )
        return kind
    training = _is_training_model(model)
    if trainable is True and not training:
        raise ValueError(
            f"Cannot add a trainable adapter {name!r} to a model loaded for inference (every module in eval, "
            f"every parameter frozen): it would train in eval mode, dropout off, beside frozen adapters — "
            f"expected a model from load_for_training — load the base with load_for_training, or drop "
            f"trainable=True."
        )
    return training if trainable is None else trainable


def load_adapter(
    model: nn.Module,
    adapter: AdapterPath,
    *,
    adapter_name: str,
    replace: bool = False,
    trainable: bool | None = None,
    dropout: float | Literal["auto"] | None = "auto",
    strict: bool = True,
    allow_pickle: bool = False,
    expected_sha256: Sha256 | None = None,
    signed_by: Any = None,
    **peft_kwargs: Any,
) -> PeftModel:
    """Load one more adapter into a model from ``load_for_inference`` / ``load_for_training``, or
    swap new weights into one it already holds.

    The same checks as single loading run first. Adding (``replace=False``) disturbs nothing else:
    every module's mode, the active adapter(s) and every existing parameter's ``requires_grad``
    stay as they were (PEFT's own ``load_adapter`` switches the whole model to eval). In an
    inference model the new adapter gets zero dropout and no gradients; in a training model it is
    trainable, like the first one -- unless ``trainable=False``: a frozen *reference* adapter in a
    training model (DPO, KTO: PEFT's ``load_adapter(..., is_trainable=False)``), loaded as for
    inference (no gradients, dropout rates 0 unless ``dropout=`` says otherwise) while the adapters
    being trained, the active adapter and every module's mode stay as they were. Its new modules
    follow their parent's mode, as every new module does, so a rate passed with ``dropout=`` is live
    in a training model until :class:`~safe_lora.deterministic_lora` freezes it.

    With ``replace=True`` the adapter called ``adapter_name`` gets the new weights **in place**:
    the same tensor objects, dtype and device (so a ``torch.compile``d model serves them without
    recompiling), after the new file was checked in full against the loaded adapter -- same tuner,
    targets, ranks and variant (the differing config fields are named, whatever the keys say); keys
    and shapes exact; values finite. A different alpha updates the scalings (a compiled model then
    re-specialises once). On a model prepared with PEFT's
    ``peft.utils.hotswap.prepare_model_for_compiled_hotswap(model, target_rank=R)`` (its LoRA
    tensors zero-padded to rank ``R``, its scalings 0-dim tensors) the new adapter may have any
    rank up to ``R`` and any alpha: its weights are zero-padded exactly as PEFT's ``hotswap_adapter``
    pads them and its scalings written into the same scaling tensors, so a compiled model does not
    recompile -- bit for bit what ``hotswap_adapter`` computes on an identically prepared model. Any
    refusal leaves the old weights, scalings, modes and ``requires_grad`` exactly as they were.

    Args:
        model: A ``PeftModel`` (or a ``torch.compile`` of one) holding at least one adapter.
        adapter: A folder written by ``save_pretrained`` or a hub repo id.
        adapter_name: The new adapter's name (must not be taken), or with ``replace=True`` the
            loaded adapter to overwrite (must exist).
        replace: Overwrite ``adapter_name``'s weights in place instead of adding an adapter.
        trainable: ``None`` follows the model: trainable in a training model, frozen in an
            inference model. ``False`` adds a frozen adapter to a training model. ``True`` asks
            for a trainable adapter, which only a training model can take: an inference model (every
            module in eval, every parameter frozen) would become the mixed train/eval tree safe_lora
            exists to prevent. With ``replace=True`` the adapter keeps its kind (``None``, or the kind
            it was loaded as).
        dropout: ``"auto"`` zeroes dropout in an inference model and for a frozen adapter
            (``trainable=False``), and keeps the saved rates for a trainable one; a float or ``None``
            as for :func:`load_for_inference`.
        strict: Refuse missing or unexpected adapter keys (``replace=True`` is always strict).
        allow_pickle: Allow ``adapter_model.bin`` when there is no safetensors file.
        expected_sha256: Pin the bytes, as for :func:`~safe_lora.load_for_inference`.
        signed_by: Require a signature, as for :func:`~safe_lora.load_for_inference`.
        **peft_kwargs: ``PeftModel.load_adapter``'s keywords; a ``config`` object is copied.

    Returns:
        The ``PeftModel``, with the adapter added (not activated: use :func:`use_adapter` or
        :func:`set_active_adapter`) or replaced.

    Raises:
        AdapterExistsError: ``adapter_name`` is already taken (and ``replace`` is false).
        UnknownAdapterError: ``replace=True`` and no adapter is called ``adapter_name``.
        ValueError: ``trainable=True`` on an inference model, or with ``replace=True`` a
            ``trainable`` other than the adapter's kind.
        AdapterConfigError: ``replace=True`` and the new config does not match the loaded adapter's
            (``fields`` names the fields: ``"target_modules"``, ``"r"``, ``"use_dora"``, ...); another
            rank on a model not prepared for hot-swapping says how to prepare it.
        AdapterNotFoundError, AdapterWeightsError, UnsafeAdapterError: As for
            :func:`load_for_inference`; the model is left exactly as it was. With ``replace=True``
            an ``AdapterWeightsError`` lists the file's keys that do not fit the loaded adapter:
            ``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` (``{key: (shape in the
            file, shape loaded)}``), ``wrong_dtypes``.

    Example:
        >>> model = load_for_inference(base, {"chat": "out/chat"})  # doctest: +SKIP
        >>> load_adapter(model, "out/sql", adapter_name="sql")  # doctest: +SKIP
        >>> load_adapter(model, "out/sql-step-2000", adapter_name="sql", replace=True)  # doctest: +SKIP
        >>> policy = load_for_training(base, "out/sft")  # doctest: +SKIP
        >>> load_adapter(policy, "out/sft", adapter_name="ref", trainable=False)  # DPO  # doctest: +SKIP
    """
    peft_model = _peft_model(model, "load_adapter")
    check_type("adapter_name", adapter_name, str, "a str")
    check_type("replace", replace, bool, "True or False")
    if trainable is not None:
        check_type("trainable", trainable, bool, "True, False or None")
    check_type("strict", strict, bool, "True or False")
    if dropout != "auto":
        check_dropout(dropout)
    taken = adapter_name in peft_model.peft_config
    if replace and not taken:
        raise UnknownAdapterError(
            f"Cannot replace adapter {adapter_name!r}: expected one of {sorted(peft_model.peft_config)} — "
            f"pass the name of a loaded adapter, or replace=False to add a new one.",
            name=adapter_name,
            available=peft_model.peft_config,
        )
    if taken and not replace:
        raise AdapterExistsError(
            f"Adapter name taken: the model already holds {sorted(peft_model.peft_config)} — pass a new "
            f"adapter_name, or replace=True to swap new weights into {adapter_name!r} in place.",
            name=adapter_name,
            available=peft_model.peft_config,
        )
    training = _adapter_kind(peft_model, adapter_name, trainable=trainable, replace=replace)
    if dropout == "auto":
        dropout = None if training else 0.0
    options = _split_kwargs(peft_kwargs)
    plan = plan_adapter(
        adapter,
        name=adapter_name,
        training=training,
        dropout=dropout,
        strict=strict or replace,
        allow_pickle=allow_pickle,
        options=options,
        expected_sha256=expected_sha256,
        signed_by=signed_by,
        instead="load_adapter(..., trainable=False)",
    )
    if replace:
        replace_in_place(peft_model, plan)
        record(peft_model, adapter_name, plan.adapter)
        return peft_model

    # After delete_adapter removed the last adapter, PEFT keeps a stale active name: the model is
    # then empty, and the adapter loaded into it becomes the active one, as a first load would.
    active = [a for a in peft_model.active_adapters if a in peft_model.peft_config] or [adapter_name]
    with rollback_on_error(peft_model) as snapshot:
        _, findings = attach_plan(
            peft_model, plan, training=training, strict=strict, options=options, snapshot=snapshot
        )
        if (
            list(peft_model.active_adapters) != active
            or peft_model.active_adapter not in peft_model.peft_config
        ):
            _switch(peft_model, active)
        # Everything that existed keeps its own mode and requires_grad; what is new follows its
        # parent's mode and the adapter's kind (trainable only when loaded for training).
        snapshot.restore_modes()
        for parent, child in snapshot.new_subtrees():
            if any(m.training is not parent.training for m in child.modules()):
                child.train(parent.training)
        for param in snapshot.new_parameters():
            if param.requires_grad is not training:
                param.requires_grad_(training)
    record(peft_model, adapter_name, plan.adapter)
    emit(findings)
    return peft_model
