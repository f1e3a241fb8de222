"""safe_lora next to raw PEFT, measured side by side in one process.

Run ``python benchmarks/bench.py`` (about 9 minutes on an idle 2-core machine) or ``--quick`` (a
tiny model, to check that the script works; its timings mean nothing). Every measurement alternates
its two sides (A B, B A, A B, ...) so that drift in machine load cancels, and reports the median of the
per-pair ratios A/B with their min-max. The exit status is 1 when a median (or a hostile config's
absolute bar) misses its bar.

Measurements, on a Llama-shaped model built from a config (no download) with a LoRA adapter
(r=16 on every linear layer, saved with ``save_pretrained``):

1. ``load_for_inference`` vs ``PeftModel.from_pretrained(...).eval()``: wall time, and the peak
   RSS increase of the load itself (each load in a fresh spawned process); again on the model in
   bfloat16.
2. ``deterministic_lora`` enter + exit vs a ``model.eval(); model.train()`` round trip on the same
   model, and vs the forward pass it wraps.
3. Forward latency: ``load_for_inference(merge=True)`` vs the base model without adapter, and
   unmerged ``load_for_inference`` vs raw PEFT in eval mode.
4. Serving many adapters (an 8-layer Llama, hidden 256, LoRA r=8 on every linear layer, 1 thread):
   adding 24 adapters one by one with ``load_adapter`` vs ``PeftModel.load_adapter`` (total, and how
   the cost of one add grows), ``use_adapter`` vs a ``set_adapter`` round trip, and
   ``load_adapter(replace=True)`` vs ``PeftModel.load_adapter`` into a new name and vs PEFT's
   ``hotswap_adapter`` (on models holding all the adapters, and on models holding one, prepared with
   PEFT's ``prepare_model_for_compiled_hotswap``, swapping adapters of other ranks and alphas), and
   ``deterministic_lora`` on a training model holding all the adapters.
5. Loading onto a ~1B base: ``load_for_inference`` vs ``PeftModel.from_pretrained(...).eval()`` on a
   bfloat16 model of Llama-3.2-1B's shape (1.24B parameters; built once in bf16, saved, and loaded
   again from its folder before each load, outside the timed region), LoRA r=16 on every linear layer.
6. The cost of refusing hostile configs (absolute, not a ratio): real PEFT-saved adapters on a small
   Llama with one field of ``adapter_config.json`` edited to claim what the weights cannot back (a
   rank, a token or task count, a list length, a backtracking pattern), each through
   ``load_for_inference`` and ``inspect_adapter(base_model=...)`` in one spawned process: wall time,
   peak RSS growth, whether it was refused and that the model is unchanged. Bars: < 5 s and
   < 256 MiB per call. Raw PEFT is not run on them (it would allocate GBs, or never finish).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Nothing is downloaded: PEFT looks up the base model's config.json when saving.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

MIN_MAX = "min\u2013max"


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False


FULL_MODEL = ModelSpec(768, 2048, 12, 12, 12, 32000)  # ~134M parameters
TINY_MODEL = ModelSpec(64, 128, 2, 4, 4, 256, 128)
SERVING_MODEL = ModelSpec(256, 512, 8, 8, 8, 1024, 128)  # the model of issue 12
# Llama-3.2-1B's shape (tied embeddings, grouped-query attention): 1.24B parameters, 2.5 GB in bf16.
LLAMA_1B = ModelSpec(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True)
HOSTILE_MODEL = ModelSpec(512, 1376, 4, 8, 8, 1000)  # the base of tests/test_hostile.py


@dataclass(frozen=True)
class Settings:
    model: ModelSpec
    seq_len: int
    load_pairs: int
    memory_pairs: int
    toggle_pairs: int
    toggle_forward_pairs: int
    forward_pairs: int
    forward_warmup: int
    best_of: int  # each side of a timing pair is the best of this many interleaved runs
    serving_model: ModelSpec
    adapters: int  # how many adapters section 4 adds one by one
    serving_pairs: int
    switch_pairs: int
    big_model: ModelSpec  # section 5, built in bfloat16
    big_pairs: int
    hostile_model: ModelSpec  # section 6


FULL = Settings(
    FULL_MODEL,
    seq_len=128,
    load_pairs=15,
    memory_pairs=3,
    toggle_pairs=30,
    toggle_forward_pairs=15,
    forward_pairs=20,
    forward_warmup=3,
    best_of=3,
    serving_model=SERVING_MODEL,
    adapters=24,
    serving_pairs=11,
    switch_pairs=30,
    big_model=LLAMA_1B,
    big_pairs=12,
    hostile_model=HOSTILE_MODEL,
)
QUICK = Settings(
    TINY_MODEL,
    seq_len=16,
    load_pairs=3,
    memory_pairs=1,
    toggle_pairs=5,
    toggle_forward_pairs=3,
    forward_pairs=5,
    forward_warmup=1,
    best_of=1,
    serving_model=TINY_MODEL,
    adapters=8,
    serving_pairs=2,
    switch_pairs=5,
    big_model=TINY_MODEL,
    big_pairs=2,
    hostile_model=HOSTILE_MODEL,
)

LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
SERVING_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
SEED = 0


def _quiet() -> None:
    # transformers' own deprecation noise (is_gradient_checkpointing) on every PEFT wrap.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # The progress bars of transformers' save_pretrained / from_pretrained (sections 5 and 6).
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def build_base(spec: ModelSpec, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The base model, from a config, with fixed weights; in eval mode as ``from_pretrained`` gives it.

    With ``dtype`` the model is built in that dtype directly (a 1B model never exists in float32).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        model: nn.Module = LlamaForCausalLM(LlamaConfig(**asdict(spec)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def save_adapter(
    base: nn.Module,
    folder: Path,
    *,
    lora: dict[str, Any] = LORA,
    seed: int = SEED + 1,
    copy_base: bool = True,
) -> Path:
    """A LoRA adapter with non-zero weights (so merging changes the weights), saved by PEFT.

    ``copy_base=False`` wraps ``base`` itself (no second copy of a large model; ``base`` is then spent).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora)
    peft_model = get_peft_model(copy.deepcopy(base) if copy_base else base, config)
    peft_model.save_pretrained(os.fspath(folder))
    return folder


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One A-vs-B measurement: the per-pair ratios A/B and the bar the median must meet."""

    name: str
    a: str
    b: str
    unit: str
    bar: float | None  # None: shown for information, no bar
    a_values: list[float] = field(default_factory=list)
    b_values: list[float] = field(default_factory=list)
    note: str = ""
    best_of: int = 1

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.a_values, self.b_values, strict=True) if b > 0]

    @property
    def median(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def ok(self) -> bool | None:
        """``None`` for information rows, and when B measured 0 (a tiny --quick model's RSS delta)."""
        if self.bar is None:
            return None
        if not self.a_values:
            return False  # not measured at all (e.g. deterministic_lora missing): not proven
        median = self.median
        return None if median is None else median <= self.bar

    def to_json(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "name": self.name,
            "a": self.a,
            "b": self.b,
            "unit": self.unit,
            "bar": self.bar,
            "ratio_median": self.median,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "ok": self.ok,
            "a_median": statistics.median(self.a_values) if self.a_values else None,
            "b_median": statistics.median(self.b_values) if self.b_values else None,
            "a_values": self.a_values,
            "b_values": self.b_values,
            "best_of": self.best_of,
            "note": self.note,
        }


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if value < 0.1 else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    lines = [
        f"| measurement | ratio median | {MIN_MAX} | bar | ok |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ratios = row.ratios
        spread = f"{_fmt_ratio(min(ratios))}\u2013{_fmt_ratio(max(ratios))}" if ratios else "n/a"
        bar = "info" if row.bar is None else f"<= {row.bar:g}"
        ok = "-" if row.ok is None else ("yes" if row.ok else "**NO**")
        lines.append(f"| {row.name} | {_fmt_ratio(row.median)} | {spread} | {bar} | {ok} |")
    return "\n".join(lines)


def details(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        if not row.a_values:
            lines.append(f"- {row.name}: {row.note or 'not measured'}")
            continue
        a, b = statistics.median(row.a_values), statistics.median(row.b_values)
        text = f"- {row.name}: A = {row.a}: {_fmt_abs(a, row.unit)}; B = {row.b}: {_fmt_abs(b, row.unit)}"
        each = f", each side best of {row.best_of}" if row.best_of > 1 else ""
        text += f" (medians of {len(row.a_values)} pairs{each})"
        if row.note:
            text += f"; {row.note}"
        lines.append(text)
    return "\n".join(lines)


def _fmt_abs(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:g} {unit}"


# --------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------


@contextmanager
def _no_gc(*, collect: bool = False) -> Iterator[None]:
    """Keep the collector out of the timed region (as timeit does); ``collect`` first if asked.

    A full collection costs tens of milliseconds with several 100M-parameter models alive, so only
    the loads (which leave a whole model of garbage behind) collect before each run.
    """
    if collect:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def alternate(
    pairs: int,
    a: Callable[[], float],
    b: Callable[[], float],
    row: Row,
    *,
    warmup: int = 1,
    best_of: int = 1,
) -> Row:
    """Run ``a`` and ``b`` alternately (A B, B A, A B, ...); each call returns one measurement.

    With ``best_of=k`` each side of a pair is the minimum of ``k`` interleaved runs: a busy machine
    only ever adds time, so the minimum is the least disturbed estimate of the code's own cost.
    """
    row.best_of = best_of
    for _ in range(warmup):
        a()
        b()
    flip = False
    for _ in range(pairs):
        runs_a: list[float] = []
        runs_b: list[float] = []
        for _ in range(best_of):
            if flip:
                runs_b.append(b())
                runs_a.append(a())
            else:
                runs_a.append(a())
                runs_b.append(b())
            flip = not flip
        row.a_values.append(min(runs_a))
        row.b_values.append(min(runs_b))
    return row


def _load_safe(model: nn.Module, adapter: Path) -> nn.Module:
    from safe_lora import load_for_inference

    return load_for_inference(model, adapter)


def _load_raw(model: nn.Module, adapter: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, os.fspath(adapter)).eval()


LOADERS: dict[str, Callable[[nn.Module, Path], nn.Module]] = {"safe": _load_safe, "raw": _load_raw}


# --------------------------------------------------------------------------------------------------
# 1. Loading: time and peak memory
# --------------------------------------------------------------------------------------------------


def bench_load_time(base: nn.Module, adapter: Path, pairs: int, *, label: str = "") -> Row:
    row = Row(
        f"load{label}: load_for_inference / PeftModel.from_pretrained().eval() (time)",
        "load_for_inference",
        "PeftModel.from_pretrained(...).eval()",
        "s",
        1.10,
    )

    # A fresh base model each time, outside the timed region.
    return _alternate_loads(lambda: copy.deepcopy(base), adapter, pairs, row)


def _alternate_loads(fresh: Callable[[], nn.Module], adapter: Path, pairs: int, row: Row) -> Row:
    """``load_for_inference`` and raw PEFT alternated on ``fresh()`` bases; only the load is timed."""

    def timed(kind: str) -> Callable[[], float]:
        def run() -> float:
            model = fresh()
            with _no_gc(collect=True):
                start = time.perf_counter()
                result = LOADERS[kind](model, adapter)
                elapsed = time.perf_counter() - start
            del result, model
            return elapsed

        return run

    # Each side the faster of two runs: page faults and allocator noise only ever add time.
    return alternate(pairs, timed("safe"), timed("raw"), row, best_of=2)


def _proc_status(field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in bytes (None off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0) so that the next peak is the load's own."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def memory_child(
    kind: str,
    spec: dict[str, Any],
    adapter: str,
    warm_spec: dict[str, Any],
    warm_adapter: str,
    threads: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """In a fresh process: warm up both loaders on a tiny model, build the base, measure one load."""
    _quiet()
    torch.set_num_threads(threads)
    # Both code paths once on a tiny model, so that lazy imports and first-call caches are
    # paid before the measurement, identically in the "safe" and the "raw" process.
    tiny = build_base(ModelSpec(**warm_spec))
    for loader in LOADERS.values():
        loader(copy.deepcopy(tiny), Path(warm_adapter))
    del tiny
    base = build_base(ModelSpec(**spec)).to(getattr(torch, dtype))
    gc.collect()
    reset = _reset_peak()
    before = _proc_status("VmRSS")
    maxrss_before = _maxrss_bytes()
    loaded = LOADERS[kind](base, Path(adapter))
    peak = _proc_status("VmHWM")
    after = _proc_status("VmRSS")
    maxrss_after = _maxrss_bytes()
    del loaded
    if reset and before is not None and peak is not None and after is not None:
        return {"peak_delta": peak - before, "rss_delta": after - before, "method": "VmHWM after clear_refs"}
    # Without a resettable high-water mark, the build of the base may hold the peak; the delta is
    # then a lower bound.
    return {"peak_delta": max(0, maxrss_after - maxrss_before), "rss_delta": None, "method": "ru_maxrss"}


def bench_load_memory(
    spec: ModelSpec,
    adapter: Path,
    warm_adapter: Path,
    pairs: int,
    threads: int,
    *,
    dtype: torch.dtype = torch.float32,
    label: str = "",
) -> Row:
    row = Row(
        f"load{label}: load_for_inference / PeftModel.from_pretrained().eval() (peak RSS increase)",
        "load_for_inference",
        "PeftModel.from_pretrained(...).eval()",
        "bytes",
        1.05,
    )
    context = multiprocessing.get_context("spawn")
    methods: set[str] = set()

    def measured(kind: str) -> Callable[[], float]:
        def run() -> float:
            with context.Pool(1) as pool:
                args = (kind, asdict(spec), os.fspath(adapter), asdict(TINY_MODEL), os.fspath(warm_adapter))
                result = pool.apply(memory_child, (*args, threads, str(dtype).removeprefix("torch.")))
            methods.add(str(result["method"]))
            return float(result["peak_delta"])

        return run

    alternate(pairs, measured("safe"), measured("raw"), row, warmup=0)
    row.note = "each load in a fresh spawned process; peak from " + ", ".join(sorted(methods))
    return row


# --------------------------------------------------------------------------------------------------
# 2. deterministic_lora
# --------------------------------------------------------------------------------------------------


def _deterministic_lora() -> Any:
    """The context manager, imported lazily: it may not be exported (or written) yet."""
    for module in ("safe_lora", "safe_lora._dropout_freeze"):
        try:
            found = getattr(importlib.import_module(module), "deterministic_lora", None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return None


def bench_toggle(base: nn.Module, adapter: Path, tokens: torch.Tensor, settings: Settings) -> tuple[Row, Row]:
    vs_round_trip = Row(
        "deterministic_lora: enter+exit / model.eval(); model.train()",
        "deterministic_lora enter+exit",
        "model.eval(); model.train()",
        "s",
        0.5,
    )
    vs_forward = Row(
        "deterministic_lora: enter+exit / one forward pass",
        "deterministic_lora enter+exit",
        "the forward pass inside the block",
        "s",
        0.01,
    )
    deterministic_lora = _deterministic_lora()
    if deterministic_lora is None:
        note = "safe_lora has no deterministic_lora yet (safe_lora._dropout_freeze missing)"
        vs_round_trip.note = vs_forward.note = note
        return vs_round_trip, vs_forward

    from safe_lora import load_for_training

    # A model as a training loop has it: every module in train mode, adapter dropout live.
    model = load_for_training(copy.deepcopy(base), adapter)

    def toggle() -> float:
        with _no_gc():
            start = time.perf_counter()
            with deterministic_lora(model):
                pass
            return time.perf_counter() - start

    def round_trip() -> float:
        with _no_gc():
            start = time.perf_counter()
            model.eval()
            model.train()
            return time.perf_counter() - start

    alternate(
        settings.toggle_pairs, toggle, round_trip, vs_round_trip, warmup=3, best_of=2 * settings.best_of
    )

    # A validation step: the block around one no-grad forward pass; enter+exit vs the pass itself.
    with torch.no_grad():
        for rep in range(settings.forward_warmup + settings.toggle_forward_pairs):
            block = deterministic_lora(model)
            with _no_gc():
                t0 = time.perf_counter()
                block.__enter__()
                t1 = time.perf_counter()
                model(tokens)
                t2 = time.perf_counter()
                block.__exit__(None, None, None)
                t3 = time.perf_counter()
            if rep >= settings.forward_warmup:
                vs_forward.a_values.append((t1 - t0) + (t3 - t2))
                vs_forward.b_values.append(t2 - t1)
    vs_forward.note = f"no-grad forward of batch 1 x {tokens.shape[-1]} tokens"
    return vs_round_trip, vs_forward


# --------------------------------------------------------------------------------------------------
# 3. Forward latency
# --------------------------------------------------------------------------------------------------


def _forward_timer(model: nn.Module, tokens: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with _no_gc(), torch.inference_mode():
            start = time.perf_counter()
            model(tokens)
            return time.perf_counter() - start

    return run


def bench_forward(base: nn.Module, adapter: Path, tokens: torch.Tensor, settings: Settings) -> list[Row]:
    from safe_lora import load_for_inference

    plain = copy.deepcopy(base).eval()
    merged = load_for_inference(copy.deepcopy(base), adapter, merge=True)
    unmerged = load_for_inference(copy.deepcopy(base), adapter)
    raw = _load_raw(copy.deepcopy(base), adapter)
    n, warm, best = settings.forward_pairs, settings.forward_warmup, settings.best_of
    note = f"batch 1 x {tokens.shape[-1]} tokens, inference_mode"
    rows = [
        Row(
            "forward: load_for_inference(merge=True) / base model without adapter",
            "merged",
            "base model",
            "s",
            1.03,
            note=note,
        ),
        Row(
            "forward: load_for_inference / raw PEFT in eval (both unmerged)",
            "load_for_inference (unmerged)",
            "PeftModel.from_pretrained(...).eval()",
            "s",
            1.03,
            note=note,
        ),
        Row(
            "forward: unmerged / merged (why merge=True is the fast path)",
            "load_for_inference (unmerged)",
            "load_for_inference(merge=True)",
            "s",
            None,
            note=note,
        ),
    ]
    alternate(
        n, _forward_timer(merged, tokens), _forward_timer(plain, tokens), rows[0], warmup=warm, best_of=best
    )
    alternate(
        n, _forward_timer(unmerged, tokens), _forward_timer(raw, tokens), rows[1], warmup=warm, best_of=best
    )
    alternate(
        n,
        _forward_timer(unmerged, tokens),
        _forward_timer(merged, tokens),
        rows[2],
        warmup=warm,
        best_of=best,
    )
    return rows


# --------------------------------------------------------------------------------------------------
# 4. Serving many adapters
# --------------------------------------------------------------------------------------------------


def _quiet_call(func: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func()


def bench_serving(settings: Settings, tmp: Path) -> list[Row]:
    """Adding adapters one by one, switching between them and swapping one's weights in place."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    from safe_lora import load_adapter, load_for_inference, use_adapter

    torch.set_num_threads(1)
    n = settings.adapters
    base = build_base(settings.serving_model)
    paths = [
        save_adapter(base, tmp / f"serving-{i}", lora=SERVING_LORA, seed=SEED + 10 + i) for i in range(n)
    ]
    spec = settings.serving_model
    note = (
        f"{spec.num_hidden_layers}-layer Llama, hidden {spec.hidden_size}, "
        f"LoRA r={SERVING_LORA['r']} on every linear layer, {n} adapters, 1 thread"
    )
    total = Row(
        f"serving: add {n} adapters, load_adapter / PeftModel.load_adapter (total time)",
        "safe_lora.load_adapter",
        "PeftModel.load_adapter",
        "s",
        1.10,
        note=note,
    )
    growth = Row(
        "serving: growth of one add's cost (last 4 / first 4), safe_lora / raw PEFT",
        "safe_lora's growth",
        "raw PEFT's growth",
        "ratio",
        1.0,
        note=note,
    )
    per_add: dict[str, list[list[float]]] = {"safe": [], "raw": []}

    def adds(kind: str) -> Callable[[], float]:
        def run() -> float:
            model = copy.deepcopy(base)
            if kind == "safe":
                peft_model = load_for_inference(model, paths[0], adapter_name="a0")
            else:
                peft_model = _quiet_call(
                    lambda: PeftModel.from_pretrained(model, os.fspath(paths[0]), adapter_name="a0").eval()
                )
            times = []
            with _no_gc(collect=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(1, n):
                    start = time.perf_counter()
                    if kind == "safe":
                        load_adapter(peft_model, paths[i], adapter_name=f"a{i}")
                    else:
                        peft_model.load_adapter(os.fspath(paths[i]), f"a{i}")
                    times.append(time.perf_counter() - start)
            per_add[kind].append(times)
            return sum(times)

        return run

    alternate(settings.serving_pairs, adds("safe"), adds("raw"), total, warmup=0)
    k = min(4, max(1, (n - 1) // 2))

    def growth_of(runs: list[list[float]]) -> float:
        # Per position, the least disturbed of the runs (a busy machine only adds time); then the
        # issue's measure: mean of the last k adds / mean of the first k.
        fastest = [min(times) for times in zip(*runs, strict=True)]
        return statistics.mean(fastest[-k:]) / statistics.mean(fastest[:k])

    growth.a_values.append(growth_of(per_add["safe"]))
    growth.b_values.append(growth_of(per_add["raw"]))
    runs = len(per_add["safe"])
    growth.note = (
        f"{note}; mean of the last {k} adds / mean of the first {k}, each add the fastest of {runs} "
        f"runs: safe_lora {growth.a_values[0]:.2f}x, raw PEFT {growth.b_values[0]:.2f}x"
    )

    # Switching and swapping, on models holding all n adapters.
    safe_model = load_for_inference(copy.deepcopy(base), {f"a{i}": p for i, p in enumerate(paths)})
    raw_model = _quiet_call(
        lambda: PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(paths[0]), adapter_name="a0").eval()
    )
    for i in range(1, n):
        _quiet_call(lambda i=i: raw_model.load_adapter(os.fspath(paths[i]), f"a{i}"))

    switch = Row(
        "serving: with use_adapter(model, 'a1'): pass / set_adapter('a1'); set_adapter('a0')",
        "use_adapter enter+exit",
        "PeftModel.set_adapter round trip",
        "s",
        1.10,
        note=note,
    )

    def use() -> float:
        with _no_gc():
            start = time.perf_counter()
            with use_adapter(safe_model, "a1"):
                pass
            return time.perf_counter() - start

    def set_adapter() -> float:
        with _no_gc():
            start = time.perf_counter()
            raw_model.set_adapter("a1")
            raw_model.set_adapter("a0")
            return time.perf_counter() - start

    alternate(settings.switch_pairs, use, set_adapter, switch, warmup=2, best_of=2 * settings.best_of)

    # Replacing a0's weights in place (the other files have the same shapes) vs loading into a new
    # name and vs PEFT's hotswap, on models holding the same n adapters.
    replace_vs_load = Row(
        "serving: load_adapter(replace=True) / PeftModel.load_adapter into a new name",
        "load_adapter(..., replace=True)",
        "PeftModel.load_adapter(path, new name)",
        "s",
        None,
        note=note,
    )
    replace_vs_hotswap = Row(
        "serving: load_adapter(replace=True) / peft hotswap_adapter",
        "load_adapter(..., replace=True)",
        "hotswap_adapter(model, path, 'a0')",
        "s",
        None,
        note=note,
    )
    counter = iter(range(10**9))

    def replace() -> float:
        source = paths[1 + next(counter) % (n - 1)]
        with _no_gc():
            start = time.perf_counter()
            load_adapter(safe_model, source, adapter_name="a0", replace=True)
            return time.perf_counter() - start

    def load_new() -> float:
        source = paths[1 + next(counter) % (n - 1)]
        with _no_gc(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            raw_model.load_adapter(os.fspath(source), "fresh")
            elapsed = time.perf_counter() - start
        raw_model.delete_adapter("fresh")
        return elapsed

    def hotswap() -> float:
        source = paths[1 + next(counter) % (n - 1)]
        with _no_gc(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            hotswap_adapter(raw_model, os.fspath(source), adapter_name="a0", torch_device="cpu")
            return time.perf_counter() - start

    alternate(settings.switch_pairs, replace, load_new, replace_vs_load, warmup=2, best_of=settings.best_of)
    alternate(settings.switch_pairs, replace, hotswap, replace_vs_hotswap, warmup=2, best_of=settings.best_of)

    # deterministic_lora on a training model holding all n adapters: the walk grows with the model.
    toggle = Row(
        f"serving: deterministic_lora enter+exit / model.eval(); model.train() ({n} adapters)",
        "deterministic_lora enter+exit",
        "model.eval(); model.train()",
        "s",
        0.5,
        note=note,
    )
    from safe_lora import deterministic_lora, load_for_training

    training = load_for_training(copy.deepcopy(base), {f"a{i}": p for i, p in enumerate(paths)})

    def enter_exit() -> float:
        with _no_gc():
            start = time.perf_counter()
            with deterministic_lora(training):
                pass
            return time.perf_counter() - start

    def round_trip() -> float:
        with _no_gc():
            start = time.perf_counter()
            training.eval()
            training.train()
            return time.perf_counter() - start

    alternate(settings.switch_pairs, enter_exit, round_trip, toggle, warmup=2, best_of=2 * settings.best_of)
    prepared = bench_prepared_hotswap(settings, base, tmp)
    return [total, growth, switch, replace_vs_load, replace_vs_hotswap, prepared, toggle]


# The ranks and alphas swapped into models prepared for hot-swapping (PEFT's
# prepare_model_for_compiled_hotswap pads every LoRA tensor to the largest rank).
HOTSWAP_RANKS = ((8, 16), (4, 8), (16, 16), (8, 32))
HOTSWAP_TARGET_RANK = 16


def bench_prepared_hotswap(settings: Settings, base: nn.Module, tmp: Path) -> Row:
    """``load_adapter(replace=True)`` vs PEFT's ``hotswap_adapter``, each on a model prepared by PEFT's
    ``prepare_model_for_compiled_hotswap(model, target_rank=16)``: the serving set-up of a compiled
    model that swaps adapters of other ranks and alphas without recompiling."""
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    from safe_lora import load_adapter, load_for_inference

    spec = settings.serving_model
    paths = [
        save_adapter(
            base, tmp / f"hotswap-{i}", lora={**SERVING_LORA, "r": r, "lora_alpha": alpha}, seed=SEED + 50 + i
        )
        for i, (r, alpha) in enumerate(HOTSWAP_RANKS)
    ]
    ranks = ", ".join(f"r={r}/alpha={a}" for r, a in HOTSWAP_RANKS)
    row = Row(
        f"serving: load_adapter(replace=True) / peft hotswap_adapter, models prepared for hot-swapping "
        f"(target_rank={HOTSWAP_TARGET_RANK})",
        "load_adapter(..., replace=True)",
        "hotswap_adapter(model, path, 'default')",
        "s",
        1.0,
        note=(
            f"{spec.num_hidden_layers}-layer Llama, hidden {spec.hidden_size}, one LoRA adapter on every "
            f"linear layer, both models prepared with prepare_model_for_compiled_hotswap(target_rank="
            f"{HOTSWAP_TARGET_RANK}); each side swaps in turn {ranks}; 1 thread"
        ),
    )
    ours = load_for_inference(copy.deepcopy(base), paths[0])
    raw = _quiet_call(lambda: PeftModel.from_pretrained(copy.deepcopy(base), os.fspath(paths[0])).eval())
    for model in (ours, raw):
        prepare_model_for_compiled_hotswap(model, target_rank=HOTSWAP_TARGET_RANK)
    turns = {"safe": iter(range(10**9)), "raw": iter(range(10**9))}

    def replace() -> float:
        source = paths[next(turns["safe"]) % len(paths)]
        with _no_gc():
            start = time.perf_counter()
            load_adapter(ours, source, adapter_name="default", replace=True)
            return time.perf_counter() - start

    def hotswap() -> float:
        source = paths[next(turns["raw"]) % len(paths)]
        with _no_gc(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            hotswap_adapter(raw, os.fspath(source), adapter_name="default", torch_device="cpu")
            return time.perf_counter() - start

    alternate(settings.switch_pairs, replace, hotswap, row, warmup=2, best_of=settings.best_of)
    # Both sides ran the same swaps in the same order: the models must compute the same.
    with torch.inference_mode():
        tokens = torch.arange(8).unsqueeze(0) % spec.vocab_size
        if not torch.equal(ours(input_ids=tokens).logits, raw(input_ids=tokens).logits):
            row.note += "; WARNING: the two models' outputs differ"
    return row


# --------------------------------------------------------------------------------------------------
# 5. Loading onto a 1B bf16 base
# --------------------------------------------------------------------------------------------------


def _size_label(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e8 else f"{parameters / 1e6:.1f}M"


def bench_big_load(spec: ModelSpec, pairs: int, tmp: Path) -> Row:
    """``load_for_inference`` vs raw PEFT on a bf16 base of Llama-3.2-1B's shape, reloaded per load.

    The base is built once, directly in bf16, and saved; before each load it is loaded again from
    that folder (outside the timed region), as a serving process gets it from ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    base: Any = build_base(spec, dtype=torch.bfloat16)  # Any: save_pretrained is not nn.Module's
    parameters = sum(p.numel() for p in base.parameters())
    base_dir = tmp / "big-base"
    base.save_pretrained(os.fspath(base_dir))
    # Wraps the base itself: no second copy of a 2.5 GB model.
    adapter = save_adapter(base, tmp / "big-adapter", copy_base=False)
    del base
    gc.collect()

    def fresh() -> nn.Module:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(os.fspath(base_dir), dtype=torch.bfloat16)
        return model.eval()

    probe = fresh()
    adapter_parameters = sum(p.numel() for p in _load_raw(probe, adapter).parameters()) - parameters
    del probe
    size = _size_label(parameters)
    row = Row(
        f"load {size} bf16: load_for_inference / PeftModel.from_pretrained().eval() (time)",
        "load_for_inference",
        "PeftModel.from_pretrained(...).eval()",
        "s",
        1.00,
        note=(
            f"{_size_label(parameters)}-parameter Llama (hidden {spec.hidden_size}, "
            f"{spec.num_hidden_layers} layers, vocab {spec.vocab_size}) built once in bf16 and saved; "
            f"before each load the base is loaded again with from_pretrained(dtype=bfloat16), outside "
            f"the timed region; LoRA r={LORA['r']} on every linear layer, "
            f"{adapter_parameters / 1e6:.2f}M fp32 parameters; stretch goal <= 0.8"
        ),
    )

    return _alternate_loads(fresh, adapter, pairs, row)


# --------------------------------------------------------------------------------------------------
# 6. Cost of refusing hostile configs
# --------------------------------------------------------------------------------------------------

HOSTILE_SECONDS = 5.0
HOSTILE_GROWTH_MIB = 256.0
HOSTILE_TARGETS = ["q_proj", "v_proj"]
# Backtracks without end in Python's re (which PEFT matches with); the regex module answers at once.
RE_BOMB = "(.+)+!"
# Backtracks without end in the regex module too.
REGEX_BOMB = r"((?:\w|\.)+?)+(?=[A-Z])"

# (case, the pristine adapter it edits, the one field of adapter_config.json set). Each size is chosen
# so that paying for it would take GBs or minutes; raw PEFT is not run on them.
HOSTILE_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("LoRA `r` = 40000", "lora", {"r": 40_000}),
    ("LoRA `rank_pattern` = {q_proj: 400000}", "lora", {"rank_pattern": {"q_proj": 400_000}}),
    ("LoRA `layer_replication` = [[0, 4]] x 300", "lora", {"layer_replication": [[0, 4]] * 300}),
    (
        "LoRA `target_modules`: 150000 made-up names + q_proj, v_proj",
        "lora",
        {"target_modules": [f"m{i}" for i in range(150_000)] + HOSTILE_TARGETS},
    ),
    (
        "LoRA `trainable_token_indices`: 60000 entries",
        "lora-tokens",
        {"trainable_token_indices": list(range(2, 60_002))},
    ),
    ("prompt tuning `num_virtual_tokens` = 2000000", "prompt", {"num_virtual_tokens": 2_000_000}),
    ("prefix tuning `num_layers` = 200000", "prefix", {"num_layers": 200_000}),
    ("multitask prompt tuning `num_tasks` = 5000000", "multitask", {"num_tasks": 5_000_000}),
    ("VeRA `r` = 400000", "vera", {"r": 400_000}),
    (f"LoRA `target_modules` = `{RE_BOMB}`", "lora", {"target_modules": RE_BOMB}),
    (f"LoRA `target_modules` = `{REGEX_BOMB}`", "lora", {"target_modules": REGEX_BOMB}),
]
HOSTILE_CALLS = ("load_for_inference", "inspect_adapter")


def _pristine_configs() -> dict[str, Any]:
    import peft

    lora: dict[str, Any] = {"target_modules": HOSTILE_TARGETS, "task_type": "CAUSAL_LM"}
    return {
        "lora": peft.LoraConfig(r=4, init_lora_weights=False, **lora),
        "lora-tokens": peft.LoraConfig(r=4, init_lora_weights=False, trainable_token_indices=[1, 2], **lora),
        "prompt": peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prefix": peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "multitask": peft.MultitaskPromptTuningConfig(
            num_virtual_tokens=4, num_tasks=2, task_type="CAUSAL_LM"
        ),
        "vera": peft.VeraConfig(r=4, **lora),
    }


@dataclass
class HostileResult:
    """One call on one hostile adapter: what it cost and whether it refused, leaving the model as it was."""

    case: str
    call: str
    seconds: float
    peak_growth: float  # bytes
    refused: bool
    error: str | None  # an exception that is not a safe_lora error: a crash, not a refusal
    model_unchanged: bool | None  # None: the load succeeded (and changed the model, as a load does)
    method: str

    @property
    def ok(self) -> bool:
        return (
            self.seconds < HOSTILE_SECONDS
            and self.peak_growth < HOSTILE_GROWTH_MIB * 2**20
            and self.error is None
            and self.model_unchanged is not False
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "peak_growth_mib": self.peak_growth / 2**20, "ok": self.ok}


def _model_state(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    names = [name for name, _ in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    return names, tensors


def _same_state(model: nn.Module, state: tuple[list[str], dict[str, torch.Tensor]]) -> bool:
    names, tensors = state
    now = dict([*model.named_parameters(), *model.named_buffers()])
    return (
        [name for name, _ in model.named_modules()] == names
        and now.keys() == tensors.keys()
        and all(torch.equal(now[k], v) for k, v in tensors.items())
        and not model.training
    )


def hostile_child(
    cases: list[tuple[str, str]], base_dir: str, warm: str, threads: int
) -> list[dict[str, Any]]:
    """In one fresh process: each call on each hostile folder, with its own peak RSS growth."""
    _quiet()
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from safe_lora import SafeLoraError, inspect_adapter, load_for_inference

    def fresh() -> nn.Module:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(base_dir)
        return model.eval()

    # Imports and first-call caches paid on the pristine adapter, before anything is measured.
    load_for_inference(fresh(), warm)
    inspect_adapter(warm, base_model=fresh())

    results: list[dict[str, Any]] = []
    for case, folder in cases:
        for call in HOSTILE_CALLS:
            model = fresh()
            state = _model_state(model)
            gc.collect()
            reset = _reset_peak()
            before = _proc_status("VmRSS")
            maxrss_before = _maxrss_bytes()
            refused, error = False, None
            start = time.perf_counter()
            try:
                if call == "load_for_inference":
                    load_for_inference(model, folder)
                else:
                    refused = not inspect_adapter(folder, base_model=model).loads_safely
            except SafeLoraError:
                refused = True
            except Exception as exc:  # a crash: reported, and fails the bar
                error = f"{type(exc).__name__}: {str(exc)[:200]}"
            seconds = time.perf_counter() - start
            peak = _proc_status("VmHWM")
            if reset and before is not None and peak is not None:
                growth, method = peak - before, "VmHWM after clear_refs"
            else:
                growth, method = max(0, _maxrss_bytes() - maxrss_before), "ru_maxrss"
            loaded = call == "load_for_inference" and not refused and error is None
            unchanged = None if loaded else _same_state(model, state)
            result = HostileResult(case, call, seconds, growth, refused, error, unchanged, method)
            results.append(result.to_json())
            del model, state
    return results


def bench_hostile(spec: ModelSpec, tmp: Path, threads: int) -> tuple[list[HostileResult], str]:
    """Every hostile folder through ``load_for_inference`` and ``inspect_adapter`` in one spawned process."""
    import peft

    root = tmp / "hostile"
    root.mkdir()
    base: Any = build_base(spec)
    base.save_pretrained(os.fspath(root / "base"))
    pristine: dict[str, Path] = {}
    for i, (name, config) in enumerate(_pristine_configs().items()):
        torch.manual_seed(SEED + 100 + i)
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(os.fspath(root / f"pristine-{name}"))
        pristine[name] = root / f"pristine-{name}"
    del base
    cases: list[tuple[str, str]] = []
    sizes: list[int] = []
    config_sizes: list[int] = []
    for i, (case, source, fields) in enumerate(HOSTILE_CASES):
        folder = root / f"case-{i}"
        folder.mkdir()
        weights = (pristine[source] / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(weights)
        raw = json.loads((pristine[source] / "adapter_config.json").read_text())
        raw.update(fields)
        text = json.dumps(raw)
        (folder / "adapter_config.json").write_text(text)
        cases.append((case, os.fspath(folder)))
        sizes.append(len(weights) + len(text))
        config_sizes.append(len(text))
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        args = (cases, os.fspath(root / "base"), os.fspath(pristine["lora"]), threads)
        raw_results = pool.apply(hostile_child, args)
    fields_kept = {f.name for f in dataclasses.fields(HostileResult)}
    results = [HostileResult(**{k: v for k, v in r.items() if k in fields_kept}) for r in raw_results]
    info = (
        f"hostile adapter folders: {min(sizes) / 2**10:.0f}\u2013{max(sizes) / 2**10:.0f} KiB on disk each "
        f"(adapter_config.json {min(config_sizes) / 2**10:.1f}\u2013{max(config_sizes) / 2**10:.0f} KiB), "
        f"on a {spec.num_hidden_layers}-layer Llama of hidden {spec.hidden_size}; raw PEFT is not run on "
        "them: it would allocate what the configs claim (GBs) or match a pattern without end"
    )
    return results, info


def hostile_table(results: list[HostileResult]) -> str:
    lines = ["| case | call | refused | seconds | peak growth MiB | bar ok |", "|---|---|---|---|---|---|"]
    for r in results:
        if r.error is not None:
            refused = f"**error** {r.error}"
        elif r.refused:
            refused = "yes"
        else:
            refused = "no (loaded)" if r.model_unchanged is None else "no (loads safely)"
        if r.model_unchanged is not None:
            refused += ", model unchanged" if r.model_unchanged else ", **model changed**"
        cells = [r.case, r.call, refused, f"{r.seconds:.3f}", f"{r.peak_growth / 2**20:.1f}"]
        cells.append("yes" if r.ok else "**NO**")
        # A pipe in a pattern would split the cell.
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def run(
    settings: Settings, threads: int, log: Callable[[str], None]
) -> tuple[list[Row], list[HostileResult], dict[str, Any]]:
    torch.set_num_threads(threads)
    load_start = _load_average()
    with tempfile.TemporaryDirectory(prefix="safe_lora_bench_") as tmp:
        start = time.perf_counter()
        base = build_base(settings.model)
        adapter = save_adapter(base, Path(tmp) / "adapter")
        warm_adapter = save_adapter(build_base(TINY_MODEL), Path(tmp) / "warm")
        n_params = sum(p.numel() for p in base.parameters())
        n_adapter = sum(p.numel() for p in _load_raw(copy.deepcopy(base), adapter).parameters()) - n_params
        generator = torch.Generator().manual_seed(SEED)
        tokens = torch.randint(0, settings.model.vocab_size, (1, settings.seq_len), generator=generator)
        log(f"model: {n_params / 1e6:.1f}M parameters, adapter {n_adapter / 1e6:.2f}M; setup {_since(start)}")

        rows: list[Row] = []
        rows.append(bench_load_time(base, adapter, settings.load_pairs))
        log(f"1. load time done ({_since(start)})")
        rows.append(bench_load_memory(settings.model, adapter, warm_adapter, settings.memory_pairs, threads))
        log(f"1. load memory done ({_since(start)})")
        rows.extend(bench_toggle(base, adapter, tokens, settings))
        log(f"2. deterministic_lora done ({_since(start)})")
        rows.extend(bench_forward(base, adapter, tokens, settings))
        log(f"3. forward done ({_since(start)})")
        # A bf16 base and the fp32-saved adapter: the setup where PEFT's assign path would round.
        half = base.to(torch.bfloat16)
        rows.append(bench_load_time(half, adapter, settings.load_pairs, label=" bf16"))
        rows.append(
            bench_load_memory(
                settings.model,
                adapter,
                warm_adapter,
                settings.memory_pairs,
                threads,
                dtype=torch.bfloat16,
                label=" bf16",
            )
        )
        del half, base
        log(f"1b. bf16 load done ({_since(start)})")
        rows.extend(bench_serving(settings, Path(tmp)))
        torch.set_num_threads(threads)
        log(f"4. serving many adapters done ({_since(start)})")
        gc.collect()
        rows.append(bench_big_load(settings.big_model, settings.big_pairs, Path(tmp)))
        log(f"5. {settings.big_model.hidden_size}-hidden bf16 load done ({_since(start)})")
        gc.collect()
        hostile, hostile_info = bench_hostile(settings.hostile_model, Path(tmp), threads)
        log(f"6. hostile configs done ({_since(start)})")

    meta = {
        "model": asdict(settings.model),
        "parameters": n_params,
        "adapter_parameters": n_adapter,
        "lora": LORA,
        "settings": asdict(settings),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "safe_lora": _version("safe_lora"),
        "source": _source_state(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "seconds": time.perf_counter() - start,
        # Other work on the machine shows up as noise in every ratio; the pairs are alternated to
        # cancel drift, but a busy machine still widens the min-max.
        "load_average_start": load_start,
        "load_average_end": _load_average(),
        "hostile_folders": hostile_info,
    }
    return rows, hostile, meta


def _load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _since(start: float) -> str:
    return f"{time.perf_counter() - start:.0f}s"


def _source_state() -> str:
    """The commit measured, and whether safe_lora/ had uncommitted changes (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "safe_lora")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes in safe_lora/" if dirty else commit


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repetitions (seconds)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default 2; 1 with --quick, to cut noise)"
    )
    args = parser.parse_args(argv)
    _quiet()

    settings = QUICK if args.quick else FULL
    threads = args.threads or (1 if args.quick else 2)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows, hostile, meta = run(settings, threads, log)
    print(table(rows))
    print()
    print(details(rows))
    print()
    print(
        f"Refusing hostile configs (bars: each call < {HOSTILE_SECONDS:g} s and < "
        f"{HOSTILE_GROWTH_MIB:g} MiB peak RSS growth; a refusal leaves the model unchanged):"
    )
    print()
    print(hostile_table(hostile))
    print()
    print(meta["hostile_folders"])
    print()
    print(
        f"{meta['parameters'] / 1e6:.1f}M-parameter Llama, LoRA r={LORA['r']} on all linear layers; "
        f"torch {meta['torch']}, peft {meta['peft']}, transformers {meta['transformers']}, "
        f"{threads} threads on {meta['machine']}; safe_lora at {meta['source']}; "
        f"{meta['seconds']:.0f}s, load average "
        f"{meta['load_average_start']} at start, {meta['load_average_end']} at end"
        + (" (--quick: timings not meaningful)" if args.quick else "")
    )
    if args.json is not None:
        results = {
            "meta": meta,
            "rows": [r.to_json() for r in rows],
            "hostile": [r.to_json() for r in hostile],
        }
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    missed = [row for row in rows if row.ok is False] + [r for r in hostile if not r.ok]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
