"""Fidelity matrix (issue 9): every load safe_lora does is raw PEFT's load, bit for bit.

The contract: for the same call, the model safe_lora returns holds exactly the tensors (same keys,
same dtypes, ``torch.equal`` values) and gives exactly the outputs -- from the very first forward --
of what raw PEFT returns with its default options, apart from what safe_lora documents it changes
(modules' ``training`` flags, ``requires_grad``, dropout rates; ``dropout=0.0`` swaps dropout layers
for ``nn.Identity``, which holds no tensors). The references:

* ``load_for_inference``: ``PeftModel.from_pretrained(base, path).eval()``;
* ``load_for_training``: ``PeftModel.from_pretrained(base, path, is_trainable=True).train()``, both
  run inside ``deterministic_lora``, outputs and one training step (loss, gradients) compared;
* ``merge=True``: ``PeftModel.from_pretrained(base, path).merge_and_unload()``;
* ``load_adapter`` + ``use_adapter``: ``PeftModel.load_adapter`` + ``set_adapter``;
* a ``{name: path}`` mapping: ``from_pretrained`` of the first, ``load_adapter`` of the rest;
* an explicit PEFT option (``low_cpu_mem_usage=True``, ``autocast_adapter_dtype=False``) is passed to
  both sides.

Bases: the tiny Llama in fp32, bf16, fp16, bitsandbytes 4-bit (fp32 and bf16 compute) and 8-bit,
each built once per module and deep-copied for each side. Adapters: every LoRA variant and init
``LoraConfig`` offers in peft 0.21 (``VARIANTS``), saved by ``save_pretrained`` with non-trivial
weights and a non-zero dropout rate, created on the base they are loaded into (as a QLoRA or PiSSA
user does) -- and, for a subset, created on fp32 and served on the others. Every other tuner of
PEFT's mapping (``TUNERS``) goes through ``load_for_inference`` on fp32.

A cell is skipped only with a reason: ``PEFT_LIMITS`` (raw PEFT cannot run it -- confirmed on every
run, and a listed cell that raw PEFT starts to run fails) or ``MEANINGLESS`` (it would repeat another
cell). A cell where raw PEFT itself is broken (``RAW_BROKEN``) is a strict xfail that expects exactly
that breakage, so a safe_lora difference in it still fails.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import BASE_KINDS, QUANTIZABLE, quantizable_llama, save_adapter, tiny_llama_as
from peft import LoraConfig, PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from safe_lora import (
    AdapterMergeError,
    AdapterWeightsError,
    deterministic_lora,
    load_adapter,
    load_for_inference,
    load_for_training,
    use_adapter,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",  # PEFT's notes (rounding on 4-bit merges, bnb casts, ...): not the subject here
    "ignore::FutureWarning",
)

SEED = 0
# Token ids 1-3 are the trainable tokens' indices and 5, 6 the aLoRA invocation sequence, so every
# variant's adapter takes part in the output.
IDS = torch.tensor([[1, 9, 5, 6, 2, 40, 3, 17], [7, 5, 6, 3, 12, 1, 63, 2]])
QV = ["q_proj", "v_proj"]


def lora(**fields: Any) -> Callable[[], PeftConfig]:
    """A LoRA config on q/v with a non-zero dropout rate, ``fields`` overriding."""
    defaults: dict[str, Any] = {"target_modules": QV, "r": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    return lambda: LoraConfig(**{**defaults, **fields})


# Every LoRA variant (``is_lora_variant`` fields, ``init_lora_weights`` options) and option of
# peft 0.21's LoraConfig that changes what is built or loaded. Not here: megatron_config (needs
# Megatron), ensure_weight_tying (needs tied embeddings; this Llama's are not), fan_in_fan_out and
# bias (Llama's projections are bias-free nn.Linear), ephemeral_gpu_offload (needs a GPU), and
# selectors that only choose targets (exclude_modules, layers_to_transform).
VARIANTS: dict[str, Callable[[], PeftConfig]] = {
    "lora": lora(init_lora_weights=False),
    "rslora": lora(use_rslora=True),
    "dora": lora(use_dora=True),
    "gaussian": lora(init_lora_weights="gaussian"),
    "all-linear": lora(target_modules="all-linear"),
    "embedding": lora(target_modules=["embed_tokens", "q_proj"]),
    "dora-embedding": lora(target_modules=["embed_tokens", "v_proj"], use_dora=True),
    "lora-bias": lora(lora_bias=True),
    "rank-pattern": lora(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}),
    "modules-to-save": lora(modules_to_save=["lm_head"]),
    "trainable-tokens": lora(trainable_token_indices=[1, 2, 3]),
    "monteclora": lora(monteclora_config=peft.MontecloraConfig()),
    "kasa": lora(kasa_config=peft.KasaConfig()),
    "pissa": lora(init_lora_weights="pissa"),
    "pissa-niter": lora(init_lora_weights="pissa_niter_2"),
    "olora": lora(init_lora_weights="olora"),
    "orthogonal": lora(init_lora_weights="orthogonal"),
    "mica": lora(init_lora_weights="mica"),
    "eva": lora(init_lora_weights="eva"),
    "lora-ga": lora(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig()),
    "corda": lora(init_lora_weights="corda"),
    "loftq": lora(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4)),
    "velora": lora(velora_config=peft.VeloraConfig()),
    "alora": lora(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"),
    "bdlora": lora(
        use_bdlora=peft.BdLoraConfig(
            target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"], nblocks=2
        )
    ),
    "arrow": lora(arrow_config=peft.ArrowConfig(top_k=1)),
    "qalora": lora(use_qalora=True, qalora_group_size=8),
    "layer-replication": lora(layer_replication=[[0, 2], [1, 2]]),
    # Regular expressions, which safe_lora resolves to explicit names under a time bound before PEFT
    # sees the config (safe_lora._patterns): the model must be the one PEFT's own matching gives.
    "regex-targets": lora(target_modules=r".*\.(q|v)_proj"),
    "regex-exclude": lora(
        target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=r".*\.0\.self_attn\.o_proj"
    ),
    "regex-rank-alpha": lora(
        rank_pattern={r"^model\.layers\.1\.self_attn\.v_proj": 2, "q_proj": 6},
        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 4},
    ),
    "layers-pattern": lora(layers_to_transform=[1], layers_pattern="layers"),
    "replication-regex": lora(
        layer_replication=[[0, 2], [1, 2]], target_modules=r".*layers\.[23]\..*(q|v)_proj"
    ),
    # PEFT refuses a dropout rate on a targeted parameter ("lora.ParamWrapper does not work with
    # lora_dropout != 0").
    "target-parameters": lora(target_modules=[], target_parameters=["q_proj.weight"], lora_dropout=0.0),
}


# The variants whose replicas share their base weights (merged into own copies: see check_merge).
REPLICATIONS = ("layer-replication", "replication-regex")

# Every other tuner of PEFT_TYPE_TO_CONFIG_MAPPING, sized for the tiny Llama, every dropout rate
# non-zero; compared through load_for_inference on the fp32 base (test_every_tuner_...).
TUNERS: dict[str, Callable[[], PeftConfig]] = {
    "adalora": lambda: peft.AdaLoraConfig(target_modules=QV, lora_dropout=0.1, total_step=10, init_r=4),
    "adamss": lambda: peft.AdamssConfig(target_modules=QV),
    "adaption-prompt": lambda: peft.AdaptionPromptConfig(
        adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"
    ),
    "beft": lambda: peft.BeftConfig(target_modules=QV),
    "boft": lambda: peft.BOFTConfig(target_modules=QV, boft_dropout=0.1, boft_block_size=4),
    "c3a": lambda: peft.C3AConfig(target_modules=QV, block_size=8),
    "cartridge": lambda: peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "cpt": lambda: peft.CPTConfig(task_type="CAUSAL_LM"),
    "deft": lambda: peft.DeftConfig(target_modules=QV, deft_dropout=0.1),
    "delora": lambda: peft.DeloraConfig(target_modules=QV, module_dropout=0.1),
    "fourierft": lambda: peft.FourierFTConfig(target_modules=QV, n_frequency=64),
    "frod": lambda: peft.FrodConfig(target_modules=QV, frod_dropout=0.1),
    "glora": lambda: peft.GloraConfig(target_modules=QV),
    "gralora": lambda: peft.GraloraConfig(target_modules=QV, gralora_dropout=0.1),
    "hira": lambda: peft.HiraConfig(target_modules=QV, hira_dropout=0.1),
    "hra": lambda: peft.HRAConfig(target_modules=QV),
    "ia3": lambda: peft.IA3Config(target_modules=[*QV, "down_proj"], feedforward_modules=["down_proj"]),
    "lily": lambda: peft.LilyConfig(target_modules=QV),
    "ln-tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm"]),
    "loha": lambda: peft.LoHaConfig(target_modules=QV, rank_dropout=0.1, module_dropout=0.1),
    "lokr": lambda: peft.LoKrConfig(target_modules=QV, rank_dropout=0.1, module_dropout=0.1),
    "miss": lambda: peft.MissConfig(target_modules=QV, miss_dropout=0.1, r=4, mini_r=4),
    "multitask-prompt-tuning": lambda: peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2
    ),
    "oft": lambda: peft.OFTConfig(target_modules=QV, module_dropout=0.1, r=0, oft_block_size=4),
    "osf": lambda: peft.OSFConfig(target_modules=QV),
    "p-tuning": lambda: peft.PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        encoder_reparameterization_type="LSTM",
        encoder_dropout=0.1,
        encoder_num_layers=2,
        encoder_hidden_size=16,
    ),
    "peanut": lambda: peft.PeanutConfig(target_modules=QV),
    "poly": lambda: peft.PolyConfig(target_modules=QV, n_tasks=2),
    "prefix-tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prompt-tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "psoft": lambda: peft.PsoftConfig(target_modules=QV, psoft_dropout=0.1, r=4),
    "pvera": lambda: peft.PveraConfig(target_modules=QV, pvera_dropout=0.1),
    "randlora": lambda: peft.RandLoraConfig(target_modules=QV, randlora_dropout=0.1),
    "road": lambda: peft.RoadConfig(target_modules=QV, group_size=8),
    "shadow": lambda: peft.ShadowConfig(shadow_dropout=0.1),
    "shira": lambda: peft.ShiraConfig(target_modules=QV, r=2),
    "supertuning": lambda: peft.SupertuningConfig(target_modules=QV, lora_dropout=0.1, r=4),
    "tinylora": lambda: peft.TinyLoraConfig(target_modules=QV, tinylora_dropout=0.1),
    "trainable-tokens": lambda: peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[1, 2, 3]
    ),
    "unilora": lambda: peft.UniLoraConfig(target_modules=QV, unilora_dropout=0.1),
    "vblora": lambda: peft.VBLoRAConfig(
        target_modules=QV, vblora_dropout=0.1, vector_length=4, num_vectors=8
    ),
    "vera": lambda: peft.VeraConfig(target_modules=QV, vera_dropout=0.1),
    "waveft": lambda: peft.WaveFTConfig(target_modules=QV, n_frequency=64),
}
CONFIGS = {**VARIANTS, **{f"tuner-{name}": config for name, config in TUNERS.items()}}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.detach().clone()  # type: ignore[no-any-return]


TASKS = torch.tensor([0, 1])  # Poly and multitask prompt tuning route by task: one id per row


def task_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, task_ids=TASKS).logits.detach().clone()  # type: ignore[no-any-return]


def poly_logits(model: nn.Module) -> torch.Tensor:
    # PeftModel.forward calls the base model directly, past PolyModel.forward that takes task_ids.
    with torch.no_grad():
        return model.base_model(input_ids=IDS, task_ids=TASKS).logits.detach().clone()  # type: ignore[no-any-return]


RUNS: dict[str, Callable[[nn.Module], torch.Tensor]] = {
    "tuner-poly": poly_logits,
    "tuner-multitask-prompt-tuning": task_logits,
}
XLORA = "tuner-xlora"


# --------------------------------------------------------------------------------------------------
# The lab: bases built once per module, adapters saved once per (base, config, seed)
# --------------------------------------------------------------------------------------------------


class Lab:
    """Builds each base kind once and hands out deep copies; saves each adapter once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "tiny-llama"
        quantizable_llama().save_pretrained(self.folder)
        self._bases: dict[str, nn.Module] = {}
        self._adapters: dict[tuple[str, str, int], Path | Exception] = {}

    def base(self, kind: str) -> Any:
        if kind not in self._bases:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._bases[kind] = tiny_llama_as(kind, self.folder)
        model = copy.deepcopy(self._bases[kind])
        model.config.use_cache = False  # X-LoRA refuses a cache; the forwards here run without one
        return model

    def config(self, name: str) -> PeftConfig:
        if name != XLORA:
            return CONFIGS[name]()
        # X-LoRA mixes LoRA adapters saved before it, named by their folders.
        experts = {str(seed): str(self.adapter("fp32", "lora", seed)) for seed in (0, 1)}
        return peft.XLoraConfig(
            task_type="CAUSAL_LM",
            hidden_size=QUANTIZABLE["hidden_size"],
            adapters=experts,
            xlora_depth=2,
            xlora_dropout_p=0.1,
        )

    def adapter(self, kind: str, name: str, seed: int = 0) -> Path:
        """Adapter ``name`` created on base ``kind`` by get_peft_model, nudged off its init, saved."""
        key = (kind, name, seed)
        if key not in self._adapters:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._adapters[key] = save_adapter(
                        self.base(kind),
                        self.config(name),
                        self.root / f"{kind}-{name}-{seed}",
                        train_steps=1,
                        seed=seed,
                    )
            except Exception as exc:  # raised again for every cell that needs it, inside raw_peft
                self._adapters[key] = exc
        found = self._adapters[key]
        if isinstance(found, Exception):
            raise found
        return found


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and on a busy 2-core machine two OpenMP threads
    spin-wait every matmul into ~1000x its cost. Both sides of every comparison run alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return Lab(tmp_path_factory.mktemp("fidelity"))


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


class RawPeftBroken(AssertionError):
    """Raw PEFT itself fails or differs from itself: the reference is not a reference."""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not (a.is_meta or b.is_meta) and a.dtype == b.dtype and torch.equal(a, b)


def _describe(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.is_meta or b.is_meta:
        return f"{a.device} vs {b.device}"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.is_floating_point():
        return f"max |diff| {float((a.double() - b.double()).abs().max()):.3g}"
    return f"{int((a != b).sum())} element(s) differ"


def assert_same_tensors(ours: nn.Module, ref: nn.Module, when: str) -> None:
    """Same state-dict keys, and every tensor the same dtype and ``torch.equal``."""
    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b), (
        f"{when}: keys differ: only ours {sorted(set(a) - set(b))}, only PEFT's {sorted(set(b) - set(a))}"
    )
    diff = {k: _describe(a[k], b[k]) for k in sorted(a) if not _same(a[k], b[k])}
    assert not diff, f"{when}: {len(diff)} of {len(a)} tensors differ from raw PEFT's: {diff}"


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert _same(ours, ref), f"{what} differs from raw PEFT's: {_describe(ours, ref)}"


def on_raw(run: Callable[[nn.Module], Any], ref: nn.Module) -> Any:
    try:
        return run(ref)
    except Exception as exc:
        raise RawPeftBroken(f"raw PEFT's own forward fails: {type(exc).__name__}: {exc}") from exc


def assert_same_outputs(ours: nn.Module, ref: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> None:
    """The first forward of each (seeded alike) equal; our second equals PEFT's first; PEFT repeats."""
    torch.manual_seed(SEED)
    ref_first = on_raw(run, ref)
    torch.manual_seed(SEED)
    our_first = run(ours)
    ref_second = on_raw(run, ref)
    if not _same(ref_second, ref_first):
        raise RawPeftBroken(
            f"raw PEFT's second forward differs from its first: {_describe(ref_second, ref_first)}"
        )
    our_second = run(ours)
    assert_same(our_first, ref_first, "the first forward")
    assert_same(our_second, ref_first, "the second forward")


# --------------------------------------------------------------------------------------------------
# Where raw PEFT itself cannot go
# --------------------------------------------------------------------------------------------------

ANY = "*"
BNB = ("bnb4-fp32", "bnb4-bf16", "bnb8")
Key = tuple[str, str, str]  # (base kind, adapter, loader with its options); ANY matches every value

# Why raw PEFT cannot run a cell. Confirmed on every run: the cell runs raw PEFT and skips only if it
# really fails; a listed cell that raw PEFT starts to run fails, so the table cannot go stale.
PEFT_LIMITS: dict[Key, str] = {
    (ANY, "corda", ANY): "CorDA needs the `eigens` preprocess_corda attaches to every target layer, at "
    "creation and again at load (peft/tuners/lora/layer.py:518); a CorDA adapter is shared converted to "
    "plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...))",
    (ANY, "loftq", ANY): "loftq_init quantizes the base weight on CUDA (peft/utils/loftq_utils.py:70), and "
    "LoraConfig(init_lora_weights='loftq') wants scipy; the matrix runs on CPU",
    (ANY, "arrow", ANY): "an Arrow router is composed by create_arrow_model from loaded task adapters, "
    "which sets arrow_config.task_adapter_names (peft/tuners/lora/arrow.py:44); a lone arrow_config "
    "cannot be built, saved or loaded",
    (ANY, "alora", "merge"): "aLoRA cannot merge (peft/tuners/lora/variants.py:594-598)",
    (ANY, "lora-bias", "merge"): "lora_bias merges into the base layer's bias, and Llama's projections "
    "have none (peft/tuners/lora/layer.py:993; bnb.py dereferences the missing bias)",
    **{
        (kind, init, ANY): f"the {init} init decomposes the base weight and refuses quantized weights "
        f"(peft/tuners/lora/layer.py:434 PiSSA, :480 MiCA; orthogonal_init gives its LoRA weights the "
        f"base weight's uint8/int8 dtype, layer.py:613)"
        for kind in BNB
        for init in ("pissa", "pissa-niter", "mica", "orthogonal")
    },
    **{(kind, "velora", ANY): "bnb layers refuse VeLoRA (peft/tuners/lora/bnb.py:60, :338)" for kind in BNB},
    (ANY, "pissa", "inference[low_cpu_mem_usage=True]"): "PiSSA cannot load with low_cpu_mem_usage=True: "
    "pissa_init assigns real tensors to the meta parameters with .data= (peft/tuners/lora/layer.py:458-459)",
    (ANY, "pissa", "training[low_cpu_mem_usage=True]"): "PiSSA cannot load with low_cpu_mem_usage=True: "
    "pissa_init assigns real tensors to the meta parameters with .data= (peft/tuners/lora/layer.py:458-459)",
}

if importlib.util.find_spec("sklearn") is None:
    PEFT_LIMITS[(ANY, "tuner-adamss", ANY)] = (
        "AdaMSS needs scikit-learn (peft/tuners/adamss), which is not a test dependency"
    )

# Cells that would only repeat another cell: skipped, with the reason.
MEANINGLESS: dict[Key, str] = {
    (ANY, "qalora", ANY): "use_qalora only acts on GPTQ layers (peft/tuners/lora/gptq.py:66); on these "
    "bases raw PEFT builds plain LoRA, the 'lora' cells",
    **{
        (kind, variant, ANY): f"bnb layers resolve no {variant} variant (peft/tuners/lora/bnb.py:58-76 "
        f"knows DoRA, aLoRA, Arrow): raw PEFT builds plain LoRA, the 'lora' cells"
        for kind in BNB
        for variant in ("kasa", "monteclora", "bdlora")
    },
}

# Cells where raw PEFT is broken: expected to fail with RawPeftBroken (or the named error), strictly.
RAW_BROKEN: dict[Key, tuple[str, type[BaseException]]] = {
    **{
        ("bnb8", variant, loader): (
            "raw PEFT: DoRA on an 8-bit base fails at its second forward, inside bitsandbytes "
            "(int8_mm_dequant gets col_stats=None); plain LoRA on that base repeats fine. Likely cause: "
            "DoRA's per-forward dequantize_module_weight re-assigns the Int8Params "
            "(peft/utils/integrations.py:112) after the first forward moved its SCB into the layer state",
            RawPeftBroken,
        )
        for variant in ("dora", "dora-embedding")
        for loader in ("inference", "training")
    },
    **{
        (kind, replication, "merge"): (
            "raw PEFT merges the LoRA of each replica of a layer into the one quantized weight the replicas "
            "share (replicate_layers, peft/tuners/tuners_utils.py), so every replica gets every delta; "
            "safe_lora would copy the weight apart first, but a quantized weight cannot be copied exactly: "
            "it refuses the merge",
            AdapterMergeError,
        )
        for kind in BNB
        for replication in REPLICATIONS
    },
    **{
        (kind, "kasa", f"{loader}[low_cpu_mem_usage=True]"): (
            "raw PEFT with low_cpu_mem_usage=True defers KaSA's SVD truncation to the first forward, "
            "which corrects its output instead of recomputing it (peft/tuners/lora/variants.py:1477, "
            "1548-1557): its first forward differs from every later one",
            RawPeftBroken,
        )
        for kind in ("fp32", "bf16")
        for loader in ("inference", "training")
    },
    **{
        (kind, "monteclora", f"{loader}[low_cpu_mem_usage=True]"): (
            "raw PEFT with low_cpu_mem_usage=True silently drops the 16 saved lora_monteclora_sampler "
            "tensors (on meta adapters the sampler is only created at the first forward, afresh: "
            "peft/tuners/lora/variants.py:1110-1113); safe_lora's strict check refuses the load instead",
            AdapterWeightsError,
        )
        for kind in ("fp32", "bf16")
        for loader in ("inference", "training")
    },
}


def lookup(table: dict[Key, Any], kind: str, adapter: str, loader: str) -> Any:
    for (k, a, ld), value in table.items():
        if k in (kind, ANY) and a in (adapter, ANY) and ld in (loader, ANY):
            return value
    return None


@contextmanager
def raw_peft(cell: Cell) -> Iterator[None]:
    """Run the raw-PEFT side; a listed limitation skips the cell (with PEFT's error), anything else fails."""
    reason = lookup(PEFT_LIMITS, cell.kind, cell.adapter, cell.loader_id)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        if reason is None:
            raise
        pytest.skip(f"raw PEFT cannot: {reason} [{type(exc).__name__}: {str(exc)[:200]}]")
    if reason is not None:
        pytest.fail(f"raw PEFT now runs {cell.id}: take it out of PEFT_LIMITS ({reason})")


# --------------------------------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    kind: str  # the base loaded into
    adapter: str  # a key of CONFIGS
    loader: str  # a key of CHECKS
    options: dict[str, Any] = field(default_factory=dict)  # explicit PEFT options, passed to both sides
    trained_on: str | None = None  # the base kind the adapter was created on; default: ``kind``

    @property
    def loader_id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.loader}[{opts}]" if opts else self.loader

    @property
    def id(self) -> str:
        source = f"-from-{self.trained_on}" if self.trained_on else ""
        return f"{self.kind}-{self.adapter}{source}-{self.loader_id}"

    def path(self, lab: Lab, seed: int = 0) -> Path:
        return lab.adapter(self.trained_on or self.kind, self.adapter, seed)

    def run(self, model: nn.Module) -> torch.Tensor:
        return RUNS.get(self.adapter, logits)(model)


def check_inference(lab: Lab, cell: Cell) -> None:
    with raw_peft(cell):
        path = cell.path(lab)
        torch.manual_seed(SEED)
        ref = PeftModel.from_pretrained(lab.base(cell.kind), str(path), **cell.options).eval()
    torch.manual_seed(SEED)
    ours = load_for_inference(lab.base(cell.kind), path, **cell.options)
    assert_same_tensors(ours, ref, "after loading")
    assert_same_outputs(ours, ref, cell.run)
    assert_same_tensors(ours, ref, "after two forwards")


def own_weights(model: PeftModel) -> PeftModel:
    """Every adapted layer's base weight in its own storage: replicated layers share theirs, and
    PEFT's merge would write every replica's delta into the one tensor (safe_lora unties first)."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
    return model


def check_merge(lab: Lab, cell: Cell) -> None:
    with raw_peft(cell):
        path = cell.path(lab)
        torch.manual_seed(SEED)
        ref = PeftModel.from_pretrained(lab.base(cell.kind), str(path), **cell.options)
        if cell.adapter in REPLICATIONS and cell.kind not in BNB:  # bnb: refused (RAW_BROKEN)
            ref = own_weights(ref)
        ref = ref.merge_and_unload().eval()
    torch.manual_seed(SEED)
    ours = load_for_inference(lab.base(cell.kind), path, merge=True, **cell.options)
    assert type(ours) is type(ref)
    assert_same_tensors(ours, ref, "after merging")
    assert_same_outputs(ours, ref, cell.run)


def train_step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Inside deterministic_lora: logits and loss of a forward, the gradients they give, a second forward."""
    with deterministic_lora(model):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach().clone(), out.loss.detach().clone(), grads, logits(model)


def check_training(lab: Lab, cell: Cell) -> None:
    with raw_peft(cell):
        path = cell.path(lab)
        torch.manual_seed(SEED)
        ref = PeftModel.from_pretrained(
            lab.base(cell.kind), str(path), is_trainable=True, **cell.options
        ).train()
    torch.manual_seed(SEED)
    ours = load_for_training(lab.base(cell.kind), path, **cell.options)
    assert_same_tensors(ours, ref, "after loading")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref.named_parameters() if p.requires_grad}

    torch.manual_seed(SEED)
    ref_logits, ref_loss, ref_grads, ref_second = on_raw(train_step, ref)
    if not _same(ref_second, ref_logits):
        raise RawPeftBroken(
            f"raw PEFT's second forward differs from its first: {_describe(ref_second, ref_logits)}"
        )
    torch.manual_seed(SEED)
    our_logits, our_loss, our_grads, our_second = train_step(ours)
    assert_same(our_logits, ref_logits, "the first forward")
    assert_same(our_loss, ref_loss, "the loss")
    assert sorted(our_grads) == sorted(ref_grads)
    diff = {n: _describe(our_grads[n], g) for n, g in ref_grads.items() if not _same(our_grads[n], g)}
    assert not diff, f"{len(diff)} of {len(ref_grads)} gradients differ from raw PEFT's: {diff}"
    assert_same(our_second, ref_logits, "the second forward")


def check_load_adapter(lab: Lab, cell: Cell) -> None:
    """A second adapter added to an inference model, then activated: PEFT's load_adapter + set_adapter."""
    with raw_peft(cell):
        first, second = cell.path(lab), cell.path(lab, seed=1)
        torch.manual_seed(SEED)
        ref = PeftModel.from_pretrained(lab.base(cell.kind), str(first), **cell.options).eval()
        ref.load_adapter(str(second), "b", **cell.options)
        ref.set_adapter("b")
        ref.eval()
    torch.manual_seed(SEED)
    ours = load_for_inference(lab.base(cell.kind), first, **cell.options)
    load_adapter(ours, second, adapter_name="b", **cell.options)
    assert_same_tensors(ours, ref, "after loading")
    with use_adapter(ours, "b"):
        assert_same_outputs(ours, ref, cell.run)


def check_mapping(lab: Lab, cell: Cell) -> None:
    """``{"a": p1, "b": p2}``, ``active="b"``: PEFT's from_pretrained(p1) + load_adapter(p2) + set_adapter."""
    with raw_peft(cell):
        first, second = cell.path(lab), cell.path(lab, seed=1)
        torch.manual_seed(SEED)
        ref = PeftModel.from_pretrained(lab.base(cell.kind), str(first), adapter_name="a", **cell.options)
        ref.load_adapter(str(second), "b", **cell.options)
        ref.set_adapter("b")
        ref.eval()
    torch.manual_seed(SEED)
    ours = load_for_inference(lab.base(cell.kind), {"a": first, "b": second}, active="b", **cell.options)
    assert_same_tensors(ours, ref, "after loading")
    assert_same_outputs(ours, ref, cell.run)


CHECKS: dict[str, Callable[[Lab, Cell], None]] = {
    "inference": check_inference,
    "training": check_training,
    "merge": check_merge,
    "load_adapter": check_load_adapter,
    "mapping": check_mapping,
}

# Every base x every LoRA variant x the three loaders.
MATRIX = [
    Cell(k, v, loader)
    for k, v, loader in itertools.product(BASE_KINDS, VARIANTS, ("inference", "training", "merge"))
]
# A subset with explicit PEFT options, several adapters on one base, and the adapter trained on the
# fp32 base but served on another (the "fp32-saved adapter into a bf16 base").
SUBSET_KINDS = ("fp32", "bf16", "bnb4-bf16")
SUBSET_VARIANTS = ("lora", "dora", "modules-to-save", "trainable-tokens", "monteclora", "kasa", "pissa")
OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("inference", {"low_cpu_mem_usage": True}),
    ("training", {"low_cpu_mem_usage": True}),
    ("inference", {"autocast_adapter_dtype": False}),
    ("training", {"autocast_adapter_dtype": False}),
    ("load_adapter", {}),
    ("mapping", {}),
]
MATRIX += [
    Cell(k, v, loader, opts)
    for k, v, (loader, opts) in itertools.product(SUBSET_KINDS, SUBSET_VARIANTS, OPTIONS)
]
MATRIX += [
    Cell(k, v, loader, trained_on="fp32")
    for k, v, loader in itertools.product(
        ("bf16", "fp16", "bnb4-bf16", "bnb8"),
        ("lora", "dora", "modules-to-save", "trainable-tokens", "embedding"),
        ("inference", "training", "merge"),
    )
]


def _param(cell: Cell) -> Any:
    broken = lookup(RAW_BROKEN, cell.kind, cell.adapter, cell.loader_id)
    marks = [pytest.mark.xfail(strict=True, raises=broken[1], reason=broken[0])] if broken else []
    # The quick tier (-m "not slow") keeps the fp32 cells: every variant and loader, every tuner; the
    # other bases multiply them by five.
    if cell.kind.startswith("bnb"):
        marks += [pytest.mark.bnb, pytest.mark.slow]
    elif cell.kind != "fp32":
        marks.append(pytest.mark.slow)
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in MATRIX])
def test_load_is_raw_peft_bit_for_bit(lab: Lab, cell: Cell) -> None:
    reason = lookup(MEANINGLESS, cell.kind, cell.adapter, cell.loader_id)
    if reason is not None:
        pytest.skip(reason)
    CHECKS[cell.loader](lab, cell)


# --------------------------------------------------------------------------------------------------
# Every other PEFT tuner: load_for_inference is raw PEFT in eval, from the very first forward
# --------------------------------------------------------------------------------------------------

TUNER_CELLS = [Cell("fp32", name, "inference") for name in [*(f"tuner-{t}" for t in TUNERS), XLORA]]


@pytest.mark.parametrize("cell", [_param(c) for c in TUNER_CELLS])
def test_every_tuner_loads_as_raw_peft_in_eval(lab: Lab, cell: Cell) -> None:
    check_inference(lab, cell)


def test_every_peft_tuner_is_covered() -> None:
    """A new tuner in PEFT's mapping must get a row in TUNERS (LoRA has VARIANTS, X-LoRA its own)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    covered = {name.replace("-", "_").upper() for name in TUNERS} | {"LORA", "XLORA"}
    assert {str(getattr(t, "value", t)) for t in PEFT_TYPE_TO_CONFIG_MAPPING} - covered == set()


def test_the_shared_bases_were_never_touched(lab: Lab) -> None:
    """Every cell deep-copies its bases: the originals still equal fresh builds (bnb ones included),
    so no cell's reference was built on a base another cell had changed."""
    for kind, base in lab._bases.items():
        fresh = tiny_llama_as(kind, lab.folder)
        fresh.config.use_cache = False
        assert_same_tensors(base, fresh, f"the shared {kind} base")
