"""inspect_adapter: what an adapter folder holds, and whether the loaders would accept it."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import A_KEY, B_KEY, PICKLE, SAFETENSORS, make_mlp, save_adapter, tiny_llama
from peft import (
    AdaLoraConfig,
    BOFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PromptTuningConfig,
    VeraConfig,
)
from safetensors.torch import load_file, save_file

import safe_lora._checks as checks_module
from safe_lora import (
    AdapterNotFoundError,
    AdapterReport,
    Finding,
    SafeLoraError,
    UnsafeAdapterError,
    inspect_adapter,
    load_for_inference,
)

pytestmark = [
    # PEFT's own notes while saving the adapters below; not about inspect.
    pytest.mark.filterwarnings("ignore:Failed to load the CUDA extension"),
    pytest.mark.filterwarnings("ignore:Setting boft_n_butterfly_factor"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`"),
]


def codes(report: AdapterReport, severity: str | None = None) -> list[str]:
    return [f.code for f in report.findings if severity is None or f.severity == severity]


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    path = folder / SAFETENSORS
    save_file(edit(load_file(path)), path)


class _Touch:
    """A pickle that creates ``path`` when it is unpickled: proof that nobody unpickled it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def write_trap_pickle(folder: Path) -> Path:
    marker = folder.parent / f"{folder.name}-UNPICKLED"
    (folder / PICKLE).write_bytes(pickle.dumps({"weights": _Touch(marker)}))
    return marker


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect_adapter must never unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# --- a good folder ---------------------------------------------------------------------------------


def test_good_folder_reports_config_files_and_sizes(mlp_adapter: Path) -> None:
    report = inspect_adapter(mlp_adapter)
    assert report.loads_safely
    assert report.path == mlp_adapter
    assert (report.peft_type, report.task_type, report.rank, report.alpha) == ("LORA", None, 4, 8.0)
    assert report.dropout == {"lora_dropout": 0.1}
    assert report.target_modules == ["fc1"]
    assert report.base_model_name_or_path is None
    assert report.inference_mode is True
    size = (mlp_adapter / SAFETENSORS).stat().st_size
    assert [(w.name, w.format, w.size_bytes) for w in report.weight_files] == [
        (SAFETENSORS, "safetensors", size)
    ]
    assert report.weights_format == "safetensors"
    # lora_A is (r=4, in=2), lora_B is (out=8, r=4): 8 + 32 float32 parameters
    assert (report.tensor_count, report.parameter_count, report.tensor_bytes) == (2, 40, 160)
    assert report.dtypes == {"F32": 2}
    assert codes(report) == ["live-dropout", "no-base-model"]
    assert report.errors == []


def test_check_values_false_skips_the_value_scans(mlp_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Any:
        raise AssertionError("check_values=False must not scan the tensor values")

    monkeypatch.setattr(checks_module, "nonfinite_keys", refuse)
    monkeypatch.setattr(checks_module, "noop_adapter", refuse)
    report = inspect_adapter(mlp_adapter, check_values=False)
    assert (report.tensor_count, report.parameter_count, report.tensor_bytes) == (2, 40, 160)
    assert report.loads_safely


def test_bytes_follow_the_dtype(tmp_path: Path) -> None:
    folder = save_adapter(make_mlp(), LoraConfig(target_modules=["fc1"], r=4), tmp_path / "a")
    edit_weights(folder, lambda sd: {k: v.to(torch.bfloat16) for k, v in sd.items()})
    report = inspect_adapter(folder)
    assert (report.parameter_count, report.tensor_bytes, report.dtypes) == (40, 80, {"BF16": 2})


@pytest.mark.parametrize(
    ("config", "rates"),
    [
        (LoraConfig(target_modules=["fc1"], lora_dropout=0.05), {"lora_dropout": 0.05}),
        (
            LoHaConfig(target_modules=["fc1"], rank_dropout=0.1, module_dropout=0.2),
            {"rank_dropout": 0.1, "module_dropout": 0.2},
        ),
        (BOFTConfig(target_modules=["fc1"], boft_block_size=2, boft_dropout=0.3), {"boft_dropout": 0.3}),
    ],
    ids=["lora", "loha", "boft"],
)
def test_every_dropout_rate_is_reported_and_flagged(
    tmp_path: Path, config: PeftConfig, rates: dict[str, float]
) -> None:
    report = inspect_adapter(save_adapter(make_mlp(), config, tmp_path / "a"))
    assert {k: v for k, v in report.dropout.items() if v} == rates
    [risk] = [f for f in report.findings if f.code == "live-dropout"]
    assert risk.severity == "warning"
    for name, rate in rates.items():
        assert f"{name}={rate:g}" in risk.message
    assert report.loads_safely  # a risk of use, not a reason to refuse the folder


def test_zero_dropout_is_no_risk(tmp_path: Path) -> None:
    folder = save_adapter(make_mlp(), LoraConfig(target_modules=["fc1"], lora_dropout=0.0), tmp_path / "a")
    report = inspect_adapter(folder)
    assert report.dropout == {"lora_dropout": 0.0}
    assert "live-dropout" not in codes(report)


def test_base_model_and_task_type_are_reported(tmp_path: Path) -> None:
    folder = save_adapter(
        tiny_llama(), LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"), tmp_path / "a"
    )
    report = inspect_adapter(folder)
    assert (report.base_model_name_or_path, report.task_type) == ("tiny-llama", "CAUSAL_LM")
    assert "no-base-model" not in codes(report)


def test_report_is_frozen_and_json_ready(mlp_adapter: Path) -> None:
    report = inspect_adapter(mlp_adapter)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.rank = 8  # type: ignore[misc]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["loads_safely"] is True
    assert data["path"] == str(mlp_adapter)
    assert data["dropout"] == {"lora_dropout": 0.1}
    assert data["tensor_count"] == 2
    assert [f["code"] for f in data["findings"]] == codes(report)
    assert isinstance(report.findings[0], Finding)


# --- no false alarms: every adapter PEFT saves is judged loadable ------------------------------------

MLP_CONFIGS = {
    "lora-rank-pattern": LoraConfig(target_modules=["fc1", "fc2"], r=4, rank_pattern={"fc2": 2}),
    "lora-modules-to-save-bias": LoraConfig(
        target_modules=["fc1"], modules_to_save=["fc2"], bias="lora_only"
    ),
    "lora-bias-all": LoraConfig(target_modules=["fc1"], bias="all", lora_bias=True),
    "lora-regex": LoraConfig(target_modules=r".*fc\d"),
    "dora": LoraConfig(target_modules=["fc1"], use_dora=True),
    "loha": LoHaConfig(target_modules=["fc1"]),
    "lokr": LoKrConfig(target_modules=["fc1"]),
    "ia3": IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
    "vera-shared-projection": VeraConfig(target_modules=["fc1"], r=4, save_projection=True),
}
LLAMA_CONFIGS = {
    "llama-embedding-layers": LoraConfig(
        target_modules=["q_proj", "embed_tokens"], layers_to_transform=[1], task_type="CAUSAL_LM"
    ),
    "llama-exclude": LoraConfig(
        target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"], task_type="CAUSAL_LM"
    ),
    "llama-trainable-tokens": LoraConfig(
        target_modules=["q_proj"], trainable_token_indices=[1, 2], task_type="CAUSAL_LM"
    ),
    "llama-target-parameters": LoraConfig(
        target_modules=[], target_parameters=["mlp.gate_proj.weight"], task_type="CAUSAL_LM"
    ),
    "llama-adalora": AdaLoraConfig(target_modules=["q_proj"], total_step=10, task_type="CAUSAL_LM"),
    "llama-prompt-tuning": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("name", [*MLP_CONFIGS, *LLAMA_CONFIGS])
def test_adapters_saved_by_peft_have_no_errors(tmp_path: Path, name: str) -> None:
    base = make_mlp() if name in MLP_CONFIGS else tiny_llama()
    config = MLP_CONFIGS.get(name) or LLAMA_CONFIGS[name]
    report = inspect_adapter(save_adapter(base, config, tmp_path / name))
    assert report.errors == []
    assert report.loads_safely
    assert report.tensor_count


# --- folders that would not load ---------------------------------------------------------------------


def _truncate_data(folder: Path) -> None:
    path = folder / SAFETENSORS
    path.write_bytes(path.read_bytes()[:-40])  # the header is intact; the last tensor is cut


def _truncate_header(folder: Path) -> None:
    path = folder / SAFETENSORS
    path.write_bytes(path.read_bytes()[:20])


def _garbage_weights(folder: Path) -> None:
    (folder / SAFETENSORS).write_bytes(b"not a safetensors file at all")


def _no_weights(folder: Path) -> None:
    (folder / SAFETENSORS).unlink()


def _no_tensors(folder: Path) -> None:
    save_file({}, folder / SAFETENSORS)


def _nan(folder: Path) -> None:
    edit_weights(folder, lambda sd: {**sd, A_KEY: torch.full_like(sd[A_KEY], float("nan"))})


def _keys_on_other_module(folder: Path) -> None:
    # fc2 is not in target_modules=["fc1"]
    edit_weights(folder, lambda sd: {k.replace(".fc1.", ".fc2."): v for k, v in sd.items()})


def _config_rank_differs(folder: Path) -> None:
    edit_config(folder, r=2)


def _unknown_parameter(folder: Path) -> None:
    edit_weights(folder, lambda sd: {**sd, "base_model.model.fc1.lora_C.weight": sd[A_KEY].clone()})


def _stray_module_weights(folder: Path) -> None:
    edit_weights(folder, lambda sd: {**sd, "base_model.model.fc2.weight": torch.zeros(1, 8)})


def _half_a_pair(folder: Path) -> None:
    edit_weights(folder, lambda sd: {A_KEY: sd[A_KEY]})


def _config_not_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{ not json")


def _config_unknown_type(folder: Path) -> None:
    edit_config(folder, peft_type="NOT_A_TUNER")


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / SAFETENSORS), folder / PICKLE)
    (folder / SAFETENSORS).unlink()


BROKEN = [
    ("truncated-data", _truncate_data, "weights-corrupt"),
    ("truncated-header", _truncate_header, "weights-corrupt"),
    ("garbage", _garbage_weights, "weights-corrupt"),
    ("no-weights", _no_weights, "weights-missing"),
    ("no-tensors", _no_tensors, "no-tensors"),
    ("nan", _nan, "nonfinite"),
    ("off-target", _keys_on_other_module, "keys-off-target"),
    ("rank", _config_rank_differs, "rank-mismatch"),
    ("unknown-parameter", _unknown_parameter, "unknown-parameter"),
    ("stray-module", _stray_module_weights, "unknown-keys"),
    ("half-pair", _half_a_pair, "incomplete-lora-pair"),
    ("config-not-json", _config_not_json, "config-invalid"),
    ("config-unknown-type", _config_unknown_type, "config-invalid"),
    ("pickle-only", _pickle_only, "pickle-only"),
]


@pytest.mark.parametrize(("breakage", "code"), [(b, c) for _, b, c in BROKEN], ids=[n for n, _, _ in BROKEN])
def test_broken_folder_is_an_error_and_the_loader_agrees(
    mlp_adapter: Path, breakage: Callable[[Path], None], code: str
) -> None:
    breakage(mlp_adapter)
    report = inspect_adapter(mlp_adapter)
    assert code in codes(report, "error")
    assert not report.loads_safely
    assert report.findings[0].severity == "error"  # errors come first
    # The verdict is the loader's: what inspect refuses, load_for_inference refuses too.
    with pytest.raises(SafeLoraError):
        load_for_inference(make_mlp(), mlp_adapter)


def test_loader_accepts_what_inspect_accepts(mlp_adapter: Path) -> None:
    assert inspect_adapter(mlp_adapter).loads_safely
    load_for_inference(make_mlp(), mlp_adapter)


def test_error_messages_name_the_keys(mlp_adapter: Path) -> None:
    _config_rank_differs(mlp_adapter)
    [finding] = inspect_adapter(mlp_adapter).errors
    assert finding.keys == (A_KEY, B_KEY)
    assert "expected r=2" in finding.message
    assert "rank 4" in finding.message


def test_rank_pattern_is_respected(mlp_adapter: Path) -> None:
    edit_config(mlp_adapter, r=2, rank_pattern={"fc1": 4})
    assert inspect_adapter(mlp_adapter).loads_safely


def test_nan_is_not_scanned_with_check_values_false(mlp_adapter: Path) -> None:
    _nan(mlp_adapter)
    assert inspect_adapter(mlp_adapter, check_values=False).loads_safely
    assert inspect_adapter(mlp_adapter).errors[0].keys == (A_KEY,)


def test_unreadable_config_still_reports_the_weights(mlp_adapter: Path) -> None:
    _config_not_json(mlp_adapter)
    report = inspect_adapter(mlp_adapter)
    assert report.peft_type is None
    assert report.dropout == {}
    assert report.tensor_count == 2


def test_subfolder_is_resolved_like_the_loaders_do(mlp_adapter: Path) -> None:
    report = inspect_adapter(mlp_adapter.parent, subfolder=mlp_adapter.name)
    assert report.path == mlp_adapter
    assert report.loads_safely


@pytest.mark.parametrize("make", ["missing-folder", "no-config"])
def test_not_an_adapter_folder_raises(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "adapter"
    if make == "no-config":
        folder.mkdir()
        (folder / SAFETENSORS).write_bytes(b"")
    with pytest.raises(AdapterNotFoundError, match="not found"):
        inspect_adapter(folder)


# --- pickle: reported, opened only when allowed, and then as the loaders open it -----------------------


@pytest.mark.parametrize(
    ("keep_safetensors", "allow_pickle", "severity", "code", "weights_format"),
    [
        (False, False, "error", "pickle-only", "pickle"),
        (True, False, "warning", "pickle-present", "safetensors"),
    ],
)
@pytest.mark.usefixtures("no_unpickling")
def test_pickle_is_reported_and_never_unpickled(
    mlp_adapter: Path,
    keep_safetensors: bool,
    allow_pickle: bool,
    severity: str,
    code: str,
    weights_format: str,
) -> None:
    marker = write_trap_pickle(mlp_adapter)
    if not keep_safetensors:
        (mlp_adapter / SAFETENSORS).unlink()
    report = inspect_adapter(mlp_adapter, allow_pickle=allow_pickle)
    assert not marker.exists()
    [finding] = [f for f in report.findings if f.code == code]
    assert finding.severity == severity
    size = (mlp_adapter / PICKLE).stat().st_size
    assert f"{size} bytes" in finding.message
    assert ("pickle", size) in [(w.format, w.size_bytes) for w in report.weight_files]
    assert report.weights_format == weights_format
    assert report.loads_safely is (severity != "error")
    if not keep_safetensors:
        assert report.tensor_count is None  # its contents are unknown: it was not opened


def test_an_allowed_pickle_is_read_as_the_loaders_read_it(mlp_adapter: Path) -> None:
    """allow_pickle=True: torch.load(weights_only=True), as the loaders: a trap pickle is refused
    without running it, and the verdict is the loader's."""
    marker = write_trap_pickle(mlp_adapter)
    (mlp_adapter / SAFETENSORS).unlink()
    report = inspect_adapter(mlp_adapter, allow_pickle=True)
    assert not marker.exists()
    assert [f.severity for f in report.findings if f.code == "pickle-only"] == ["warning"]
    assert "pickle-unsafe" in [f.code for f in report.errors]
    with pytest.raises(UnsafeAdapterError, match="weights_only"):
        load_for_inference(make_mlp(), mlp_adapter, allow_pickle=True)


# --- the bad-input refusals, as findings with the loaders' own messages --------------------------------


def _relabel_as_i32(folder: Path) -> None:
    path = folder / SAFETENSORS
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    header = data[8:end].replace(b'"F32"', b'"I32"', 1)  # same bytes, read as integers
    path.write_bytes(data[:8] + header + data[end:])


@pytest.mark.parametrize(
    ("breakage", "code"),
    [
        (lambda f: edit_config(f, lora_alpha=float("nan")), "config-nonfinite"),
        (lambda f: edit_config(f, new_variant_config={"r": 2}), "config-unknown-fields"),
        (lambda f: edit_config(f, use_dora="no"), "config-invalid"),
        (_relabel_as_i32, "wrong-dtype"),
    ],
    ids=["nonfinite", "unknown-field", "wrong-type", "wrong-dtype"],
)
def test_bad_content_is_the_loaders_refusal_word_for_word(
    mlp_adapter: Path, breakage: Callable[[Path], None], code: str
) -> None:
    breakage(mlp_adapter)
    [finding] = [f for f in inspect_adapter(mlp_adapter).errors if f.code == code]
    with pytest.raises(SafeLoraError) as refused:
        load_for_inference(make_mlp(), mlp_adapter)
    assert finding.message == str(refused.value)
    assert json.loads(json.dumps(inspect_adapter(mlp_adapter).to_dict(), allow_nan=False))  # strict JSON


def test_unknown_fields_meaning_absent_are_a_warning(mlp_adapter: Path) -> None:
    edit_config(mlp_adapter, use_new_variant=False, new_variant_config=None)
    report = inspect_adapter(mlp_adapter)
    [finding] = [f for f in report.findings if f.code == "config-ignored-fields"]
    assert finding.severity == "warning"
    assert "new_variant_config, use_new_variant" in finding.message
    assert report.loads_safely
    assert report.rank == 4  # the config is still described


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("name", ["adapter_config.json", SAFETENSORS])
def test_special_files_are_reported_never_opened(mlp_adapter: Path, name: str) -> None:
    (mlp_adapter / name).unlink()
    os.mkfifo(mlp_adapter / name)  # opening it for reading would block forever
    report = inspect_adapter(mlp_adapter)
    [finding] = [f for f in report.errors if f.code == "not-a-file"]
    assert "is a FIFO (named pipe)" in finding.message
    assert "weights-missing" not in codes(report)


def test_an_adapter_that_changes_nothing_is_a_warning(tmp_path: Path) -> None:
    fresh = save_adapter(make_mlp(), LoraConfig(target_modules=["fc1"]), tmp_path / "fresh")  # lora_B = 0
    report = inspect_adapter(fresh)
    [finding] = [f for f in report.findings if f.code == "noop-adapter"]
    assert finding.severity == "warning"
    assert "changes nothing" in finding.message
    assert report.loads_safely
    assert "noop-adapter" not in codes(inspect_adapter(fresh, check_values=False))  # no tensor read
    trained = save_adapter(
        make_mlp(), LoraConfig(target_modules=["fc1"]), tmp_path / "trained", train_steps=1
    )
    assert "noop-adapter" not in codes(inspect_adapter(trained))
