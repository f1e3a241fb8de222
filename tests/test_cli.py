"""The ``safe-lora`` command, run as a user runs it (subprocesses), plus its edges in-process."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_mlp, save_adapter
from hub_server import HubServer, Request, folder_files
from peft import LoraConfig
from safetensors.torch import load_file

import safe_lora._checks as checks_module
import safe_lora._demo as demo_module
import safe_lora._inspect as inspect_module
from safe_lora import AdapterNotFoundError, __version__, inspect_adapter, load_for_inference
from safe_lora._demo import DemoReport, OutputCount, VariantResult, run_demo
from safe_lora.cli import _bar_char, main, render_demo

TRIALS = 120
PYTHON = [sys.executable, "-m", "safe_lora"]
SCRIPT = shutil.which("safe-lora", path=str(Path(sys.executable).parent))


# --- subprocess runs: started together, since each pays the torch/peft import ------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def _run_all(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, Run]:
    """Start every command at once (each pays the import cost in parallel), then collect them."""
    started = {
        name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for name, argv in commands.items()
    }
    done = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = Run(process.returncode, stdout, stderr)
    return done


def _prepare_folders(root: Path) -> dict[str, Path]:
    config = LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8, lora_dropout=0.1)
    good = save_adapter(make_mlp(), config, root / "good")
    pickled = shutil.copytree(good, root / "pickle")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    truncated = shutil.copytree(good, root / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"good": good, "pickle": pickled, "truncated": truncated, "missing": root / "missing"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _prepare_folders(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def runs(folders: dict[str, Path]) -> dict[str, Run]:
    assert SCRIPT is not None, "the safe-lora console script is not installed next to sys.executable"
    commands = {
        "demo": [*PYTHON, "demo", "--trials", str(TRIALS)],
        "demo-json": [*PYTHON, "demo", "--trials", str(TRIALS), "--json"],
        "inspect-good": [SCRIPT, "inspect", str(folders["good"])],  # the console script, once
        "inspect-pickle": [*PYTHON, "inspect", str(folders["pickle"])],
        "inspect-truncated": [*PYTHON, "inspect", str(folders["truncated"])],
        "inspect-missing": [*PYTHON, "inspect", str(folders["missing"]), "--json"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return _run_all(commands, env)


def _histograms(text: str) -> list[tuple[str, list[tuple[float, int, str]]]]:
    """``[(header, [(value, count, mark), ...]), ...]`` parsed from the demo's text report."""
    blocks: list[tuple[str, list[tuple[float, int, str]]]] = []
    row = re.compile(r"^\s+(-?\d[\d.e+-]*)\s+[█#]+\s+(\d+)\s+[\d.]+%(.*)$")
    for line in text.splitlines():
        if re.match(r"^\d\. \[", line):
            blocks.append((line, []))
        elif blocks and (match := row.match(line)):
            blocks[-1][1].append((float(match[1]), int(match[2]), match[3].strip()))
    return blocks


@pytest.mark.slow  # the subprocess runs of the module fixture (~75 s)
def test_demo_exits_0_and_shows_the_failure_and_the_fix(runs: dict[str, Run]) -> None:
    run = runs["demo"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    blocks = _histograms(run.stdout)
    assert [header.split("] ")[1] for header, _ in blocks] == [
        "PeftModel.from_pretrained(base, path, is_trainable=True)",
        "PeftModel.from_pretrained(base, path)",
        "load_for_inference(base, path)",
        "load_for_training(base, path), run inside deterministic_lora(model)",
    ]
    for _, rows in blocks:
        assert sum(count for _, count, _ in rows) == TRIALS
    raw_training, _, safe_inference, safe_training = (rows for _, rows in blocks)
    assert len(raw_training) > 1
    assert any(mark.startswith("= base model") for _, _, mark in raw_training)
    for rows in (safe_inference, safe_training):
        assert len(rows) == 1
        assert rows[0][1] == TRIALS
        assert rows[0][2] == "= trained adapter"
    assert f"{len(raw_training)} distinct outputs in {TRIALS} runs" in run.stdout
    assert run.stdout.rstrip().splitlines()[-1].startswith("verdict: raw PEFT loaded with is_trainable=True")


@pytest.mark.slow  # the subprocess runs of the module fixture (~75 s)
def test_demo_json_holds_the_same_numbers(runs: dict[str, Run]) -> None:
    run = runs["demo-json"]
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["trials"], report["seed"], report["dropout"], report["ok"]) == (TRIALS, 0, 0.5, True)
    # A separate process with the same options: the same numbers, down to the last digit.
    from_text = [[(value, count) for value, count, _ in rows] for _, rows in _histograms(runs["demo"].stdout)]
    from_json = [[(o["value"], o["count"]) for o in v["outputs"]] for v in report["variants"]]
    assert from_json == from_text
    assert f"base model {report['base_output']!r}, trained adapter {report['adapter_output']!r}" in (
        runs["demo"].stdout
    )
    assert f"verdict: {report['verdict']}" in runs["demo"].stdout
    for variant in report["variants"]:
        for out in variant["outputs"]:
            assert out["is_base"] is (out["value"] == report["base_output"])
            assert out["is_adapter"] is (out["value"] == report["adapter_output"])
    raw, _, *safe = report["variants"]
    assert raw["distinct"] > 1
    assert raw["base_count"] > 0
    for variant in safe:
        assert variant["distinct"] == 1
        assert variant["outputs"][0]["value"] == report["adapter_output"]


INSPECT_CASES = [
    # (run, exit code, in stdout, in stderr)
    (
        "inspect-good",
        0,
        ["lora_dropout=0.1", "adapter_model.safetensors (safetensors", "loads safely: yes"],
        [],
    ),
    (
        "inspect-pickle",
        1,
        ["adapter_model.bin (pickle", "not opened", "loads safely: no"],
        ["would not load safely", "Refusing to unpickle", "allow_pickle"],
    ),
    (
        "inspect-truncated",
        1,
        ["weights-corrupt", "loads safely: no"],
        ["would not load safely", "not a valid safetensors file"],
    ),
    ("inspect-missing", 1, [], ["Adapter folder not found", "check the path"]),
]


@pytest.mark.slow  # the subprocess runs of the module fixture (~75 s)
@pytest.mark.parametrize(
    ("name", "code", "stdout_has", "stderr_has"), INSPECT_CASES, ids=[c[0] for c in INSPECT_CASES]
)
def test_inspect_exit_codes_and_messages(
    runs: dict[str, Run], name: str, code: int, stdout_has: list[str], stderr_has: list[str]
) -> None:
    run = runs[name]
    assert run.returncode == code, run.stderr
    for text in stdout_has:
        assert text in run.stdout
    for text in stderr_has:
        assert text in run.stderr
    if code == 0:
        assert run.stderr == ""
    else:
        assert run.stderr.startswith("safe-lora: error: ")
    assert "Traceback" not in run.stderr + run.stdout


@pytest.mark.slow  # the subprocess runs of the module fixture (~75 s)
def test_inspect_missing_folder_prints_no_json(runs: dict[str, Run]) -> None:
    assert runs["inspect-missing"].stdout == ""


# --- inspect a hub repo id: downloads like the loaders, the same two files only ----------------------

EXTRAS = {"README.md": b"# adapter\n", "optimizer.pt": b"\x80opt", "training_args.bin": b"\x80args"}


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Run], list[Request]]:
    """``safe-lora inspect`` on hub ids, run as subprocesses against the local hub (``hub_server.py``)."""
    root = tmp_path_factory.mktemp("cli-hub")
    folders = _prepare_folders(root)
    v2 = save_adapter(make_mlp(), LoraConfig(target_modules=["fc1"], r=4, lora_dropout=0.2), root / "v2")
    good = {**folder_files(folders["good"]), **EXTRAS}
    server = HubServer()
    server.add_repo("org/cli-adapter", {"main": good})
    server.add_repo("org/cli-rev", {"main": good, "v2": {**folder_files(v2, "sub/"), **EXTRAS}})
    server.add_repo("org/cli-pickle", {"main": {**folder_files(folders["pickle"]), **EXTRAS}})
    commands = {  # each run pays the torch/peft import: few, started together
        "hub-json": [*PYTHON, "inspect", "org/cli-adapter", "--json"],
        "hub-revision": [
            *PYTHON,
            "inspect",
            "org/cli-rev",
            "--revision",
            "v2",
            "--subfolder",
            "sub",
            "--json",
        ],
        "hub-pickle": [*PYTHON, "inspect", "org/cli-pickle"],
    }
    with server:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env = {**clean, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(root / "hf")}
        env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONIOENCODING": "utf-8"}
        done = _run_all(commands, env)
    return done, list(server.log)


def _fetched(log: list[Request], repo: str) -> list[str]:
    return sorted({r.resolved_file for r in log if r.repo == repo and r.resolved_file})


@pytest.mark.slow
@pytest.mark.hub
@pytest.mark.parametrize(
    ("run", "repo", "code", "fetched"),
    [
        ("hub-json", "org/cli-adapter", 0, ["adapter_config.json", "adapter_model.safetensors"]),
        ("hub-revision", "org/cli-rev", 0, ["sub/adapter_config.json", "sub/adapter_model.safetensors"]),
        ("hub-pickle", "org/cli-pickle", 1, ["adapter_config.json"]),  # the pickle: never
    ],
)
def test_inspect_hub_id_fetches_only_what_loading_would(
    hub_runs: tuple[dict[str, Run], list[Request]], run: str, repo: str, code: int, fetched: list[str]
) -> None:
    runs, log = hub_runs
    assert runs[run].returncode == code, runs[run].stderr
    assert "Traceback" not in runs[run].stderr
    assert _fetched(log, repo) == fetched


@pytest.mark.slow
@pytest.mark.hub
def test_inspect_hub_id_reports_the_revision_asked_for(
    hub_runs: tuple[dict[str, Run], list[Request]],
) -> None:
    runs, log = hub_runs
    assert json.loads(runs["hub-json"].stdout)["dropout"] == {"lora_dropout": 0.1}
    assert json.loads(runs["hub-revision"].stdout)["dropout"] == {"lora_dropout": 0.2}
    assert "/api/models/org/cli-rev/revision/v2" in [r.path for r in log]


@pytest.mark.slow
@pytest.mark.hub
def test_inspect_pickle_only_hub_repo_says_why(hub_runs: tuple[dict[str, Run], list[Request]]) -> None:
    run = hub_runs[0]["hub-pickle"]
    assert "adapter_model.bin (pickle" in run.stdout  # its size from the hub's listing
    assert run.stderr.startswith("safe-lora: error: ")
    assert "Refusing to download and unpickle" in run.stderr


# --- a Trainer output folder: the checkpoints listed, the latest inspected ----------------------------


def _trainer_run(root: Path) -> Path:
    for step in (500, 1500, 1000):  # written out of order: the step decides, not the name
        save_adapter(make_mlp(), LoraConfig(target_modules=["fc1"], r=4), root / "run" / f"checkpoint-{step}")
    (root / "run" / "checkpoint-2000").mkdir()  # an unfinished save: no adapter_config.json
    return root / "run"


def test_inspect_trainer_folder_lists_checkpoints_and_inspects_the_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _trainer_run(tmp_path)
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} holds 3 Trainer checkpoint(s): checkpoint-500, checkpoint-1000, checkpoint-1500" in out
    assert "inspecting the latest: checkpoint-1500" in out
    assert f"adapter  {run / 'checkpoint-1500'}" in out
    assert main(["inspect", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoints"] == [str(run / f"checkpoint-{s}") for s in (500, 1000, 1500)]
    assert data["path"] == str(run / "checkpoint-1500")


def test_loading_a_trainer_folder_names_its_checkpoints(tmp_path: Path) -> None:
    run = _trainer_run(tmp_path)
    with pytest.raises(AdapterNotFoundError, match=r"Trainer output folder: pass one of its checkpoints"):
        load_for_inference(make_mlp(), run)


# --- in-process: usage, JSON, failure paths -------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"safe-lora {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "expected a command"),
        (["inspect"], "the following arguments are required: ID_OR_PATH"),
        (["demo", "--trials", "0"], "expected 1 to 100000, found 0"),
        (["demo", "--trials", "many"], "expected an integer, found 'many'"),
        (["demo", "--dropout", "1"], "expected a number in [0, 1), found 1"),
        (["demo", "--dropout", "high"], "expected a number in [0, 1), found 'high'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "usage: safe-lora" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(("folder", "code"), [("good", 0), ("truncated", 1), ("pickle", 1)])
def test_inspect_json_is_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: str, code: int
) -> None:
    path = _prepare_folders(tmp_path)[folder]
    assert main(["inspect", str(path), "--json"]) == code
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data == inspect_adapter(path).to_dict()
    assert data["loads_safely"] is (code == 0)
    assert ("would not load safely" in captured.err) is (code == 1)


def test_inspect_allow_pickle_accepts_a_pickle_only_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _prepare_folders(tmp_path)["pickle"]
    assert main(["inspect", str(path), "--allow-pickle"]) == 0
    assert "warning pickle-only" in capsys.readouterr().out


def test_inspect_header_only_skips_the_value_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _prepare_folders(tmp_path)["good"]

    def refuse(*args: Any) -> Any:
        raise AssertionError("--header-only must not scan the tensor values")

    monkeypatch.setattr(checks_module, "nonfinite_keys", refuse)
    monkeypatch.setattr(checks_module, "noop_adapter", refuse)
    assert main(["inspect", str(path), "--header-only"]) == 0
    assert "2 tensors, 40 parameters, 160 bytes (F32 x2)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (PermissionError("Permission denied: 'x'"), 1, "PermissionError: Permission denied"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_unexpected_failures_are_reported_without_traceback(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    code: int,
    message: str,
) -> None:
    def fail(*args: object, **kwargs: object) -> Any:
        raise error

    monkeypatch.setattr(inspect_module, "inspect_adapter", fail)
    assert main(["inspect", "anywhere"]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"safe-lora: error: {message}")
    assert "Traceback" not in err


def _report(safe_outputs: list[OutputCount]) -> DemoReport:
    raw = [OutputCount(1.0, 3, False, False), OutputCount(0.0, 1, True, False)]
    return DemoReport(
        trials=4,
        seed=0,
        dropout=0.5,
        rank=4,
        alpha=8,
        train_steps=300,
        loss_base=2.0,
        loss_adapter=1.0,
        input=[0.5, -1.0],
        base_output=0.0,
        adapter_output=2.0,
        variants=[
            VariantResult("peft-trainable", "raw", False, raw),
            VariantResult("load_for_inference", "safe", True, safe_outputs),
        ],
    )


def test_demo_exits_1_when_a_safe_variant_is_not_deterministic(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = _report([OutputCount(2.0, 3, False, True), OutputCount(2.5, 1, False, False)])
    monkeypatch.setattr(demo_module, "run_demo", lambda **kwargs: broken)
    assert main(["demo"]) == 1
    captured = capsys.readouterr()
    assert "safe-lora: error: FAILED: expected one output" in captured.err
    assert "load_for_inference gave 2 output(s)" in captured.err


def test_demo_text_marks_base_and_adapter_outputs() -> None:
    text = render_demo(_report([OutputCount(2.0, 4, False, True)]), bar="#")
    assert "     0.0  ########" in text
    assert re.search(r"\b1 +25\.0%  = base model \(the adapter dropped out entirely\)$", text, re.M)
    assert re.search(r"\b4 +100\.0%  = trained adapter$", text, re.M)
    assert "2 distinct outputs in 4 runs" in text
    assert "1 distinct output in 4 runs" in text


@pytest.mark.parametrize(("encoding", "bar"), [("utf-8", "█"), ("cp1252", "#"), ("ascii", "#")])
def test_bars_fall_back_to_ascii(encoding: str, bar: str) -> None:
    assert _bar_char(io.TextIOWrapper(io.BytesIO(), encoding=encoding)) == bar


# --- run_demo itself --------------------------------------------------------------------------------


def test_run_demo_is_reproducible_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    first = run_demo(trials=40, seed=3, dropout=0.5)
    assert torch.get_num_threads() == threads
    assert run_demo(trials=40, seed=3, dropout=0.5).to_dict() == first.to_dict()
    assert first.ok
    assert run_demo(trials=40, seed=4, dropout=0.5).to_dict() != first.to_dict()


def test_run_demo_without_dropout_is_deterministic_everywhere() -> None:
    report = run_demo(trials=20, seed=0, dropout=0.0)
    assert [v.distinct for v in report.variants] == [1, 1, 1, 1]
    assert all(v.outputs[0].is_adapter for v in report.variants)
    assert "--dropout" in report.verdict


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"trials": 0}, "trials must be between 1"), ({"dropout": 1.0}, r"dropout must be in \[0, 1\)")],
)
def test_run_demo_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run_demo(**kwargs)


def test_python_dash_m_safe_lora_is_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m safe_lora`` (safe_lora/__main__.py), in-process: the subprocess runs are the slow tier."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["python -m safe_lora", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("safe_lora", run_name="__main__")
    assert exit_.value.code == 0
    assert __version__ in capsys.readouterr().out
