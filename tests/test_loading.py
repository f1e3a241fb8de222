"""load_for_inference / load_for_training: the guarantees of issue 2, against real PEFT."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import MLP, assert_unchanged, make_mlp, save_adapter, snapshot, tiny_llama
from peft import LoHaConfig, LoraConfig, PeftModel, PromptTuningConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from safe_lora import (
    AdapterConfigError,
    AdapterMergeError,
    AdapterNotFoundError,
    AdapterWeightsError,
    BaseModelMismatchWarning,
    SafeLoraError,
    SafeLoraWarning,
    UnsafeAdapterError,
    load_for_inference,
    load_for_training,
)

X = torch.tensor([[0.5, -1.0]])


def outputs(model: nn.Module, n: int = 200) -> Counter[float]:
    with torch.no_grad():
        return Counter(float(model(X).item()) for _ in range(n))


# --- the seed scenario: raw PEFT varies, safe_lora does not ------------------------------------


def test_raw_peft_trainable_load_is_nondeterministic(mlp_adapter: Path) -> None:
    """The bug we exist for, reproduced: if PEFT ever fixes it, this test tells us."""
    torch.manual_seed(0)
    raw = PeftModel.from_pretrained(make_mlp(), str(mlp_adapter), is_trainable=True)
    seen = outputs(raw)
    base_out = float(make_mlp()(X).item())
    inference_out = float(PeftModel.from_pretrained(make_mlp(), str(mlp_adapter)).eval()(X).item())
    assert len(seen) > 1
    assert base_out in seen  # every LoRA input dropped: silently the base model
    assert seen.most_common(1)[0][0] != pytest.approx(inference_out)  # inverted-dropout scaling


def test_load_for_inference_is_bitwise_stable_and_equals_peft_eval(mlp_adapter: Path) -> None:
    model = load_for_inference(make_mlp(), mlp_adapter)
    seen = outputs(model)
    reference = PeftModel.from_pretrained(make_mlp(), str(mlp_adapter)).eval()
    assert len(seen) == 1
    assert next(iter(seen)) == pytest.approx(float(reference(X).item()))


def test_load_for_inference_returns_eval_frozen_everywhere(mlp_adapter: Path) -> None:
    model = load_for_inference(make_mlp().train(), mlp_adapter)
    assert isinstance(model, PeftModel)
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_zero_dropout_is_gone_not_disabled(mlp_adapter: Path) -> None:
    model = load_for_inference(make_mlp(), mlp_adapter)
    model.train()  # what a careless caller or a framework might do later
    assert len(outputs(model)) == 1
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize(
    ("dropout", "expected_p"),
    [(0.0, None), (None, 0.1), (0.3, 0.3)],
)
def test_inference_dropout_override(
    mlp_adapter: Path, dropout: float | None, expected_p: float | None
) -> None:
    model = load_for_inference(make_mlp(), mlp_adapter, dropout=dropout)
    layer = model.base_model.model.fc1
    site = layer.lora_dropout["default"]
    if expected_p is None:
        assert isinstance(site, nn.Identity)
    else:
        assert isinstance(site, nn.Dropout)
        assert site.p == pytest.approx(expected_p)
        assert not site.training
    assert model.peft_config["default"].inference_mode is True


def test_dropout_out_of_range_is_rejected(mlp_adapter: Path, mlp: MLP) -> None:
    before = snapshot(mlp)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        load_for_inference(mlp, mlp_adapter, dropout=1.5)
    assert_unchanged(mlp, before)


# --- training ----------------------------------------------------------------------------------


def test_raw_peft_gives_a_mixed_tree_from_an_eval_base(mlp_adapter: Path) -> None:
    raw = PeftModel.from_pretrained(make_mlp().eval(), str(mlp_adapter), is_trainable=True)
    flags = {m.training for m in raw.modules()}
    assert flags == {True, False}  # the trap: model.training reads True, base is in eval


def test_load_for_training_every_module_in_train_mode(mlp_adapter: Path) -> None:
    model = load_for_training(make_mlp().eval(), mlp_adapter)
    assert all(m.training for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.fc1.lora_A.default.weight",
        "base_model.model.fc1.lora_B.default.weight",
    }
    assert model.peft_config["default"].inference_mode is False
    # keeps the saved dropout by default: training goes on as it was configured
    assert model.base_model.model.fc1.lora_dropout["default"].p == pytest.approx(0.1)


def test_load_for_training_dropout_override_and_a_step_trains(mlp_adapter: Path) -> None:
    model = load_for_training(make_mlp(), mlp_adapter, dropout=0.25)
    assert model.base_model.model.fc1.lora_dropout["default"].p == pytest.approx(0.25)
    a = model.base_model.model.fc1.lora_A["default"].weight
    before = a.detach().clone()
    loss = model(X).pow(2).sum()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(a, before)
    assert model.base_model.model.fc1.base_layer.weight.grad is None


# --- the config copy ---------------------------------------------------------------------------


def test_caller_config_and_file_are_not_mutated(mlp_adapter: Path) -> None:
    on_disk = (mlp_adapter / "adapter_config.json").read_bytes()
    config = LoraConfig.from_pretrained(str(mlp_adapter))
    config.inference_mode = False  # as a caller preparing a training run would have it

    load_for_inference(make_mlp(), mlp_adapter, config=config)
    load_for_training(make_mlp(), mlp_adapter, config=config, dropout=0.4)

    assert config.inference_mode is False
    assert config.lora_dropout == pytest.approx(0.1)
    assert (mlp_adapter / "adapter_config.json").read_bytes() == on_disk


def test_raw_peft_mutates_the_callers_config(mlp_adapter: Path) -> None:
    config = LoraConfig.from_pretrained(str(mlp_adapter))
    config.inference_mode = False
    PeftModel.from_pretrained(make_mlp(), str(mlp_adapter), config=config)
    assert config.inference_mode is True  # what we protect callers from


# --- merge -------------------------------------------------------------------------------------


def test_merge_returns_plain_model_equal_to_unmerged(mlp_adapter: Path) -> None:
    unmerged = load_for_inference(make_mlp(), mlp_adapter)
    merged = load_for_inference(make_mlp(), mlp_adapter, merge=True)
    assert type(merged) is MLP
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any(m.training for m in merged.modules())
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(X), unmerged(X))


def test_merge_of_unmergeable_tuner_raises_and_leaves_model(tmp_path: Path) -> None:
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    path = save_adapter(tiny_llama(), config, tmp_path / "prompt")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterMergeError, match="merge=False") as info:
        load_for_inference(model, path, merge=True)
    assert info.value.peft_type == "PROMPT_TUNING"
    assert_unchanged(model, before)


# --- strict and transactional: each error, each leaving the model untouched --------------------


def _rm(path: Path) -> None:
    shutil.rmtree(path)


def _rm_config(path: Path) -> None:
    (path / "adapter_config.json").unlink()


def _rm_weights(path: Path) -> None:
    (path / "adapter_model.safetensors").unlink()


def _garbage_config(path: Path) -> None:
    (path / "adapter_config.json").write_text("{not json")


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        cfg_path = path / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(changes)
        cfg_path.write_text(json.dumps(cfg))

    return edit


def _truncate(path: Path) -> None:
    f = path / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 20])


def _garbage_header(path: Path) -> None:
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}")


def _edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        f = path / "adapter_model.safetensors"
        tensors = load_file(str(f))
        edit(tensors)
        save_file(tensors, str(f))

    return apply


def _drop_b(t: dict[str, torch.Tensor]) -> None:
    del t["base_model.model.fc1.lora_B.weight"]


def _add_stray(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.fc2.lora_A.weight"] = torch.zeros(4, 8)


def _base_weight(t: dict[str, torch.Tensor]) -> None:
    # PEFT would load this straight into the base model's fc2 without a word.
    t["base_model.model.fc2.weight"] = torch.zeros(1, 8)


def _reshape(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.fc1.lora_A.weight"] = torch.zeros(4, 3)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.fc1.lora_B.weight"][0, 0] = float("nan")


def _pickle_only(path: Path) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    torch.save(tensors, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()


BROKEN = [
    ("no folder", _rm, AdapterNotFoundError, "does not exist .* check the path"),
    ("no config", _rm_config, AdapterNotFoundError, "no adapter_config.json .* point at the folder"),
    ("no weights", _rm_weights, AdapterNotFoundError, "expected adapter_model.safetensors"),
    ("config not json", _garbage_config, AdapterConfigError, "unreadable.*repair the file"),
    ("unknown type", _edit_config(peft_type="NOPE"), AdapterConfigError, "expected one of .*found 'NOPE'"),
    ("bad field", _edit_config(r="four"), AdapterConfigError, "wrong type.*r=.four. .expected int"),
    ("targets nothing", _edit_config(target_modules=["nope"]), AdapterConfigError, "nope.*'target_modules'"),
    ("truncated", _truncate, AdapterWeightsError, "not a valid safetensors file"),
    ("garbage header", _garbage_header, AdapterWeightsError, "not a valid safetensors file"),
    ("missing key", _edit_weights(_drop_b), AdapterWeightsError, r"missing 1 key.*fc1\.lora_B\.weight"),
    ("unexpected key", _edit_weights(_add_stray), AdapterWeightsError, r"unexpected.*fc2\.lora_A\.weight"),
    ("base weight", _edit_weights(_base_weight), AdapterWeightsError, r"unexpected.*fc2\.weight"),
    ("wrong shape", _edit_weights(_reshape), AdapterWeightsError, r"shape.*file \[4, 3\] vs model \[4, 2\]"),
    ("nan", _edit_weights(_nan), AdapterWeightsError, r"NaN or inf.*fc1\.lora_B\.weight"),
    ("pickle only", _pickle_only, UnsafeAdapterError, "allow_pickle=True"),
]


@pytest.mark.parametrize("loader", [load_for_inference, load_for_training])
@pytest.mark.parametrize(("case", "breakage", "error", "match"), BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_adapter_raises_and_leaves_model_exactly_as_it_was(
    mlp_adapter: Path,
    loader: Callable[..., nn.Module],
    case: str,
    breakage: Callable[[Path], None],
    error: type[Exception],
    match: str,
) -> None:
    breakage(mlp_adapter)
    model = make_mlp()
    model.fc2.requires_grad_(False)  # a flag the caller set on purpose
    model.fc1.eval()
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        loader(model, mlp_adapter)
    assert isinstance(info.value, SafeLoraError)
    assert_unchanged(model, before)


def test_error_attributes_name_the_keys_sorted(mlp_adapter: Path) -> None:
    def drop_both(t: dict[str, torch.Tensor]) -> None:
        del t["base_model.model.fc1.lora_B.weight"]
        del t["base_model.model.fc1.lora_A.weight"]

    _edit_weights(drop_both)(mlp_adapter)
    with pytest.raises(AdapterWeightsError) as info:
        load_for_inference(make_mlp(), mlp_adapter)
    assert info.value.missing_keys == [
        "base_model.model.fc1.lora_A.weight",
        "base_model.model.fc1.lora_B.weight",
    ]
    assert info.value.path == str(mlp_adapter / "adapter_model.safetensors")
    assert isinstance(info.value, ValueError)


def test_pickle_loads_when_allowed(mlp_adapter: Path) -> None:
    expected = load_for_inference(make_mlp(), mlp_adapter)(X)
    _pickle_only(mlp_adapter)
    model = load_for_inference(make_mlp(), mlp_adapter, allow_pickle=True)
    torch.testing.assert_close(model(X), expected)


@pytest.mark.parametrize(
    ("edit", "named"),
    [(_drop_b, "fc1.lora_B.weight"), (_add_stray, "fc2.lora_A.weight")],
)
def test_strict_false_warns_naming_keys_and_loads(
    mlp_adapter: Path, edit: Callable[[dict[str, torch.Tensor]], None], named: str
) -> None:
    _edit_weights(edit)(mlp_adapter)
    with pytest.warns(UserWarning, match=rf"strict=False.*{named}"):
        model = load_for_inference(make_mlp(), mlp_adapter, strict=False)
    assert isinstance(model, PeftModel)
    assert not any(m.training for m in model.modules())


def test_strict_false_really_ignores_a_key_that_would_hit_a_base_weight(mlp_adapter: Path) -> None:
    _edit_weights(_base_weight)(mlp_adapter)
    model = make_mlp()
    fc2 = model.fc2.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"unexpected keys \(ignored\).*fc2\.weight"):
        loaded = load_for_inference(model, mlp_adapter, strict=False)
    assert torch.equal(loaded.base_model.model.fc2.weight, fc2)


def test_failure_inside_peft_rolls_back(mlp_adapter: Path) -> None:
    """A failure inside PEFT's load, after the injection (here: a module's load hook raises), is undone."""
    model = make_mlp()

    def boom(module: nn.Module, incompatible: object) -> None:
        raise RuntimeError("boom inside the load")

    handle = model.fc2.register_load_state_dict_post_hook(boom)
    before = snapshot(model)
    with pytest.raises(AdapterWeightsError, match="boom inside the load"):
        load_for_inference(model, mlp_adapter)
    assert_unchanged(model, before)
    handle.remove()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    # and the model is still usable by a second, correct load
    assert isinstance(load_for_inference(model, mlp_adapter), PeftModel)


def test_peft_model_is_refused_with_a_hint(mlp_adapter: Path) -> None:
    model = load_for_inference(make_mlp(), mlp_adapter)
    with pytest.raises(TypeError, match=r"use safe_lora\.load_adapter"):
        load_for_inference(model, mlp_adapter)


def test_is_trainable_kwarg_is_refused(mlp_adapter: Path) -> None:
    with pytest.raises(TypeError, match="use load_for_training"):
        load_for_inference(make_mlp(), mlp_adapter, is_trainable=True)


# --- base model mismatch, hub ids --------------------------------------------------------------


def _named(model: nn.Module, name: str) -> nn.Module:
    model.config.name_or_path = name
    model.name_or_path = name
    return model


def _lora_llama() -> LoraConfig:
    return LoraConfig(target_modules=["q_proj", "v_proj"], r=2, task_type="CAUSAL_LM")


@pytest.mark.parametrize("kind", ["hub id vs local path", "copied folder"])
def test_same_base_under_another_name_does_not_warn(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import LlamaForCausalLM

    if kind == "copied folder":  # the recorded base's config.json is readable: it agrees
        tiny_llama().save_pretrained(tmp_path / "base")
        trained_on = str(tmp_path / "base")
        shutil.copytree(tmp_path / "base", tmp_path / "mirror")
        model = LlamaForCausalLM.from_pretrained(tmp_path / "mirror")
    else:  # "org/base" is not in the cache: only the shapes can speak, and they agree
        trained_on = "org/base"
        model = _named(tiny_llama(), "/models/base")
    path = save_adapter(_named(tiny_llama(), trained_on), _lora_llama(), tmp_path / "a")
    with warnings.catch_warnings(), caplog.at_level("DEBUG", logger="safe_lora._fit"):
        warnings.simplefilter("error", BaseModelMismatchWarning)
        load_for_inference(model, path)
    assert f"trained on {trained_on!r} is loaded into" in caplog.text
    assert "different names" in caplog.text


def test_other_architecture_under_another_name_warns(tmp_path: Path) -> None:
    from transformers import MistralConfig

    # The recorded base is a Mistral with Llama's exact sizes: every key and shape fits.
    fields = tiny_llama().config.to_dict()
    sizes = {k: fields[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")}
    MistralConfig(**sizes, num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path / "mistral")
    path = save_adapter(_named(tiny_llama(), str(tmp_path / "mistral")), _lora_llama(), tmp_path / "a")
    with pytest.warns(
        BaseModelMismatchWarning, match="model_type: the adapter's base is 'mistral', this model's is 'llama'"
    ):
        model = load_for_inference(tiny_llama(), path)
    assert isinstance(model, PeftModel)  # a warning, not a refusal: the shapes do fit


def test_other_shapes_under_another_name_warn_and_are_refused(tmp_path: Path) -> None:
    config = LoraConfig(target_modules=["down_proj"], r=2, task_type="CAUSAL_LM")
    path = save_adapter(tiny_llama(), config, tmp_path / "a")  # intermediate_size 64
    other = _named(tiny_llama(intermediate_size=48), "someone/else")
    before = snapshot(other)
    with (
        pytest.warns(
            BaseModelMismatchWarning, match=r"down_proj\.in_features \(64 in the adapter, 48 here\)"
        ),
        pytest.raises(AdapterWeightsError, match="wrong shape"),
    ):
        load_for_inference(other, path)
    assert_unchanged(other, before)


def test_uncached_hub_id_is_not_found(tmp_path: Path, mlp: MLP) -> None:
    before = snapshot(mlp)
    with pytest.raises(AdapterNotFoundError, match="not in the Hugging Face cache") as info:
        load_for_inference(mlp, "some-org/not-cached-adapter", cache_dir=str(tmp_path / "hub"))
    assert info.value.path == "some-org/not-cached-adapter"
    assert isinstance(info.value, FileNotFoundError)
    assert_unchanged(mlp, before)


def test_cached_hub_id_resolves_through_the_cache(tmp_path: Path, mlp_adapter: Path) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--my-adapter"
    shutil.copytree(mlp_adapter, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    model = load_for_inference(make_mlp(), "some-org/my-adapter", cache_dir=str(cache))
    torch.testing.assert_close(model(X), load_for_inference(make_mlp(), mlp_adapter)(X))


def test_subfolder(tmp_path: Path, mlp_adapter: Path) -> None:
    shutil.move(str(mlp_adapter), str(tmp_path / "repo" / "sub"))
    model = load_for_inference(make_mlp(), tmp_path / "repo", subfolder="sub")
    assert isinstance(model, PeftModel)


# --- other tuners and a real transformers architecture -----------------------------------------


def test_loha_rank_and_module_dropout(tmp_path: Path) -> None:
    config = LoHaConfig(target_modules=["fc1"], r=4, rank_dropout=0.5, module_dropout=0.5, init_weights=False)
    path = save_adapter(make_mlp(), config, tmp_path / "loha")

    raw = PeftModel.from_pretrained(make_mlp(), str(path), is_trainable=True)
    assert len(outputs(raw, 50)) > 1

    model = load_for_inference(make_mlp(), path)
    layer = model.base_model.model.fc1
    assert layer.rank_dropout["default"] == 0.0
    assert layer.module_dropout["default"] == 0.0
    model.train()  # rates are zero: even train mode cannot bring dropout back
    assert len(outputs(model, 50)) == 1

    kept = load_for_inference(make_mlp(), path, dropout=None)
    assert kept.base_model.model.fc1.rank_dropout["default"] == pytest.approx(0.5)
    assert len(outputs(kept, 20)) == 1  # eval mode everywhere

    trained = load_for_training(make_mlp(), path)
    assert trained.base_model.model.fc1.module_dropout["default"] == pytest.approx(0.5)
    assert all(m.training for m in trained.modules())


def test_transformers_round_trip_with_merge(tmp_path: Path) -> None:
    config = LoraConfig(
        target_modules="all-linear", r=4, lora_dropout=0.2, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    path = save_adapter(tiny_llama(), config, tmp_path / "llama")
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    reference = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()(ids).logits

    model = load_for_inference(tiny_llama(), path)
    first = model(ids).logits
    assert torch.equal(first, model(ids).logits)
    torch.testing.assert_close(first, reference)

    merged = load_for_inference(tiny_llama(), path, merge=True)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(merged(ids).logits, reference, atol=1e-5, rtol=1e-4)

    trained = load_for_training(tiny_llama(), path)
    assert all(m.training for m in trained.modules())
    assert trained.training
    out = trained(ids, labels=ids)
    out.loss.backward()
    grads = [n for n, p in trained.named_parameters() if p.grad is not None]
    assert grads
    assert all("lora_" in n for n in grads)


def test_transformers_shape_mismatch_leaves_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LoraConfig(target_modules=["q_proj"], r=2, task_type="CAUSAL_LM")
    path = save_adapter(tiny_llama(), config, tmp_path / "a")
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    before = snapshot(wider)
    with pytest.raises(AdapterWeightsError, match="wrong shape") as info:
        load_for_inference(wider, path)
    assert info.value.mismatched_keys
    assert list(info.value.mismatched_keys) == sorted(info.value.mismatched_keys)
    assert_unchanged(wider, before)


# --- PEFT's keywords and warnings pass through (issue 11) ----------------------------------------


def _bf16_llama_adapter(tmp_path: Path) -> Path:
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=2, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return save_adapter(tiny_llama(), config, tmp_path / "bf16")


def _same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_every_from_pretrained_keyword_works_as_in_peft_or_is_refused_by_name(tmp_path: Path) -> None:
    """Enumerates the installed PEFT's signature: a keyword added by a newer PEFT fails here."""
    import inspect

    path = _bf16_llama_adapter(tmp_path)
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    handled = {"model", "model_id", "kwargs"}
    for name in inspect.signature(PeftModel.from_pretrained).parameters:
        if name in handled:
            continue
        if name == "is_trainable":
            with pytest.raises(TypeError, match="is_trainable= is decided by safe_lora"):
                load_for_inference(tiny_llama(), path, is_trainable=True)
            continue
        value: object = {
            "adapter_name": "mine",
            "config": LoraConfig.from_pretrained(str(path)),
            "autocast_adapter_dtype": False,
            "ephemeral_gpu_offload": True,
            "low_cpu_mem_usage": True,
            "key_mapping": {},
        }[name]  # a KeyError here: a keyword this test (and safe_lora) does not know yet
        base = tiny_llama().to(torch.bfloat16)
        ours = load_for_inference(base, path, **{name: value})
        raw_kwargs = {name: copy.deepcopy(value)}
        raw = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), str(path), **raw_kwargs).eval()
        _same_tensors(ours, raw)
        with torch.no_grad():
            assert torch.equal(ours(ids).logits, raw(ids).logits), name
        if name == "ephemeral_gpu_offload":
            assert ours.peft_config["default"].runtime_config.ephemeral_gpu_offload is True
        if name == "adapter_name":
            assert list(ours.peft_config) == ["mine"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"foo": 1}, r"Unexpected keyword argument foo=.*from_pretrained's keywords"),
        ({"r": 8}, r"Unexpected keyword argument r=.*config="),
        ({"ignore_mismatched_sizes": True}, r"ignore_mismatched_sizes=True is not supported"),
        ({"model_id": "x"}, r"model_id= is decided by safe_lora"),
    ],
)
def test_unknown_or_contradicting_keywords_are_refused_by_name(
    mlp_adapter: Path, kwargs: dict[str, object], match: str
) -> None:
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(TypeError, match=match):
        load_for_inference(model, mlp_adapter, **kwargs)
    assert_unchanged(model, before)


def test_torch_device_goes_through_peft_and_gives_the_same_model(mlp_adapter: Path) -> None:
    direct = load_for_inference(make_mlp(), mlp_adapter)
    through_peft = load_for_inference(make_mlp(), mlp_adapter, torch_device="cpu")
    _same_tensors(direct, through_peft)


def _peft_messages(caught: list[warnings.WarningMessage]) -> Counter[str]:
    return Counter(str(w.message) for w in caught if not issubclass(w.category, SafeLoraWarning))


def test_peft_warnings_reach_the_caller_once(tmp_path: Path) -> None:
    """PEFT's tied-embedding warning, as raw PEFT shows it: same messages, same counts."""
    llama = functools.partial(tiny_llama, tie_word_embeddings=True)
    config = LoraConfig(target_modules=["embed_tokens", "q_proj"], r=2, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = save_adapter(llama(), config, tmp_path / "tied")
    with warnings.catch_warnings(record=True) as raw_caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(llama(), str(path))
    with warnings.catch_warnings(record=True) as ours_caught:
        warnings.simplefilter("always")
        load_for_inference(llama(), path)
    raw, ours = _peft_messages(raw_caught), _peft_messages(ours_caught)
    tied = [m for m in raw if "tie_word_embeddings=True" in m and "tied layer is part of the adapter" in m]
    assert tied  # raw PEFT does warn
    assert ours == raw


def test_a_refused_load_shows_no_peft_warnings(mlp_adapter: Path) -> None:
    _edit_weights(_reshape)(mlp_adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AdapterWeightsError):
            load_for_inference(make_mlp(), mlp_adapter)
    assert not _peft_messages(caught)


def test_strict_false_warns_once_not_twice(mlp_adapter: Path) -> None:
    """PEFT's own "Found missing adapter keys" is replaced by safe_lora's warning, never added to it."""
    _edit_weights(_drop_b)(mlp_adapter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_for_inference(
            make_mlp(), mlp_adapter, strict=False, torch_device="cpu"
        )  # PEFT's own load_adapter
    messages = [str(w.message) for w in caught]
    assert sum("strict=False" in m for m in messages) == 1
    assert not any("Found missing adapter keys" in m for m in messages)


def test_a_low_cpu_mem_usage_load_that_leaves_meta_tensors_is_refused(tmp_path: Path) -> None:
    """Raw PEFT with low_cpu_mem_usage=True builds replicated layers on the meta device and returns
    a model that fails at its first forward; safe_lora refuses it and leaves the base as it was."""
    config = LoraConfig(
        target_modules=["q_proj", "v_proj"], r=2, layer_replication=[[0, 2], [1, 2]], task_type="CAUSAL_LM"
    )
    path = save_adapter(tiny_llama(), config, tmp_path / "replicated")
    raw = PeftModel.from_pretrained(tiny_llama(), str(path), low_cpu_mem_usage=True)
    assert any(p.device.type == "meta" for p in raw.parameters())
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterConfigError, match=r"meta device.*without low_cpu_mem_usage=True"):
        load_for_inference(model, path, low_cpu_mem_usage=True)
    assert_unchanged(model, before)
    assert isinstance(load_for_inference(model, path), PeftModel)  # PEFT's default path loads it


# --------------------------------------------------------------------------------------------------
# key_mapping=
# --------------------------------------------------------------------------------------------------


def test_a_key_mapping_that_renames_correctly_loads_as_peft(tmp_path: Path) -> None:
    """A checkpoint saved with other module names, renamed by key_mapping= as PEFT renames it."""
    base = tiny_llama()
    folder = save_adapter(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a", train_steps=1
    )
    renamed = {
        k.replace(".layers.", ".blocks."): v
        for k, v in load_file(folder / "adapter_model.safetensors").items()
    }
    save_file(renamed, folder / "adapter_model.safetensors")
    mapping = {r"model\.blocks": "model.layers"}
    ref = PeftModel.from_pretrained(copy.deepcopy(base), str(folder), key_mapping=mapping).eval()
    ours = load_for_inference(copy.deepcopy(base), folder, key_mapping=mapping)
    for (key, value), (ref_key, ref_value) in zip(
        ours.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert key == ref_key
        assert torch.equal(value, ref_value), key


def test_a_key_mapping_that_leaves_keys_unmapped_is_named(tmp_path: Path) -> None:
    base = tiny_llama()
    folder = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "a")
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(
        AdapterWeightsError, match=r"after key_mapping=.*q_proj.*-> .*query.* fix key_mapping="
    ) as err:
        load_for_inference(model, folder, key_mapping={"q_proj": "query"})
    assert_unchanged(model, before)
    # The file's own keys, as the user can find them in the file.
    assert len(err.value.unexpected_keys) == 4
    assert all(".q_proj." in key for key in err.value.unexpected_keys)
    assert all(".q_proj." in key for key in err.value.missing_keys)


@pytest.mark.parametrize(
    ("mapping", "error", "match"),
    [
        ({"(": "x"}, ValueError, r"key_mapping= holds an invalid regular expression '\('"),
        ([("a", "b")], TypeError, r"key_mapping= must be a dict"),
        ({"a": 1}, TypeError, r"key_mapping= must be a dict"),
    ],
)
def test_a_malformed_key_mapping_is_refused_by_name(
    tmp_path: Path, mapping: object, error: type[Exception], match: str
) -> None:
    base = tiny_llama()
    folder = save_adapter(base, LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "a")
    before = snapshot(base)
    with pytest.raises(error, match=match):
        load_for_inference(base, folder, key_mapping=mapping)
    assert_unchanged(base, before)
