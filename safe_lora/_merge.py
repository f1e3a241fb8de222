"""Merge an adapter into the base weights only once every layer is known to merge.

PEFT merges layer by layer, in place (``base_layer.weight.data += delta``): a layer that fails half
way leaves the earlier ones merged, and undoing that exactly would need a copy of every merged
weight. So each layer first merges a *copy of itself* -- the same PEFT code on the same real tensors
(quantized ones included: a bitsandbytes weight is dequantized, merged and re-quantized as it would
be), one layer at a time, so the extra memory is one layer's. Only when all of them succeed does
PEFT's own ``merge_and_unload`` run on the model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from peft import PeftModel
from torch import nn

from safe_lora._peft import BaseTunerLayer, layer_adapters, peft_type_name
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
            ) from exc
        finally:
            del trial


def merge(peft_model: PeftModel, adapter_name: str) -> nn.Module:
    """Check every layer (:func:`check_mergeable`), then ``merge_and_unload`` with PEFT's defaults.

    Returns:
        The base model with ``adapter_name`` merged, exactly as PEFT's ``merge_and_unload`` returns it.

    Raises:
        AdapterMergeError: As :func:`check_mergeable`; the model is unchanged then.
    """
    check_mergeable(peft_model, adapter_name)
    merged: nn.Module = peft_model.merge_and_unload()
    return merged
