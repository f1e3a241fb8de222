"""_attach: loading never advances the caller's global torch RNG, whichever path the load takes.

Raw PEFT does: it initialises every adapter tensor (kaiming, normal, a random prompt) before the file
overwrites it. safe_lora fills tensors it knows from the file straight from it, and runs the paths that
keep PEFT's init (tuners it cannot pre-fill, inits that need the base, keys missing under
``strict=False``) inside ``torch.random.fork_rng``, so the values are PEFT's and the caller's stream
is where it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from _tuners import TUNERS, make_base, tuner_params
from conftest import save_adapter, tiny_llama
from peft import PeftModel
from torch import nn

from safe_lora import load_adapter, load_for_inference, load_for_training
from safe_lora.errors import SafeLoraError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QV = ["q_proj", "v_proj"]
# One config per load path: the fast path (LoRA, DoRA), PEFT's default path (AdaLoRA, a prompt, an
# init that reads the base), and a LoRA whose file lacks keys (loaded with strict=False).
CONFIGS: dict[str, Callable[[], peft.PeftConfig]] = {
    "lora": lambda: peft.LoraConfig(target_modules=QV, r=4, init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(target_modules=QV, r=4, use_dora=True),
    "adalora": lambda: peft.AdaLoraConfig(target_modules=QV, init_r=4, total_step=10),
    "prompt-tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    # Randomised SVD of the base weight: PEFT's init draws from the RNG, and it must keep running.
    "pissa-niter": lambda: peft.LoraConfig(target_modules=QV, r=4, init_lora_weights="pissa_niter_2"),
}
LOADERS: dict[str, Callable[[Any, Path], Any]] = {
    "inference": lambda model, path: load_for_inference(model, path),
    "training": lambda model, path: load_for_training(model, path),
    "load_adapter": lambda model, path: load_adapter(
        load_for_inference(model, path, adapter_name="first"), path, adapter_name="second"
    ),
}


def _after_load(load: Callable[[], Any]) -> torch.Tensor:
    """The global RNG's next draw after ``load()``, seeded the same before every call."""
    torch.manual_seed(1234)
    load()
    return torch.rand(8)


def _untouched() -> torch.Tensor:
    torch.manual_seed(1234)
    return torch.rand(8)


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_loading_never_advances_the_global_rng(tmp_path: Path, kind: str, loader: str) -> None:
    base = tiny_llama()
    if kind == "prompt-tuning" and loader != "inference":
        pytest.skip("a prompt-learning adapter loads frozen only, one per model (as in PEFT)")
    path = save_adapter(base, CONFIGS[kind](), tmp_path / kind, train_steps=1)
    state = torch.get_rng_state()
    assert torch.equal(_after_load(lambda: LOADERS[loader](copy.deepcopy(base), path)), _untouched())
    torch.set_rng_state(state)


def test_raw_peft_advances_it_so_the_test_above_can_fail(tmp_path: Path) -> None:
    base = tiny_llama()
    path = save_adapter(base, CONFIGS["lora"](), tmp_path / "lora", train_steps=1)
    drawn = _after_load(lambda: PeftModel.from_pretrained(copy.deepcopy(base), path))
    assert not torch.equal(drawn, _untouched())


def test_strict_false_keeps_peft_s_init_for_missing_keys_without_drawing(tmp_path: Path) -> None:
    """A key missing from the file keeps PEFT's init, drawn from a forked stream: the value is PEFT's."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    path = save_adapter(base, CONFIGS["lora"](), tmp_path / "lora", train_steps=1)
    tensors = load_file(path / "adapter_model.safetensors")
    dropped = sorted(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    save_file({k: v for k, v in tensors.items() if k not in dropped}, path / "adapter_model.safetensors")
    torch.manual_seed(7)
    ref = PeftModel.from_pretrained(copy.deepcopy(base), path)
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="missing"):
        ours = load_for_inference(copy.deepcopy(base), path, strict=False)
    assert torch.equal(torch.rand(8), _seeded_draw_after_nothing(7))
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(value, our_state[key]), key


def _seeded_draw_after_nothing(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(8)


def _params(model: nn.Module) -> dict[str, tuple[type, bool, torch.dtype, torch.device, dict[str, Any]]]:
    return {
        n: (type(p), p.requires_grad, p.dtype, p.device, dict(vars(p)))
        for n, p in model.named_parameters(remove_duplicate=False)
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("tuner", tuner_params([t for t in TUNERS if t.available]))
def test_every_parameter_is_the_kind_peft_makes(
    tuner: Any, training: bool, dtype: torch.dtype, tmp_path: Path
) -> None:
    # Where PEFT's device move and upcast provably leave the new tensors as made, they are allocated
    # directly, without running either: each parameter must still be what raw PEFT's load gives it --
    # its class, requires_grad, dtype, device and own attributes.
    base = make_base(tuner.base).to(dtype)
    path = save_adapter(make_base(tuner.base), copy.deepcopy(tuner.config()), tmp_path / "a")
    try:
        torch.manual_seed(0)
        ref = PeftModel.from_pretrained(copy.deepcopy(base), str(path), is_trainable=training)
    except Exception as exc:  # a tuner raw PEFT cannot load on this base / dtype
        pytest.skip(f"raw PEFT: {type(exc).__name__}: {str(exc)[:120]}")
    loader = load_for_training if training else load_for_inference
    try:
        ours = loader(copy.deepcopy(base), path)
    except SafeLoraError as exc:  # refused, e.g. a no-op adapter: nothing to compare
        pytest.skip(f"refused: {exc}"[:160])
    want, got = _params(ref), _params(ours)
    if not training:  # frozen for inference, by design (raw PEFT leaves some ParameterDict entries on)
        assert not any(v[1] for v in got.values())
        want = {n: (v[0], False, *v[2:]) for n, v in want.items()}
    assert {n: v[:4] for n, v in got.items()} == {n: v[:4] for n, v in want.items()}
    assert {n: sorted(v[4]) for n, v in got.items()} == {n: sorted(v[4]) for n, v in want.items()}
