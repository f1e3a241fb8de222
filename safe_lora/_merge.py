"""Merge an adapter into the base weights only once every layer is known to merge.

PEFT merges layer by layer, in place (``base_layer.weight.data += delta``): a layer that fails half
way leaves the earlier ones merged, and undoing that exactly would need a copy of every merged
weight. So each layer first merges a *copy of itself* -- the same PEFT code on the same real tensors
(quantized ones included: a bitsandbytes weight is dequantized, merged and re-quantized as it would
be), one layer at a time, so the extra memory is one layer's. Only when all of them succeed does
PEFT's own ``merge_and_unload`` run on the model.

A weight two modules share is the other trap: with ``tie_word_embeddings=True`` ``lm_head`` and
``embed_tokens`` hold one tensor, and PEFT merges a LoRA on ``lm_head`` into it -- the embeddings
change too, and the merged model computes something else (logits off by tens on a tiny Llama); LoRA's
``layer_replication`` replicas share their base weights, and each replica's delta lands in all. So the
tie is broken first: each merge target that shares its weight gets its own copy (the modules that are
not merged keep the original), and the model's config says ``tie_word_embeddings=False``, so that
``save_pretrained`` and ``from_pretrained`` give the same model. Breaking it rather than refusing
gives what ``merge=True`` asks for -- a plain model that computes what the unmerged one did -- at the
cost PEFT's own advice (load the base untied) has too: one more copy of the shared weight. Where the
tie cannot be broken so that a reload keeps it broken (a config that forces it, other tied pairs that
would come apart, a quantized shared weight), the merge is refused before anything is merged.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from safe_lora._peft import BaseTunerLayer, base_modules, layer_adapters, peft_type_name
from safe_lora._rollback import holds_quantized
from safe_lora.errors import AdapterMergeError

__all__ = ["check_mergeable", "merge"]


def check_mergeable(peft_model: PeftModel, adapter_name: str) -> None:
    """Raise unless PEFT can merge ``adapter_name`` into every layer it adapts; change nothing.

    Raises:
        AdapterMergeError: The tuner cannot merge at all, or one of its layers fails to (named).
    """
    peft_type = peft_type_name(peft_model.peft_config[adapter_name])
    tuner: Any = peft_model.base_model
    if peft_model.peft_config[adapter_name].is_prompt_learning or not hasattr(tuner, "merge_and_unload"):
        raise AdapterMergeError(
            f"Cannot merge a {peft_type} adapter: the tuner has no merge_and_unload — expected a tuner "
            f"that adds weights to the base layers (LoRA, LoHa, LoKr, IA3, ...) — load it with "
            f"merge=False.",
            peft_type=peft_type,
        )
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, BaseTunerLayer) or layer.merged:
            continue
        if adapter_name not in layer_adapters(layer):
            continue
        trial = copy.deepcopy(layer)
        try:
            with warnings.catch_warnings():
                # The real merge below says whatever PEFT has to say (e.g. bnb rounding), once.
                warnings.simplefilter("ignore")
                trial.merge(adapter_names=[adapter_name])
        except Exception as exc:  # PEFT raises ValueError/NotImplementedError/RuntimeError/AttributeError
            raise AdapterMergeError(
                f"Cannot merge this {peft_type} adapter into the base weights: layer {name!r} "
                f"({type(layer).__name__}) fails to merge ({type(exc).__name__}: {exc}) — load it with "
                f"merge=False and serve it unmerged.",
                peft_type=peft_type,
                layer=name,
            ) from exc
        finally:
            del trial


# --------------------------------------------------------------------------------------------------
# Weights shared between modules
# --------------------------------------------------------------------------------------------------


def _storage(tensor: torch.Tensor) -> int:
    """What two tensors sharing memory have in common: the address of their storage."""
    return int(tensor.untyped_storage().data_ptr())


@dataclass
class _Tie:
    """One weight storage shared by a merge target and other modules."""

    holders: list[tuple[str, nn.Module, str]]  # (module name, module, parameter name), every holder
    targets: list[tuple[str, nn.Module, str]]  # the holders PEFT merges into
    layer: str  # the (first) merge target's layer, as check_mergeable names layers

    @property
    def modules(self) -> list[str]:
        return sorted({name for name, _, _ in self.holders})

    @property
    def untied(self) -> list[tuple[str, nn.Module, str]]:
        """The holders that get their own copy: every merge target, but one when all of them are."""
        return self.targets[1:] if len(self.targets) == len(self.holders) else self.targets


def _ties(peft_model: PeftModel, adapter_name: str) -> list[_Tie]:
    """Every storage a merge of ``adapter_name`` writes that another module also holds.

    Found by storage, not by name: the same ``Parameter`` under two modules (``lm_head.weight =
    embed_tokens.weight``) or two tensors over one storage. PEFT writes a merge into the tensors of
    each adapted layer's base layer (``base_layer.weight.data += delta``, a bias with ``lora_bias``).
    """
    targets: dict[int, str] = {}  # base layer -> its tuner layer's name, as check_mergeable names it
    for name, layer in peft_model.named_modules():
        if isinstance(layer, BaseTunerLayer) and adapter_name in layer_adapters(layer):
            targets[id(layer.get_base_layer())] = name
    by_storage: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for key, module in base_modules(peft_model):
        for param_name, tensor in module._parameters.items():
            if tensor is None or tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            by_storage.setdefault(_storage(tensor), []).append((key, module, param_name))
    ties = []
    for holders in by_storage.values():
        hit = [h for h in holders if id(h[1]) in targets]
        if hit and len({id(module) for _, module, _ in holders}) > 1:
            ties.append(_Tie(holders, hit, targets[id(hit[0][1])]))
    return ties


@dataclass
class _Untying:
    """How a set of ties is broken and recorded, decided before anything changes."""

    ties: list[_Tie]
    # (transformers model, its name in the merged model, tied pairs it gives up): its config is set
    # to tie_word_embeddings=False after the merge.
    configs: list[tuple[nn.Module, str, dict[str, str]]] = field(default_factory=list)


def _tied_pairs(model: nn.Module, *, untie: bool) -> dict[str, str] | None:
    """A transformers model's tied weights ``{target: source}``, as its config has them (``untie``:
    as they would be with ``tie_word_embeddings=False``); ``None`` if ``model`` is not one.

    transformers 5 (modeling_utils.py, ``get_expanded_tied_weights_keys``) ties a model's
    ``_tied_weights_keys`` only while its ``config.tie_word_embeddings`` is true, and ``from_pretrained``
    re-ties the pairs the config says.
    """
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    config = getattr(model, "config", None)
    if not callable(expand) or config is None or not hasattr(config, "tie_word_embeddings"):
        return None
    if not untie:
        return dict(expand(all_submodels=False))
    before = config.tie_word_embeddings
    config.tie_word_embeddings = False
    try:
        return dict(expand(all_submodels=False))
    finally:
        config.tie_word_embeddings = before


def _reloads_untied(model: nn.Module) -> bool:
    """Whether a config saved with ``tie_word_embeddings=False`` reads back so (T5's forces it on)."""
    config: Any = getattr(model, "config", None)
    try:
        reloaded = type(config).from_dict({**config.to_dict(), "tie_word_embeddings": False})
    except Exception:  # a config class that cannot round-trip this way: do not rely on it
        return False
    return getattr(reloaded, "tie_word_embeddings", None) is False


def _plan_untying(peft_model: PeftModel, adapter_name: str) -> _Untying:
    """Decide how to break the ties a merge of ``adapter_name`` would write through; change nothing.

    Raises:
        AdapterMergeError: A tie that cannot be broken so that it stays broken: a quantized shared
            weight, or a transformers model whose config cannot say that only these pairs are untied.
    """
    peft_type = peft_type_name(peft_model.peft_config[adapter_name])
    untying = _Untying(_ties(peft_model, adapter_name))
    if not untying.ties:
        return untying

    def refuse(tie: _Tie, expected: str, found: str, do: str) -> AdapterMergeError:
        return AdapterMergeError(
            f"Cannot merge this {peft_type} adapter into the base weights: the weight of layer {tie.layer!r} "
            f"is shared by the modules {tie.modules}, and merging into it would change them all — expected "
            f"{expected}, found {found} — {do}.",
            peft_type=peft_type,
            layer=tie.layer,
            tied_modules=tie.modules,
        )

    untied: dict[str, _Tie] = {}  # every parameter that gets its own copy, named in the merged model
    for tie in untying.ties:
        for key, module, param_name in tie.untied:
            tensor = module._parameters[param_name]
            assert tensor is not None
            if holds_quantized(tensor) or type(tensor) is not nn.Parameter:
                raise refuse(
                    tie,
                    "a floating-point weight that can be copied apart exactly",
                    f"{param_name!r} as a {type(tensor).__name__} of {tensor.dtype}",
                    "give these modules their own weights in the base before loading the adapter (for "
                    "embeddings: tie_word_embeddings=False), or serve the adapter unmerged (merge=False)",
                )
            untied[f"{key}.{param_name}" if key else param_name] = tie
    for name, module in base_modules(peft_model):
        pairs = _tied_pairs(module, untie=False)
        if not pairs:
            continue
        prefix = f"{name}." if name else ""
        broken = {t: s for t, s in pairs.items() if prefix + t in untied or prefix + s in untied}
        if not broken:
            continue
        after = _tied_pairs(module, untie=True) or {}
        # With tie_word_embeddings=False a reload ties nothing of this model: every pair must then
        # be one that is broken here, and the config must read back untied.
        kept = sorted(prefix + t for t in pairs if t not in broken)
        tie = next(untied[n] for t, s in broken.items() for n in (prefix + t, prefix + s) if n in untied)
        if kept or after or not _reloads_untied(module):
            raise refuse(
                tie,
                f"a config that can untie only {sorted(prefix + t for t in broken)}",
                f"{type(module.config).__name__}, whose tie_word_embeddings "
                + (f"also ties {kept}" if kept else "cannot be saved as False"),
                "serve the adapter unmerged (merge=False): a merged model would not stay untied once saved "
                "and reloaded",
            )
        untying.configs.append((module, name, broken))
    return untying


def _untie(untying: _Untying) -> None:
    """Give each merge target in a tie its own copy of the shared weight (same values, same flags)."""
    with torch.no_grad():
        for tie in untying.ties:
            for _, module, param_name in tie.untied:
                shared = module._parameters[param_name]
                assert shared is not None
                module._parameters[param_name] = nn.Parameter(
                    shared.detach().clone(), requires_grad=shared.requires_grad
                )


def _record_untied(merged: nn.Module, untying: _Untying) -> None:
    """Make the merged model's transformers configs say what its weights are: untied."""
    if not untying.configs:
        return
    broken: set[str] = set()  # targets of the given-up pairs, named in the merged model
    for module, name, pairs in untying.configs:
        config: Any = module.config
        config.tie_word_embeddings = False
        broken.update(f"{name}.{target}" if name else target for target in pairs)
    # The pairs transformers ties without re-reading the config (``tie_weights(recompute_mapping=
    # False)``): gathered at init into ``all_tied_weights_keys`` here and in every model above.
    for owner_name, owner in merged.named_modules():
        tied = getattr(owner, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        prefix = f"{owner_name}." if owner_name else ""
        for target in [t for t in tied if prefix + t in broken]:
            del tied[target]


def merge(peft_model: PeftModel, adapter_name: str) -> nn.Module:
    """Check every layer (:func:`check_mergeable`), break the ties the merge would write through, then
    ``merge_and_unload`` with PEFT's defaults.

    Returns:
        The base model with ``adapter_name`` merged, as PEFT's ``merge_and_unload`` returns it; where
        a merged weight was shared with other modules, the merged layer holds its own copy and the
        config says ``tie_word_embeddings=False``.

    Raises:
        AdapterMergeError: As :func:`check_mergeable`, or a shared weight whose tie cannot be broken
            for good (``tied_modules`` names the modules); the model is unchanged then.
    """
    check_mergeable(peft_model, adapter_name)
    untying = _plan_untying(peft_model, adapter_name)
    _untie(untying)
    merged: nn.Module = peft_model.merge_and_unload()
    _record_untied(merged, untying)
    return merged
