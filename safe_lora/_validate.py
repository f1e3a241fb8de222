"""Check an adapter's files against what a model expects, without a second copy of any weights.

The safetensors header is read without loading a tensor and compared with the keys and shapes
the injected (still empty) adapter expects; values are checked for NaN/inf once loaded, dtypes
against what the tuner's tensors can be, and for an adapter that changes nothing. Whether the model
is the base the adapter was trained on is judged from evidence (:func:`base_model_evidence`), not
from names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn

from safe_lora._config import peft_type_name, rewrites_base, special_file
from safe_lora.errors import (
    AdapterWeightsError,
    NoOpAdapterWarning,
    UnsafeAdapterError,
    _fmt_keys,
    _user_stacklevel,
)

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the safetensors header describes it."""

    dtype: str
    shape: Shape


def _refuse_special(path: Path) -> None:
    """Raise unless ``path`` is a regular file: a FIFO would block the reader, ``/dev/zero`` never end."""
    kind = special_file(path)
    if kind is not None:
        raise AdapterWeightsError(
            f"Adapter weights unreadable: {os.fspath(path)!r} is {kind} — expected the regular file "
            f"save_pretrained writes — replace it with the adapter's weights file.",
            path=path,
        )


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open`` with every way a file can be unreadable turned into one typed error.

    safetensors itself refuses a header that is too large, overflowing shapes, offsets past the
    end, overlapping or with gaps, before any tensor is allocated.
    """
    _refuse_special(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterWeightsError(
            f"Adapter weights unreadable: {os.fspath(path)!r} is not a valid safetensors file ({exc}) — "
            f"expected the file save_pretrained writes — re-save or re-download the adapter.",
            path=path,
        ) from exc


def read_header(path: Path) -> dict[str, HeaderEntry]:
    """Keys, dtypes and shapes of a safetensors file, from its header only (no tensor is read).

    Raises:
        AdapterWeightsError: The file is not readable safetensors (truncated, garbage header, ...).
    """
    with _opened(path) as handle:
        entries = {}
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            view = handle.get_slice(key)
            entries[key] = HeaderEntry(str(view.get_dtype()), tuple(view.get_shape()))
        return entries


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a safetensors file one at a time (memory-mapped, one tensor alive at once).

    Raises:
        AdapterWeightsError: The file is not readable safetensors.
    """
    with _opened(path) as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
            yield key, handle.get_tensor(key)


def base_of(model: nn.Module) -> nn.Module:
    """The base model inside a ``PeftModel`` (or ``model`` itself).

    Unlike ``PeftModel.get_base_model`` this also works once the last adapter was deleted (PEFT
    then keeps a stale active adapter name, and ``get_base_model`` raises ``KeyError``).
    """
    if not isinstance(model, PeftModel):
        return model
    tuner: nn.Module = model.base_model
    if getattr(model, "_is_prompt_learning", False):
        return tuner
    inner = tuner._modules.get("model")
    return inner if inner is not None else tuner


class _LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of an open safetensors file, each read only when asked for."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys: list[str] = list(handle.keys())
        self._known = frozenset(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        tensor: torch.Tensor = self._handle.get_tensor(key)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@contextmanager
def lazy_tensors(path: Path) -> Iterator[Mapping[str, torch.Tensor]]:
    """A read-only mapping of a safetensors file's tensors, read one at a time on access.

    Raises:
        AdapterWeightsError: The file is not readable safetensors.
    """
    with _opened(path) as handle:
        yield _LazyTensors(handle)


def read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load ``adapter_model.bin`` with ``torch.load(weights_only=True)``; only a dict of tensors passes.

    Raises:
        UnsafeAdapterError: The pickle holds objects ``weights_only`` refuses to build (it would
            run code).
        AdapterWeightsError: Not a regular file, unreadable (truncated, garbage), or not a
            ``{str: tensor}`` dict.
    """
    _refuse_special(path)
    where = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise UnsafeAdapterError(
                f"Refusing to unpickle {where!r}: it holds objects that torch.load(weights_only=True) "
                f"will not build ({str(exc).splitlines()[0]}) — expected only tensors — ask for a "
                f"safetensors copy of the adapter; do not load it with weights_only=False unless you "
                f"trust its source.",
                path=path,
            ) from exc
        raise _unreadable_pickle(path, exc) from exc
    except Exception as exc:  # torch.load raises KeyError/EOFError/RuntimeError/... for broken files
        raise _unreadable_pickle(path, exc) from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        found = (
            f"a {type(loaded).__name__}"
            if not isinstance(loaded, dict)
            else "a dict with "
            + ", ".join(sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in loaded.items()})[:5])
        )
        raise AdapterWeightsError(
            f"Adapter weights malformed: {where!r} holds {found} — expected a dict of tensor names to "
            f"tensors, as save_pretrained writes — re-save the adapter with save_pretrained.",
            path=path,
        )
    return dict(loaded)


def _unreadable_pickle(path: Path, exc: BaseException) -> AdapterWeightsError:
    return AdapterWeightsError(
        f"Adapter weights unreadable: {os.fspath(path)!r} is not a readable torch pickle "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}) — expected the file "
        f"save_pretrained writes — re-save or re-download the adapter.",
        path=path,
    )


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
    """
    floats = [(k, t) for k, t in tensors if t.is_floating_point()]
    if not floats:
        return []
    total = sum(float(t.sum() if t.dtype in _SUMMABLE else t.to(torch.float64).sum()) for _, t in floats)
    if math.isfinite(total):
        return []
    return sorted(k for k, t in floats if not bool(torch.isfinite(t).all()))


def check_finite(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise if any floating-point tensor holds NaN or inf.

    Raises:
        AdapterWeightsError: Naming the non-finite keys, sorted (``nonfinite_keys``).
    """
    bad = nonfinite_keys(tensors)
    if bad:
        raise AdapterWeightsError(
            f"Adapter weights hold NaN or inf in {os.fspath(path)!r}: {_fmt_keys(bad)} — expected "
            f"finite values — the adapter's training diverged; use an earlier checkpoint.",
            path=path,
            nonfinite_keys=bad,
        )


# --------------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------------

# The dtypes an adapter's own tensors are trained and saved in (safetensors and torch spellings).
_ADAPTER_DTYPES = frozenset(
    {"F16", "BF16", "F32", "F64", "torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"}
)
# Index buffers PEFT saves as integers: SHiRA, SuperTuning, UniLoRA (save_indices), FRoD
# (save_projection), VBLoRA (save_only_topk_weights).
INTEGER_SLOTS = frozenset(
    {
        "shira_indices",
        "supertuning_indices",
        "unilora_indices_A",
        "unilora_indices_B",
        "frod_s_indices",
        "frod_s_size",
        "vblora_logits_A_topk_indices",
        "vblora_logits_B_topk_indices",
    }
)
# Adapter tensors of tuners whose layers declare no parameter names, and VBLoRA's top-k weights.
_FLOAT_NAMES = frozenset(
    {
        "prompt_embeddings",
        "prefix_task_cols",
        "prefix_task_rows",
        "adaption_gate",
        "adaption_prompt",
        "trainable_tokens_delta",
        "vblora_logits_A_topk_weights",
        "vblora_logits_B_topk_weights",
    }
)
# Dtypes no torch layer keeps as its `weight` or `bias` (int8/uint8 remain: bitsandbytes storage
# of a quantized module saved whole).
_NEVER_WEIGHT_DTYPES = frozenset(
    {"BOOL", "I16", "U16", "I32", "U32", "I64", "U64", "C64"}
    | {f"torch.{n}" for n in ("bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "complex64")}
    | {"torch.complex128", "torch.complex32"}
)


def tuner_class(peft_type: str) -> Any | None:
    """PEFT's tuner (model) class for a PEFT type name such as ``"LORA"``, or ``None``."""
    # Keys are PeftType members, a str enum: equal to their plain names.
    return next((cls for kind, cls in PEFT_TYPE_TO_TUNER_MAPPING.items() if kind == peft_type), None)


def layer_param_names(tuner_cls: Any) -> frozenset[str]:
    """The attribute names under which a tuner's layers (and their subclasses) hold adapter tensors."""
    layer_cls = getattr(tuner_cls, "tuner_layer_cls", None)
    if layer_cls is None:
        return frozenset()
    names: set[str] = set()
    pending = [layer_cls]
    while pending:  # subclasses too: AdaLoRA's layers add lora_E to LoraLayer's names, say
        cls = pending.pop()
        names.update(getattr(cls, "adapter_layer_names", ()))
        names.update(getattr(cls, "other_param_names", ()))
        pending.extend(cls.__subclasses__())
    return frozenset(names)


def wrong_dtypes(config: PeftConfig, header: Mapping[str, HeaderEntry]) -> dict[str, str]:
    """The keys whose dtype the adapter cannot hold, with that dtype (``{key: "I32"}``), sorted.

    The adapter's own tensors (those under the tuner's layer attribute names, and prompt
    embeddings) must be float16/bfloat16/float32/float64 -- what PEFT trains and saves -- except the
    index buffers PEFT saves as integers (:data:`INTEGER_SLOTS`). A float tensor relabelled as
    ``I32`` in the header has the same bytes and shape, and PEFT would load it and fail at the first
    forward. Modules saved whole (``modules_to_save``, embedding layers) may hold integer buffers,
    but never a ``weight`` or ``bias`` of bool or integers wider than 8 bits.
    """
    peft_type = peft_type_name(config)
    names = layer_param_names(tuner_class(peft_type)) | _FLOAT_NAMES
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


def dtype_message(path: Path, bad: Mapping[str, str]) -> str:
    """The refusal for :func:`wrong_dtypes`' findings, naming the keys and their dtypes."""
    shown = _fmt_keys(f"{k} ({v})" for k, v in bad.items())
    return (
        f"Adapter weights have dtypes the adapter cannot hold in {os.fspath(path)!r}: {shown} — "
        f"expected float16/bfloat16/float32/float64 adapter tensors (integer only for index buffers) "
        f"— the file is corrupt or was edited; re-save or re-download the adapter."
    )


def check_dtypes(path: Path, config: PeftConfig, header: Mapping[str, HeaderEntry]) -> None:
    """Raise if a tensor's dtype is one the adapter cannot hold (see :func:`wrong_dtypes`).

    Raises:
        AdapterWeightsError: Naming the keys and their dtypes (``wrong_dtypes``).
    """
    bad = wrong_dtypes(config, header)
    if bad:
        raise AdapterWeightsError(dtype_message(path, bad), path=path, wrong_dtypes=bad)


# --------------------------------------------------------------------------------------------------
# An adapter that changes nothing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _NoOpRule:
    """How to tell from a tuner's saved tensors alone that it changes nothing.

    A factor is ``"slot"`` (the tensor is the slot), ``"slot.leaf"`` (e.g. ``"lora_B.weight"``) or
    ``"slot.*"`` (any leaf), matched against the key after the module path.

    Attributes:
        terms: Each term is a product of factors; in each module, every term present must have a
            factor that is all zero (LoRA's ``lora_B`` as it is initialised).
        ones: Factors that must be all one (multiplicative identities: IA3's scale, BOFT's ``s``).
        neutral: Slots whose values do not matter once the terms are zero (input factors, shared
            random projections, routers).
    """

    terms: tuple[tuple[str, ...], ...] = ()
    ones: tuple[str, ...] = ()
    neutral: tuple[str, ...] = ()
    slots: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        specs = [f for term in self.terms for f in term] + list(self.ones) + list(self.neutral)
        object.__setattr__(self, "slots", frozenset(s.split(".", 1)[0] for s in specs))

    def factor(self, slot: str, leaf: str) -> str | None:
        """The factor (or neutral slot) a tensor at ``slot`` / ``leaf`` is, or ``None`` if unknown."""
        if slot in self.neutral:
            return slot
        for spec in (*(f for term in self.terms for f in term), *self.ones):
            name, _, want = spec.partition(".")
            if name == slot and (want == leaf or want == "*"):
                return spec
        return None


_GLORA_TERMS = tuple(
    term
    for x in "ABCDE"
    for term in ((f"glora_{x}.Xd", f"glora_{x}.Xu"), (f"glora_{x}.X",), (f"glora_{x}.zeros",))
)

# Read from each tuner's layer code in peft/tuners/*/layer.py (init and forward). Tuners without a
# rule that can be judged from the file alone are left out: DoRA (the magnitude must equal the base
# weight's norm), HRA, OSF, PSOFT, FRoD, DeFT, AdaMSS (they reparametrise the base weight), LN
# tuning and modules_to_save (whole copies), trainable tokens (new embedding rows), VBLoRA,
# SHADOW, X-LoRA and the prompt-learning methods (they always change the input).
NOOP_RULES: dict[str, _NoOpRule] = {
    # result + B(A(x)) * s (+ B's bias); embeddings: A is the zero-initialised one
    "LORA": _NoOpRule(
        terms=(("lora_A.weight", "lora_B.weight"), ("lora_B.bias",), ("lora_embedding_A", "lora_embedding_B"))
    ),
    "ADALORA": _NoOpRule(terms=(("lora_A", "lora_B", "lora_E"),)),  # B @ (A * E); E starts at zero
    "IA3": _NoOpRule(ones=("ia3_l",)),  # the output (or input) scaled by l; l starts at one
    # (w1a @ w1b) * (w2a @ w2b), optionally with Tucker cores: every factor multiplies
    "LOHA": _NoOpRule(terms=(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),)),
    # kron(w1 | w1_a @ w1_b, w2 | w2_a @ w2_b | t2 x w2_a x w2_b)
    "LOKR": _NoOpRule(
        terms=(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),)
    ),
    "VERA": _NoOpRule(terms=(("vera_lambda_b", "vera_lambda_d"),), neutral=("vera_A", "vera_B")),
    # lambda_d feeds a sampled latent (noise even at zero): only lambda_b silences it
    "PVERA": _NoOpRule(terms=(("pvera_lambda_b",),), neutral=("pvera_lambda_d", "pvera_A", "pvera_B")),
    "RANDLORA": _NoOpRule(
        terms=(("randlora_lambda", "randlora_gamma"),), neutral=("randlora_A", "randlora_B")
    ),
    "FOURIERFT": _NoOpRule(terms=(("fourierft_spectrum",),)),
    "WAVEFT": _NoOpRule(terms=(("waveft_spectrum",),)),
    "C3A": _NoOpRule(terms=(("c3a_kernel",),)),
    "HIRA": _NoOpRule(terms=(("hira_A", "hira_B"), ("hira_embedding_A", "hira_embedding_B"))),
    "GRALORA": _NoOpRule(
        terms=(("gralora_A", "gralora_B"), ("gralora_A_general.weight", "gralora_B_general.weight"))
    ),
    "POLY": _NoOpRule(terms=(("poly_lora_A", "poly_lora_B"),), neutral=("poly_router",)),
    "LILY": _NoOpRule(terms=(("lily_A.weight", "lily_B.weight"),), neutral=("lily_router",)),
    "DELORA": _NoOpRule(terms=(("delora_A", "delora_B", "delora_lambda"),), neutral=("delora_w_norm",)),
    "MISS": _NoOpRule(terms=(("miss_block",),)),  # x-blocks @ miss, or W @ miss + miss ("bat")
    "PEANUT": _NoOpRule(
        terms=(("peanut_B.weight",),), neutral=("peanut_A", "peanut_encoders", "peanut_decoders")
    ),
    "SHIRA": _NoOpRule(terms=(("shira_weight",),), neutral=("shira_indices",)),
    "SUPERTUNING": _NoOpRule(
        terms=(("supertuning_values",), ("supertuning_lora_A.weight", "supertuning_lora_B.weight")),
        neutral=("supertuning_indices",),
    ),
    # R = sum_i v_i P_i between B and A; the v vectors are shared by the whole model
    "TINYLORA": _NoOpRule(terms=(("tinylora_v.*",),), neutral=("tinylora_A", "tinylora_B", "tinylora_P")),
    # A and B are gathered from the shared theta_d
    "UNILORA": _NoOpRule(
        terms=(("unilora_theta_d",),),
        neutral=("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    ),
    "BEFT": _NoOpRule(terms=(("beft_bias",),)),
    "GLORA": _NoOpRule(terms=_GLORA_TERMS),  # W + W*A + B, b + b*D + E + W@C
    # rotations: a zero skew-symmetric generator is the identity
    "BOFT": _NoOpRule(terms=(("boft_R",),), ones=("boft_s",)),
    "OFT": _NoOpRule(terms=(("oft_R.weight",), ("oft_embedding_R.weight",))),
    "ROAD": _NoOpRule(terms=(("road_theta",),), ones=("road_alpha",)),
    "ADAPTION_PROMPT": _NoOpRule(terms=(("adaption_gate",),), neutral=("adaption_prompt",)),
}


def noop_adapter(config: PeftConfig, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether loading these saved tensors with this config provably changes nothing.

    True when every module's output factor is exactly zero (LoRA's ``lora_B``, AdaLoRA's
    ``lora_E``, VeRA's ``lambda_b``, ...) or at its identity value (IA3's scale at one, a BOFT/OFT
    rotation generator at zero), per the tuner's rule in :data:`NOOP_RULES`. False whenever the file
    holds a tensor the rule does not cover (``modules_to_save``, a DoRA magnitude, biases, a variant's
    extra tensors), for tuners without a rule, and for configs that change the model by themselves
    (``layer_replication``, inits that rewrite the base weights). Tensors are only read as far as
    needed: a trained adapter answers after its first module.

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


def warn_if_noop(config: PeftConfig, tensors: Mapping[str, torch.Tensor], *, name: str, path: Path) -> None:
    """Warn with :class:`NoOpAdapterWarning` when :func:`noop_adapter` says the adapter changes nothing."""
    if noop_adapter(config, tensors):
        subject = f"Adapter {name!r} from {os.fspath(path)!r}"
        warnings.warn(noop_message(config, subject), NoOpAdapterWarning, stacklevel=_user_stacklevel())


@dataclass
class Expected:
    """The adapter keys and shapes a model with the adapter injected holds, in saved form."""

    peft_model: PeftModel
    adapter_name: str
    shapes: dict[str, Shape]

    def optional(self) -> set[str]:
        """Keys PEFT also accepts when the adapter was saved with its embedding layers.

        Computed only when the file has keys beyond :attr:`shapes`: it walks the model again.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Could not identify embedding layer(s)": irrelevant
            state = get_peft_model_state_dict(
                self.peft_model, adapter_name=self.adapter_name, save_embedding_layers=True
            )
        return set(state) - set(self.shapes)


def expected_keys(peft_model: PeftModel, adapter_name: str) -> Expected:
    """What ``save_pretrained`` would write for ``adapter_name``: keys (adapter name removed) and shapes.

    Works on a model whose adapter weights are still empty (meta): only shapes are read.
    """
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
    return Expected(peft_model, adapter_name, {k: tuple(v.shape) for k, v in state.items()})


def compare(
    header: dict[str, HeaderEntry], expected: Expected, *, path: Path, strict: bool
) -> tuple[list[str], list[str]]:
    """Compare the file's keys and shapes with what the model expects.

    Returns:
        ``(missing, unexpected)``, sorted — only non-empty when ``strict`` is false.

    Raises:
        AdapterWeightsError: A shape differs (always), or keys are missing/unexpected and ``strict``.
    """
    missing = sorted(set(expected.shapes) - set(header))
    unexpected = sorted(set(header) - set(expected.shapes))
    if unexpected:
        unexpected = sorted(set(unexpected) - expected.optional())
    mismatched = {
        key: (header[key].shape, shape)
        for key, shape in expected.shapes.items()
        if key in header and header[key].shape != shape
    }
    where = os.fspath(path)
    if mismatched:
        detail = "; ".join(
            f"{k}: file {list(a)} vs model {list(b)}" for k, (a, b) in sorted(mismatched.items())
        )
        raise AdapterWeightsError(
            f"Adapter weights have the wrong shape for this base model in {where!r}: {detail} — "
            f"expected the shapes the config's targets give on this model — load the adapter into the "
            f"base model it was trained on.",
            path=path,
            mismatched_keys=mismatched,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) the config's targets expect: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) nothing consumes: {_fmt_keys(unexpected)}")
        raise AdapterWeightsError(
            f"Adapter weights do not match the config in {where!r}: {'; '.join(parts)} — a partial "
            f"adapter silently does less than it should — re-save the adapter, check that it belongs to "
            f"this base model, or pass strict=False to load what fits with a warning.",
            path=path,
            missing_keys=missing,
            unexpected_keys=unexpected,
        )
    return missing, unexpected


# The parts of a transformers config that say which network a checkpoint is. Vocabulary size is
# left out on purpose: resizing the embeddings (added tokens) keeps the base the same.
_ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
_SAVED_PREFIX = "base_model.model."
_LORA_FACTORS = ("lora_A", "lora_B")


def base_model_evidence(
    model: nn.Module,
    config: Any,
    header: Mapping[str, HeaderEntry],
    *,
    trained_on: str,
    loading_into: str,
) -> list[str]:
    """Evidence that ``model`` is not the base the adapter was trained on; empty when none disagrees.

    A different name alone is no evidence: ``"org/base"``, a local mirror of it and a copied folder
    are the same weights. So when ``trained_on`` (the adapter's ``base_model_name_or_path``) and
    ``loading_into`` (the model's name) differ, two things are compared instead:

    - the recorded base's own ``config.json`` -- read only from a local folder or the local
      Hugging Face cache, never the network -- against ``model.config``: ``model_type`` and the
      layer sizes and counts;
    - the shapes the adapter's LoRA factors imply against the modules they target: ``lora_A`` is
      ``(r, in_features)``, ``lora_B`` is ``(out_features, r)``, and their module must exist.

    When neither disagrees the difference is logged at debug level only.

    Args:
        model: The model the adapter is loaded into (a base model or a ``PeftModel``).
        config: The adapter's PEFT config.
        header: The weights file's keys and shapes (see :func:`read_header`).
        trained_on: The adapter's recorded base model name or path ("" when none).
        loading_into: The model's own name or path ("" when unknown).

    Returns:
        One line per disagreement, e.g. ``"model_type: the adapter's base is 'mistral', this model
        is 'llama'"``; empty when the names agree or unknown, or nothing else disagrees.

    Example:
        >>> base_model_evidence(llama, config, header, trained_on="org/mistral", loading_into="org/llama")
        ... # doctest: +SKIP
        ["model_type: the adapter's base is 'mistral', this model is 'llama'"]
    """
    if not trained_on or not loading_into or trained_on == loading_into:
        return []
    base = base_of(model)
    evidence = _config_evidence(base, trained_on, getattr(config, "revision", None))
    evidence += _shape_evidence(base, config, header)
    if not evidence:
        logger.debug(
            "Adapter trained on %r is loaded into %r: different names, but the recorded base's config "
            "(where readable locally) and the adapter's shapes agree with this model.",
            trained_on,
            loading_into,
        )
    return evidence


def _recorded_config(name: str, revision: str | None) -> dict[str, Any] | None:
    """The ``config.json`` of the base the adapter names, from a folder or the local HF cache only."""
    folder = Path(name)
    file: str | os.PathLike[str] | None = folder / "config.json" if folder.is_dir() else None
    if file is None:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a valid repo id either: nothing to read
            return None
        file = cached if isinstance(cached, str) else None
    if file is None:
        return None
    try:
        raw = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def _config_evidence(base: nn.Module, trained_on: str, revision: str | None) -> list[str]:
    recorded = _recorded_config(trained_on, revision)
    ours = getattr(base, "config", None)
    if recorded is None or ours is None:
        return []
    found = []
    for name in _ARCHITECTURE_FIELDS:
        theirs, mine = recorded.get(name), getattr(ours, name, None)
        if theirs is not None and mine is not None and theirs != mine:
            found.append(f"{name}: the adapter's base is {theirs!r}, this model's is {mine!r}")
    return found


def _shape_evidence(base: nn.Module, config: Any, header: Mapping[str, HeaderEntry]) -> list[str]:
    # Factors whose shapes are not (r, in) / (out, r) of the target: LoRA on parameters (experts),
    # block-diagonal LoRA. Only plain ".weight" factors of Linear-like modules are read.
    if getattr(config, "target_parameters", None) or getattr(config, "use_bdlora", None):
        return []
    missing: set[str] = set()
    wrong: dict[str, str] = {}
    for key, entry in header.items():
        if not key.startswith(_SAVED_PREFIX) or len(entry.shape) != 2:
            continue
        parts = key[len(_SAVED_PREFIX) :].split(".")
        index = next((i for i, part in enumerate(parts) if part in _LORA_FACTORS), None)
        if index is None or parts[index + 1 :] != ["weight"]:
            continue
        path = ".".join(p for p in parts[:index] if p != "base_layer")
        try:
            module = base.get_submodule(path)
        except AttributeError:
            missing.add(path)
            continue
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if parts[index] == "lora_A":
            side, expected, found = "in_features", getattr(layer, "in_features", None), entry.shape[1]
        else:
            side, expected, found = "out_features", getattr(layer, "out_features", None), entry.shape[0]
        if isinstance(expected, int) and expected != found:
            wrong[f"{path}.{side}"] = f"{found} in the adapter, {expected} here"
    found_lines = []
    if missing:
        found_lines.append(
            f"the adapter holds LoRA weights for modules this model lacks: {_fmt_keys(missing)}"
        )
    if wrong:
        shown = sorted(wrong.items())
        detail = ", ".join(f"{k} ({v})" for k, v in shown[:3])
        more = f", ... ({len(shown) - 3} more)" if len(shown) > 3 else ""
        found_lines.append(f"LoRA shapes imply other layer sizes: {detail}{more}")
    return found_lines
