"""``safe-lora demo``: the failure of raw PEFT loading and the fix, on a network built in code.

A tiny MLP gets a LoRA adapter with dropout on its first layer, trained for a few hundred Adam
steps on synthetic data and saved with ``save_pretrained``. One input is then run ``trials`` times
through each way of loading that folder, and the distinct outputs are counted. Nothing is
downloaded; the whole run takes about a second after the imports.

The network's first layer has only two inputs, so LoRA dropout on them has four outcomes: both
kept (scaled by 1/(1-p)), either one dropped, or both dropped -- in which case the adapter adds
exactly nothing and the output is, bit for bit, the base model's.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from safe_lora._dropout_freeze import deterministic_lora
from safe_lora._loading import load_for_inference, load_for_training

__all__ = ["DemoReport", "OutputCount", "VariantResult", "run_demo"]

VariantKey = Literal["peft-trainable", "peft-inference", "load_for_inference", "load_for_training"]

RANK = 4
ALPHA = 8
TRAIN_STEPS = 300
LEARNING_RATE = 1e-2
SAMPLES = 256
# The one input every variant is run on; any point where the trained adapter moves the output works.
INPUT = (0.5, -1.0)
MAX_TRIALS = 100_000

# Loads the saved adapter into a copy of the base; returns the model and the context to run it in.
_Loader = Callable[[nn.Module], tuple[nn.Module, AbstractContextManager[Any]]]


def _round(value: float) -> float:
    # 9 significant digits tell every float32 apart, and the rounded float prints (repr) and
    # serialises (json) to the same short text.
    return float(f"{value:.9g}")


@dataclass(frozen=True)
class OutputCount:
    """One distinct output of a variant and how often it appeared.

    Attributes:
        value: The output, rounded to 9 significant digits (exact for float32).
        count: How many of the trials gave it.
        is_base: It equals the base model's output exactly: the adapter contributed nothing.
        is_adapter: It equals the trained adapter's output in eval mode exactly.
    """

    value: float
    count: int
    is_base: bool
    is_adapter: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return {
            "value": self.value,
            "count": self.count,
            "is_base": self.is_base,
            "is_adapter": self.is_adapter,
        }


@dataclass(frozen=True)
class VariantResult:
    """The outputs of one way of loading the adapter.

    Attributes:
        key: A stable identifier, e.g. ``"peft-trainable"``.
        code: The loading code, as a user would write it.
        safe: Whether this is a safe_lora way (expected to give exactly one output).
        outputs: The distinct outputs, most frequent first (ties: smaller value first).
    """

    key: VariantKey
    code: str
    safe: bool
    outputs: list[OutputCount]

    @property
    def distinct(self) -> int:
        """How many different outputs the one input gave."""
        return len(self.outputs)

    @property
    def deterministic(self) -> bool:
        """Exactly one output, i.e. the same answer on every call."""
        return self.distinct == 1

    @property
    def base_count(self) -> int:
        """How many trials gave the base model's output (the adapter dropped out entirely)."""
        return sum(o.count for o in self.outputs if o.is_base)

    @property
    def adapter_count(self) -> int:
        """How many trials gave the trained adapter's output (eval mode)."""
        return sum(o.count for o in self.outputs if o.is_adapter)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields and properties."""
        return {
            "key": self.key,
            "code": self.code,
            "safe": self.safe,
            "distinct": self.distinct,
            "deterministic": self.deterministic,
            "base_count": self.base_count,
            "adapter_count": self.adapter_count,
            "outputs": [o.to_dict() for o in self.outputs],
        }


@dataclass(frozen=True)
class DemoReport:
    """Everything ``safe-lora demo`` prints.

    Attributes:
        trials: Runs of the one input through each variant.
        seed: The seed of the network, the data, the training and every variant's runs.
        dropout: The adapter's ``lora_dropout``.
        rank: The adapter's ``r``.
        alpha: The adapter's ``lora_alpha``.
        train_steps: Adam steps the adapter was trained for.
        loss_base: Mean squared error of the base model on the synthetic data.
        loss_adapter: The same with the trained adapter (eval mode).
        input: The one input, ``[x0, x1]``.
        base_output: The base model's output for it.
        adapter_output: The trained adapter's output for it, in eval mode, before saving.
        variants: One result per way of loading, in the order they ran.
    """

    trials: int
    seed: int
    dropout: float
    rank: int
    alpha: int
    train_steps: int
    loss_base: float
    loss_adapter: float
    input: list[float]
    base_output: float
    adapter_output: float
    variants: list[VariantResult]

    @property
    def ok(self) -> bool:
        """Every safe variant gave exactly one output, and it is the trained adapter's."""
        return all(v.deterministic and v.outputs[0].is_adapter for v in self.variants if v.safe)

    @property
    def verdict(self) -> str:
        """The one-line conclusion."""
        raw = next(v for v in self.variants if v.key == "peft-trainable")
        safe = [v for v in self.variants if v.safe]
        if not self.ok:
            failed = ", ".join(f"{v.key} gave {v.distinct} output(s)" for v in safe if not v.deterministic)
            failed = failed or "a safe variant did not reproduce the trained adapter's output"
            return f"FAILED: expected one output, the trained adapter's, from every safe variant — {failed}."
        if raw.deterministic:
            return (
                f"with lora_dropout={self.dropout:g} every variant gave one output; rerun with --dropout 0.5 "
                f"to see raw PEFT's training mode vary."
            )
        adapter = raw.adapter_count
        adapter_share = "none" if not adapter else f"{100 * adapter / self.trials:.0f}%"
        return (
            f"raw PEFT loaded with is_trainable=True gave {raw.distinct} different outputs for one input "
            f"({100 * raw.base_count / self.trials:.0f}% of them the base model's, the adapter silently "
            f"gone; {adapter_share} the trained adapter's); load_for_inference and load_for_training "
            f"inside deterministic_lora gave exactly one: the trained adapter's."
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields, plus ``ok`` and ``verdict``.

        Example:
            >>> import json
            >>> report = json.loads(json.dumps(run_demo(trials=10).to_dict()))
            >>> report["trials"], report["ok"]
            (10, True)
        """
        return {
            "trials": self.trials,
            "seed": self.seed,
            "dropout": self.dropout,
            "rank": self.rank,
            "alpha": self.alpha,
            "train_steps": self.train_steps,
            "loss_base": self.loss_base,
            "loss_adapter": self.loss_adapter,
            "input": list(self.input),
            "base_output": self.base_output,
            "adapter_output": self.adapter_output,
            "variants": [v.to_dict() for v in self.variants],
            "ok": self.ok,
            "verdict": self.verdict,
        }


class DemoMLP(nn.Module):
    """Linear(2, 8) -> ReLU -> Linear(8, 1): small enough that dropout's effect is plain to see."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


def _target(x: torch.Tensor) -> torch.Tensor:
    """The synthetic function the adapter learns."""
    return torch.sin(2 * x[:, :1]) + x[:, 1:] ** 2


def _train_and_save(base: DemoMLP, folder: Path, *, dropout: float, seed: int) -> tuple[float, float, float]:
    """Train a LoRA adapter on a copy of ``base`` and save it.

    Returns:
        ``(loss_base, loss_adapter, adapter_output)``: the MSE without and with the adapter, and the
        adapter's output (eval mode) for :data:`INPUT`.
    """
    torch.manual_seed(seed)
    inputs = torch.randn(SAMPLES, 2)
    targets = _target(inputs)
    config = LoraConfig(target_modules=["fc1"], r=RANK, lora_alpha=ALPHA, lora_dropout=dropout)
    model = get_peft_model(copy.deepcopy(base), config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    model.train()  # dropout live while training, as in a real fine-tuning run
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        loss = torch.mean((model(inputs) - targets) ** 2)
        torch.autograd.backward(loss)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        loss_base = float(torch.mean((base(inputs) - targets) ** 2))
        loss_adapter = float(torch.mean((model(inputs) - targets) ** 2))
        adapter_output = float(model(torch.tensor([INPUT])).item())
    model.save_pretrained(str(folder), save_embedding_layers=False)
    return loss_base, loss_adapter, adapter_output


def _variants(folder: Path) -> list[tuple[VariantKey, str, bool, _Loader]]:
    """``(key, code, safe, load)``: ``load(base)`` returns the model and the context to run it in."""
    path = str(folder)

    def peft_trainable(base: nn.Module) -> tuple[nn.Module, AbstractContextManager[Any]]:
        return PeftModel.from_pretrained(base, path, is_trainable=True), nullcontext()

    def peft_inference(base: nn.Module) -> tuple[nn.Module, AbstractContextManager[Any]]:
        return PeftModel.from_pretrained(base, path), nullcontext()

    def safe_inference(base: nn.Module) -> tuple[nn.Module, AbstractContextManager[Any]]:
        return load_for_inference(base, path), nullcontext()

    def safe_training(base: nn.Module) -> tuple[nn.Module, AbstractContextManager[Any]]:
        model = load_for_training(base, path)
        return model, deterministic_lora(model)

    return [
        ("peft-trainable", "PeftModel.from_pretrained(base, path, is_trainable=True)", False, peft_trainable),
        ("peft-inference", "PeftModel.from_pretrained(base, path)", False, peft_inference),
        ("load_for_inference", "load_for_inference(base, path)", True, safe_inference),
        (
            "load_for_training",
            "load_for_training(base, path), run inside deterministic_lora(model)",
            True,
            safe_training,
        ),
    ]


def run_demo(trials: int = 200, seed: int = 0, dropout: float = 0.5) -> DemoReport:
    """Train, save and reload a LoRA adapter four ways; count the outputs one input gives each way.

    Seeded throughout: the same arguments give the same report on the same machine. Runs on one
    torch thread (the thread count is restored on return).

    Args:
        trials: How many times the input is run through each variant (1 to 100000).
        seed: Seeds the network, the data, the training and each variant's runs.
        dropout: The adapter's ``lora_dropout``, in [0, 1).

    Returns:
        The report; ``report.ok`` is true when every safe variant gave exactly one output, the
        trained adapter's.

    Raises:
        ValueError: ``trials`` or ``dropout`` is out of range.

    Example:
        >>> report = run_demo(trials=100, seed=0)
        >>> [v.distinct for v in report.variants], report.ok
        ([4, 1, 1, 1], True)
    """
    if not 1 <= trials <= MAX_TRIALS:
        raise ValueError(f"trials must be between 1 and {MAX_TRIALS}, found {trials} — pass e.g. trials=200.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), found {dropout!r} — pass e.g. dropout=0.5.")

    threads = torch.get_num_threads()
    try:
        # Tensors this small run several times faster on one thread than on contended cores, and
        # one thread makes the float results independent of the machine's core count.
        torch.set_num_threads(1)
        return _run(trials, seed, dropout)
    finally:
        torch.set_num_threads(threads)


def _run(trials: int, seed: int, dropout: float) -> DemoReport:
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="safe-lora-demo-") as tmp:
        # PEFT's notes about a model built in code (no hub config, no name) would only distract here.
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        base = DemoMLP().eval()  # eval, as from_pretrained returns base models
        folder = Path(tmp) / "adapter"
        loss_base, loss_adapter, adapter_value = _train_and_save(base, folder, dropout=dropout, seed=seed)
        x = torch.tensor([INPUT])
        with torch.no_grad():
            base_value = float(base(x).item())

        results = []
        for key, code, safe, load in _variants(folder):
            model, context = load(copy.deepcopy(base))
            torch.manual_seed(seed)  # every variant sees the same random stream
            with context, torch.no_grad():
                counts = Counter(float(model(x).item()) for _ in range(trials))
            outputs = [
                OutputCount(_round(value), count, value == base_value, value == adapter_value)
                for value, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
            ]
            results.append(VariantResult(key, code, safe, outputs))

    return DemoReport(
        trials=trials,
        seed=seed,
        dropout=dropout,
        rank=RANK,
        alpha=ALPHA,
        train_steps=TRAIN_STEPS,
        loss_base=_round(loss_base),
        loss_adapter=_round(loss_adapter),
        input=list(INPUT),
        base_output=_round(base_value),
        adapter_output=_round(adapter_value),
        variants=results,
    )
