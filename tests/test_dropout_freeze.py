"""Freezing dropout (safe_lora._dropout_freeze): deterministic_lora and assert_deterministic against real
PEFT tuners (issue 3).

Every tuner runs with rates of 0.5 so that a dropout the code misses shows up as outputs that differ
between two passes inside the block. The 2-process DDP and the FSDP runs are in
``test_dropout_freeze_distributed.py``; what is found (live_dropout, the cached walk) in
``test_dropout_find.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from _dropout_nets import (
    PEFT_NAMES,
    X16,
    ConvNet,
    EmbNet,
    GPT2ConvNet,
    MhaNet,
    Net,
    T,
    adapter_names,
    all_equal,
    draws,
    flags,
    peft_net,
    perturb,
    repeatable,
)
from _dropout_nets import run_linear as _lin
from _dropout_nets import run_llama as _llama
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn

from safe_lora import (
    NoAdapterWarning,
    NondeterministicModelError,
    SafeLoraError,
    StochasticAdapterWarning,
    assert_deterministic,
    deterministic_lora,
    live_dropout,
)

# --------------------------------------------------------------------------------------------------
# Every tuner family
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], nn.Module]
    run: Callable[[nn.Module], torch.Tensor]
    # What the frozen sites must include (substrings of "name attribute").
    expect: tuple[str, ...]
    # False where peft never applies the configured dropout in forward (so nothing can vary).
    stochastic: bool = True
    slow: bool = False  # seconds to build: left to the full run


def _shaped(*shape: int) -> Callable[[nn.Module], torch.Tensor]:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return lambda m: m(x)  # type: ignore[no-any-return]


def _poly(m: nn.Module) -> torch.Tensor:
    # PolyModel takes task_ids; PeftModel.forward does not pass them through for a plain nn.Module.
    x = X16.reshape(2, 4, 16)
    return m.base_model(x, task_ids=torch.tensor([0, 1]))  # type: ignore[no-any-return]


def _xlora(tmp_path: Path) -> nn.Module:
    base = tiny_llama()
    base.config.use_cache = False  # X-LoRA refuses a cache
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    adapters = {str(i): str(save_adapter(base, lora, tmp_path / f"x{i}", seed=i)) for i in range(2)}
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=32, adapters=adapters, xlora_dropout_p=0.5, xlora_depth=2
    )
    return peft_net(config, base)


def _mlp(config: Callable[[], peft.PeftConfig]) -> Callable[[Path], nn.Module]:
    return lambda _: peft_net(config())


CASES = [
    Case(
        "lora-linear",
        _mlp(lambda: LoraConfig(target_modules=T, lora_dropout=0.5)),
        _lin,
        ("lora_dropout",),
    ),
    # PEFT creates lora_dropout for Embedding and MultiheadAttention but (peft 0.21) never applies
    # it in forward; the module is still a live site and must be frozen.
    Case(
        "lora-embedding",
        lambda _: peft_net(LoraConfig(target_modules=["emb"], lora_dropout=0.5), EmbNet()),
        lambda m: m(torch.arange(10).reshape(2, 5)),
        ("emb.lora_dropout",),
        stochastic=False,
    ),
    *[
        Case(
            f"lora-conv{d}d",
            lambda _, d=d: peft_net(LoraConfig(target_modules=["conv"], lora_dropout=0.5), ConvNet(d)),
            _shaped(2, 4, *([6] * d)),
            ("conv.lora_dropout",),
        )
        for d in (1, 2, 3)
    ],
    Case(
        "lora-transformers-Conv1D",
        lambda _: peft_net(
            LoraConfig(target_modules=["c_attn"], lora_dropout=0.5, fan_in_fan_out=True), GPT2ConvNet()
        ),
        _lin,
        ("c_attn.lora_dropout",),
    ),
    Case(
        "lora-multihead-attention",
        lambda _: peft_net(LoraConfig(target_modules=["mha"], lora_dropout=0.5), MhaNet()),
        _shaped(2, 3, 16),
        ("mha.lora_dropout", "out_proj.lora_dropout"),
        stochastic=False,
    ),
    Case(
        "dora",
        _mlp(lambda: LoraConfig(target_modules=T, lora_dropout=0.5, use_dora=True)),
        _lin,
        ("lora_dropout",),
    ),
    Case(
        "lora-monteclora",
        _mlp(
            lambda: LoraConfig(target_modules=T, lora_dropout=0.5, monteclora_config=peft.MontecloraConfig())
        ),
        _lin,
        ("lora_dropout", "lora_monteclora_sampler['default']"),
    ),
    Case(
        "adalora",
        _mlp(lambda: peft.AdaLoraConfig(target_modules=T, lora_dropout=0.5, total_step=10)),
        _lin,
        ("lora_dropout",),
    ),
    Case(
        "loha",
        _mlp(lambda: peft.LoHaConfig(target_modules=T, rank_dropout=0.5, module_dropout=0.5)),
        _lin,
        ("fc1 rank_dropout['default']", "fc1 module_dropout['default']"),
    ),
    Case(
        "lokr",
        _mlp(lambda: peft.LoKrConfig(target_modules=T, rank_dropout=0.5, module_dropout=0.5)),
        _lin,
        ("fc1 rank_dropout['default']", "fc2 module_dropout['default']"),
    ),
    Case(
        "vera",
        _mlp(lambda: peft.VeraConfig(target_modules=T, vera_dropout=0.5)),
        _lin,
        ("vera_dropout",),
    ),
    # OFT builds a MultiplicativeDropoutLayer for module_dropout, but peft 0.21's forward never calls it.
    Case(
        "oft",
        _mlp(lambda: peft.OFTConfig(target_modules=T, module_dropout=0.5, r=0, oft_block_size=4)),
        _lin,
        ("oft_dropout",),
        stochastic=False,
    ),
    Case(
        "boft",
        _mlp(lambda: peft.BOFTConfig(target_modules=T, boft_dropout=0.5, boft_block_size=4)),
        _lin,
        ("boft_dropout",),
    ),
    Case(
        "deft",
        _mlp(lambda: peft.DeftConfig(target_modules=T, deft_dropout=0.5)),
        _lin,
        ("deft_dropout",),
    ),
    Case(
        "delora",
        _mlp(lambda: peft.DeloraConfig(target_modules=T, module_dropout=0.5)),
        _lin,
        ("delora_dropout",),
    ),
    Case(
        "frod",
        _mlp(lambda: peft.FrodConfig(target_modules=T, frod_dropout=0.5)),
        _lin,
        ("frod_dropout",),
    ),
    Case(
        "gralora",
        _mlp(lambda: peft.GraloraConfig(target_modules=T, gralora_dropout=0.5)),
        _lin,
        ("gralora_dropout",),
    ),
    Case(
        "hira",
        _mlp(lambda: peft.HiraConfig(target_modules=T, hira_dropout=0.5)),
        _lin,
        ("hira_dropout",),
    ),
    Case(
        "miss",
        _mlp(lambda: peft.MissConfig(target_modules=T, miss_dropout=0.5, r=4, mini_r=4)),
        _lin,
        ("miss_dropout",),
    ),
    Case(
        "psoft",
        _mlp(lambda: peft.PsoftConfig(target_modules=T, psoft_dropout=0.5, r=4)),
        _lin,
        ("psoft_dropout",),
    ),
    Case(
        "pvera",
        _mlp(lambda: peft.PveraConfig(target_modules=T, pvera_dropout=0.5)),
        _lin,
        ("pvera_dropout", "fc1 sample_at_inference['default']"),
    ),
    Case(
        "randlora",
        _mlp(lambda: peft.RandLoraConfig(target_modules=T, randlora_dropout=0.5)),
        _lin,
        ("randlora_dropout",),
    ),
    Case(
        "supertuning",
        _mlp(lambda: peft.SupertuningConfig(target_modules=T, lora_dropout=0.5, r=4)),
        _lin,
        ("supertuning_lora_dropout",),
    ),
    Case(
        "tinylora",
        _mlp(lambda: peft.TinyLoraConfig(target_modules=T, tinylora_dropout=0.5)),
        _lin,
        ("tinylora_dropout",),
    ),
    Case(
        "unilora",
        _mlp(lambda: peft.UniLoraConfig(target_modules=T, unilora_dropout=0.5)),
        _lin,
        ("unilora_dropout",),
    ),
    Case(
        "vblora",
        _mlp(lambda: peft.VBLoRAConfig(target_modules=T, vblora_dropout=0.5, vector_length=4, num_vectors=8)),
        _lin,
        ("vblora_dropout",),
    ),
    Case(
        "poly",
        _mlp(lambda: peft.PolyConfig(target_modules=["fc1"], n_tasks=2)),
        _poly,
        ("poly_router.default",),
    ),
    Case(
        "p-tuning-lstm",
        lambda _: peft_net(
            peft.PromptEncoderConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=4,
                encoder_reparameterization_type="LSTM",
                encoder_dropout=0.5,
                encoder_num_layers=2,
                encoder_hidden_size=16,
            ),
            tiny_llama(),
        ),
        _llama,
        ("prompt_encoder.default.lstm_head dropout",),
    ),
    Case(
        "shadow",
        lambda _: peft_net(peft.ShadowConfig(shadow_dropout=0.5), tiny_llama()),
        _llama,
        ("shadow_dropout",),
    ),
    Case(
        "xlora",
        _xlora,
        _llama,
        ("internal_xlora_classifier", "lora_dropout.0", "lora_dropout.1"),
        slow=True,
    ),
]


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning", "ignore:Sparse invariant:UserWarning")
@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CASES]
)
def test_every_tuner_dropout_is_off_inside_and_back_after(case: Case, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tuner construction chatter (BOFT's CUDA extension, ...)
        model = case.build(tmp_path)
    before = flags(model)
    if case.stochastic:
        assert not all_equal(draws(lambda: case.run(model))), "precondition: the adapter's dropout is live"

    with deterministic_lora(model) as frozen:
        inside = draws(lambda: case.run(model))
        described = [f"{s.name} {s.attribute}" for s in frozen]
        for fragment in case.expect:
            assert any(fragment in d for d in described), (fragment, described)
        assert all(s.kind == "adapter" for s in frozen)
        assert all(model.get_submodule(s.name).training is False for s in frozen)
        assert adapter_names(live_dropout(model)) == set()
    assert all_equal(inside)
    assert flags(model) == before
    if case.stochastic:
        assert not all_equal(draws(lambda: case.run(model))), "adapter dropout must be live again"


def test_every_peft_tuner_with_a_dropout_rate_is_covered() -> None:
    """A new PEFT tuner with a dropout rate in its config must get a row in CASES."""
    covered = {
        "LoraConfig", "AdaLoraConfig", "LoHaConfig", "LoKrConfig", "VeraConfig", "OFTConfig",
        "BOFTConfig", "DeftConfig", "DeloraConfig", "FrodConfig", "GraloraConfig", "HiraConfig",
        "MissConfig", "PsoftConfig", "PveraConfig", "RandLoraConfig", "SupertuningConfig",
        "TinyLoraConfig", "UniLoraConfig", "VBLoRAConfig", "PromptEncoderConfig", "ShadowConfig",
        "XLoraConfig",
    }  # fmt: skip
    with_rate = {
        name
        for name in dir(peft)
        if name.endswith("Config")
        and dataclasses.is_dataclass(cls := getattr(peft, name))
        and any("drop" in f.name and isinstance(f.default, float) for f in dataclasses.fields(cls))
    }
    assert with_rate - covered == set()


# --------------------------------------------------------------------------------------------------
# Base dropout: left alone, or frozen with include_base
# --------------------------------------------------------------------------------------------------


def _llama_attention_dropout() -> nn.Module:
    return tiny_llama(num_hidden_layers=1, attention_dropout=0.5).train()  # type: ignore[no-any-return]


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)  # dropouts 0.1
    return GPT2LMHeadModel(cfg)


BASES = [
    # (id, base, lora targets, run, a base site that must be listed)
    ("nn.Dropout", lambda: Net(base_dropout=0.5), ["fc1"], _lin, "base_model.model.drop"),
    (
        "llama-attention_dropout",
        _llama_attention_dropout,
        ["q_proj"],
        _llama,
        "base_model.model.model.layers.0.self_attn",
    ),
    ("gpt2-attn_dropout.p", _gpt2, ["c_attn"], _llama, "base_model.model.transformer.h.0.attn"),
]


@pytest.mark.parametrize(
    ("base", "targets", "run", "site"), [b[1:] for b in BASES], ids=[b[0] for b in BASES]
)
def test_base_dropout_keeps_its_mode_unless_include_base(
    base: Callable[[], nn.Module], targets: list[str], run: Callable[[nn.Module], torch.Tensor], site: str
) -> None:
    config = LoraConfig(target_modules=targets, lora_dropout=0.5, fan_in_fan_out="c_attn" in targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_net(config, base())
    before = flags(model)
    base_sites = {s.name for s in live_dropout(model) if s.kind == "base"}
    assert site in base_sites

    with deterministic_lora(model):
        assert flags(model) == {
            **before,
            **{n: False for n in before if ".lora_dropout." in n},
        }, "only adapter dropout changes"
        assert {s.name for s in live_dropout(model)} == base_sites
        assert not all_equal(draws(lambda: run(model))), "base dropout still live"
    assert flags(model) == before

    with deterministic_lora(model, include_base=True) as frozen:
        assert live_dropout(model) == []
        assert base_sites <= {s.name for s in frozen if s.kind == "base"}
        assert all_equal(draws(lambda: run(model)))
    assert flags(model) == before


def test_no_parameter_rate_or_requires_grad_changes() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5), Net(base_dropout=0.3))
    model.base_model.model.fc2.lora_B.default.weight.requires_grad_(False)  # an odd choice to keep
    before = snapshot(model)
    with deterministic_lora(model, include_base=True):
        inside = snapshot(model)
        assert inside["requires_grad"] == before["requires_grad"]
        assert inside["attrs"] == before["attrs"]
        for key, value in before["state"].items():
            assert torch.equal(inside["state"][key], value), key
        assert [s.p for s in live_dropout(model.train())] == []
        assert model.base_model.model.fc1.lora_dropout.default.p == 0.5
    assert_unchanged(model, before)
    assert all(not m._forward_pre_hooks for m in model.modules()), "hooks removed on exit"


def test_gradients_flow_and_a_training_step_runs_inside() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    with deterministic_lora(model):
        loss = model(X16).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        # Same weights, no dropout: the graph is the eval-mode one, with gradients.
        with torch.no_grad():
            expected = copy.deepcopy(model).eval()(X16)
        assert torch.equal(model(X16), expected)
    assert all(not torch.equal(p, s) for p, s in zip(trainable, start, strict=True))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Restoring flags: exceptions, nesting, decorator, threads, model.train() inside, user choices
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_net() -> PeftModel:
    return peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))


def adapter_dropout_flags(model: nn.Module) -> dict[str, bool]:
    return {n: f for n, f in flags(model).items() if ".lora_dropout." in n}


def test_exception_inside_restores_and_propagates(lora_net: PeftModel) -> None:
    lora_net.base_model.model.fc2.eval()  # a mixed tree, to restore exactly
    before = flags(lora_net)

    def fails_inside() -> None:
        with deterministic_lora(lora_net):
            lora_net.train()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fails_inside()
    assert flags(lora_net) == before
    assert not repeatable(lora_net)


def test_nested_blocks_keep_dropout_off_until_the_outer_exits(lora_net: PeftModel) -> None:
    before = flags(lora_net)
    with deterministic_lora(lora_net):
        with deterministic_lora(lora_net, include_base=True):
            assert repeatable(lora_net)
        assert set(adapter_dropout_flags(lora_net).values()) == {False}, "inner exit re-enabled dropout"
        assert repeatable(lora_net)
        assert live_dropout(lora_net) == []
    assert flags(lora_net) == before
    assert not repeatable(lora_net)


def test_decorator_form_enters_afresh_on_each_call(lora_net: PeftModel) -> None:
    before = flags(lora_net)

    @deterministic_lora(lora_net)
    def evaluate(depth: int) -> bool:
        if depth:  # re-entrant through recursion
            evaluate(depth - 1)
        return repeatable(lora_net) and live_dropout(lora_net) == []

    assert evaluate.__name__ == "evaluate"
    assert evaluate(2)
    assert flags(lora_net) == before
    assert not repeatable(lora_net)
    assert evaluate(0)
    assert flags(lora_net) == before


def test_decorator_restores_on_exception(lora_net: PeftModel) -> None:
    before = flags(lora_net)

    @deterministic_lora(lora_net)
    def broken() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        broken()
    assert flags(lora_net) == before


def test_two_threads_leaving_in_non_lifo_order(lora_net: PeftModel) -> None:
    before = flags(lora_net)
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    left = [threading.Event(), threading.Event()]
    cm = deterministic_lora(lora_net)  # one object shared by both threads
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with cm:
                entered[i].set()
                assert leave[i].wait(10)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
        finally:
            left[i].set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    threads[0].start()
    assert entered[0].wait(10)
    threads[1].start()
    assert entered[1].wait(10)
    leave[0].set()  # the first to enter leaves first
    assert left[0].wait(10)
    # Checked before any forward pass: the pre-hooks would turn a wrongly restored flag off again.
    assert set(adapter_dropout_flags(lora_net).values()) == {False}, "thread 1 still holds the block"
    assert adapter_names(live_dropout(lora_net)) == set()
    assert repeatable(lora_net)
    leave[1].set()
    for t in threads:
        t.join(10)
    assert errors == []
    assert flags(lora_net) == before
    assert not repeatable(lora_net)


def test_forward_passes_from_two_threads_inside_blocks(lora_net: PeftModel) -> None:
    before = flags(lora_net)
    outs: dict[int, list[torch.Tensor]] = {}

    def worker(i: int) -> None:
        with deterministic_lora(lora_net):
            outs[i] = draws(lambda: lora_net(X16), n=5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all_equal(outs[0] + outs[1])
    assert flags(lora_net) == before


@pytest.mark.parametrize("switch", ["train", "eval"])
def test_train_or_eval_inside_the_block_is_undone(lora_net: PeftModel, switch: str) -> None:
    lora_net.base_model.model.fc1.base_layer.eval()  # frozen on purpose: must stay so
    before = flags(lora_net)
    with deterministic_lora(lora_net):
        getattr(lora_net, switch)()
        assert repeatable(lora_net), "adapter dropout stays off after model.train()"
        assert adapter_names(live_dropout(lora_net)) == set()
    assert flags(lora_net) == before
    assert lora_net.base_model.model.fc1.base_layer.training is False


def test_calls_that_bypass_the_root_stay_frozen_after_train(lora_net: PeftModel) -> None:
    # PeftModel.generate and user code call inner modules directly, skipping the root's hooks.
    base = lora_net.get_base_model()
    with deterministic_lora(lora_net):
        lora_net.train()
        assert all_equal(draws(lambda: base(X16)))
        assert all_equal(draws(lambda: base.fc1(X16)))
    assert not all_equal(draws(lambda: base.fc1(X16)))


def test_submodule_frozen_on_purpose_stays_frozen(lora_net: PeftModel) -> None:
    fc2 = lora_net.base_model.model.fc2
    fc2.eval()  # the user's choice: fc2's adapter runs without dropout during training
    before = flags(lora_net)
    with deterministic_lora(lora_net):
        assert fc2.training is False
        assert fc2.lora_dropout.default.training is False
    assert flags(lora_net) == before
    assert fc2.lora_dropout.default.training is False
    assert lora_net.base_model.model.fc1.lora_dropout.default.training is True


# A model with several kinds of flags to shuffle: a PeftMixedModel with a LoRA layer, a LoHa layer
# (whose own flag gates its dropout) and base dropout.
@functools.cache
def property_model() -> nn.Module:
    torch.manual_seed(0)
    lora = LoraConfig(target_modules=["fc1"], lora_dropout=0.5)
    model = get_peft_model(Net(base_dropout=0.5), lora, adapter_name="first", mixed=True)
    model.add_adapter("second", peft.LoHaConfig(target_modules=["fc2"], rank_dropout=0.5, module_dropout=0.2))
    model.set_adapter(["first", "second"])
    perturb(model)
    return model


N_MODULES = 24


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    assignment=st.lists(st.booleans(), min_size=N_MODULES, max_size=N_MODULES),
    include_base=st.booleans(),
    inside=st.lists(st.sampled_from(["train", "eval", "nest", "nest_base", "forward"]), max_size=4),
)
def test_property_exit_restores_every_flag_exactly(
    assignment: list[bool], include_base: bool, inside: list[str]
) -> None:
    model = property_model()
    assert len(list(model.modules())) == N_MODULES
    for module, flag in zip(model.modules(), assignment, strict=True):
        module.training = flag
    before = flags(model)
    with deterministic_lora(model, include_base=include_base):
        untouched = {
            n: f for n, f in flags(model).items() if ".lora_dropout." not in n and not n.endswith(".fc2")
        }
        if not include_base:
            assert untouched == {n: before[n] for n in untouched}
        for op in inside:
            if op in ("train", "eval"):
                getattr(model, op)()
            elif op == "forward":
                with torch.no_grad():
                    model(X16)
            else:
                with deterministic_lora(model, include_base=op == "nest_base"):
                    model.train()
        assert adapter_names(live_dropout(model)) == set()
    assert flags(model) == before


# --------------------------------------------------------------------------------------------------
# Ways the model arrives: PeftModel, tuner, injected, transformers load_adapter, wrappers
# --------------------------------------------------------------------------------------------------


def _injected(_: Path) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(target_modules=T, lora_dropout=0.5), Net())
    perturb(model)
    return model.train(), model


def _transformers_load_adapter(tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    base = tiny_llama()
    lora = LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    path = save_adapter(base, lora, tmp_path / "adapter")
    base.load_adapter(str(path))
    return base.train(), base


def _compiled(_: Path) -> tuple[nn.Module, nn.Module]:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    return torch.compile(model, backend="eager"), model  # type: ignore[return-value]


def _accelerate(_: Path) -> tuple[nn.Module, nn.Module]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    prepared = Accelerator(cpu=True).prepare(model)
    # Accelerator state is a process-wide singleton; leave none behind for other tests.
    AcceleratorState._reset_state(reset_partial_state=True)
    return prepared, model


def _data_parallel(_: Path) -> tuple[nn.Module, nn.Module]:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    return nn.DataParallel(model), model


LLAMA_NAMES = {f"model.layers.{i}.self_attn.{p}_proj.lora_dropout.default" for i in (0, 1) for p in "qv"}
ARRIVALS = [
    (
        "PeftModel",
        lambda _: (m := peft_net(LoraConfig(target_modules=T, lora_dropout=0.5)), m),
        _lin,
        PEFT_NAMES,
    ),
    (
        "tuner-model",
        lambda _: (m := peft_net(LoraConfig(target_modules=T, lora_dropout=0.5)).base_model, m),
        _lin,
        {f"model.fc{i}.lora_dropout.default" for i in (1, 2)},
    ),
    ("inject_adapter_in_model", _injected, _lin, {f"fc{i}.lora_dropout.default" for i in (1, 2)}),
    ("transformers-load_adapter", _transformers_load_adapter, _llama, LLAMA_NAMES),
    ("torch.compile", _compiled, _lin, PEFT_NAMES),
    ("accelerate", _accelerate, _lin, PEFT_NAMES),
    ("DataParallel", _data_parallel, _lin, PEFT_NAMES),
]


@pytest.mark.parametrize(("build", "run", "names"), [a[1:] for a in ARRIVALS], ids=[a[0] for a in ARRIVALS])
def test_accepts_every_way_a_model_arrives(
    build: Callable[[Path], tuple[nn.Module, nn.Module]],
    run: Callable[[nn.Module], torch.Tensor],
    names: set[str],
    tmp_path: Path,
) -> None:
    model, inner = build(tmp_path)
    before = flags(model)
    assert adapter_names(live_dropout(model)) == names, "names without wrapper prefixes"
    assert not all_equal(draws(lambda: run(model)))
    with deterministic_lora(model) as frozen:
        assert {s.name for s in frozen} == names
        assert all_equal(draws(lambda: run(model)))
        inner.train()  # through the unwrapped model too
        assert all_equal(draws(lambda: run(model)))
    assert flags(model) == before
    assert not all_equal(draws(lambda: run(model)))


@pytest.mark.parametrize("wrap", [_compiled, _data_parallel], ids=["torch.compile", "DataParallel"])
def test_wrapper_own_flag_is_restored_after_train_inside(
    wrap: Callable[[Path], tuple[nn.Module, nn.Module]], tmp_path: Path
) -> None:
    model, _ = wrap(tmp_path)
    model.eval()  # the wrapper itself too, not only the model inside it
    before = flags(model)
    with deterministic_lora(model):
        model.train()  # through the wrapper: flips its own flag as well
    assert flags(model) == before
    assert model.training is False


def test_torch_compile_recompiles_after_exit_and_survives_train_inside() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5))
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):  # enter twice: the graph cached for the frozen flags must not leak out
        assert not all_equal(draws(lambda: compiled(X16)))
        with deterministic_lora(compiled):
            compiled.train()
            assert all_equal(draws(lambda: compiled(X16)))
            assert torch.equal(compiled(X16), copy.deepcopy(model).eval()(X16).detach())


# --------------------------------------------------------------------------------------------------
# No adapter, stochastic-by-design adapters
# --------------------------------------------------------------------------------------------------


def test_model_without_adapters_warns_and_changes_nothing() -> None:
    model = Net(base_dropout=0.5).train()
    model.fc2.eval()
    before = flags(model)
    block = deterministic_lora(model)
    with pytest.warns(NoAdapterWarning, match="found none in Net"):
        frozen = block.__enter__()
    try:
        assert frozen == []
        assert flags(model) == before
        assert not all_equal(draws(lambda: model(X16))), "base dropout untouched"
    finally:
        block.__exit__(None, None, None)
    assert flags(model) == before


def test_pvera_sampling_at_inference_warns_naming_the_layer() -> None:
    model = peft_net(peft.PveraConfig(target_modules=["fc1"], sample_at_inference=True))
    block = deterministic_lora(model)
    with pytest.warns(StochasticAdapterWarning, match=r"base_model\.model\.fc1 \(adapter 'default'\)"):
        block.__enter__()
    try:
        assert not all_equal(draws(lambda: model(X16)))
    finally:
        block.__exit__(None, None, None)
    # Even in eval mode it samples, so serving must refuse it.
    model.eval()
    assert not all_equal(draws(lambda: model(X16)))
    (site,) = live_dropout(model)
    assert (site.name, site.freezable) == ("base_model.model.fc1", False)
    with pytest.raises(NondeterministicModelError, match="sample_at_inference=False"):
        assert_deterministic(model)


def test_pvera_without_sampling_at_inference_is_frozen_silently() -> None:
    model = peft_net(peft.PveraConfig(target_modules=["fc1"]))  # pvera_dropout=0: only sampling
    assert not all_equal(draws(lambda: model(X16)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with deterministic_lora(model) as frozen:
            assert all_equal(draws(lambda: model(X16)))
    assert [(s.name, s.attribute) for s in frozen] == [
        ("base_model.model.fc1", "sample_at_inference['default']")
    ]


# --------------------------------------------------------------------------------------------------
# live_dropout / assert_deterministic
# --------------------------------------------------------------------------------------------------


def test_assert_deterministic_lists_sites_and_says_what_to_do() -> None:
    model = peft_net(LoraConfig(target_modules=T, lora_dropout=0.5), Net(base_dropout=0.25))
    with pytest.raises(NondeterministicModelError) as info:
        assert_deterministic(model)
    err = info.value
    assert isinstance(err, SafeLoraError)
    assert isinstance(err, RuntimeError)
    assert err.sites == live_dropout(model)
    assert len(err.sites) == 3
    message = str(err)
    assert "found 3 live dropout site(s) (2 adapter, 1 base)" in message
    assert "base_model.model.fc1.lora_dropout.default (adapter, Dropout.p, p=0.5)" in message
    assert "base_model.model.drop (base, Dropout.p, p=0.25)" in message
    assert "model.eval()" in message
    assert "deterministic_lora(model, include_base=True)" in message

    with (
        deterministic_lora(model),
        pytest.raises(NondeterministicModelError, match=r"\(0 adapter, 1 base\)"),
    ):
        assert_deterministic(model)
    with deterministic_lora(model, include_base=True):
        assert_deterministic(model)
    assert_deterministic(model.eval())


def test_assert_deterministic_message_is_capped_for_big_models() -> None:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft_net(LoraConfig(target_modules=targets, lora_dropout=0.1), tiny_llama())
    with pytest.raises(NondeterministicModelError, match=r"(?s)found 14 live .*\n  and 4 more\n"):
        assert_deterministic(model)


def test_rejects_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, found dict"):
        deterministic_lora({})  # type: ignore[arg-type]
