"""``safe-lora inspect`` with ``--sha256``, ``--signed-by`` and ``--base``, and each file's sha256 shown.

In-process through ``main([...])`` for the many edges, and as a user runs it (subprocesses, one
against the local hub) for the paths that matter end to end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIG, SAFETENSORS, save_adapter, tiny_llama
from hub_server import HubServer, Request, folder_files
from peft import LoraConfig

from safe_lora.cli import main

PYTHON = [sys.executable, "-m", "safe_lora"]
ZEROS = "0" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-provenance")
    tiny_llama().save_pretrained(root / "base")
    tiny_llama(hidden_size=64, intermediate_size=128).save_pretrained(root / "wide-base")
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, task_type="CAUSAL_LM")
    return {
        "base": root / "base",
        "wide-base": root / "wide-base",
        "adapter": save_adapter(tiny_llama(), config, root / "adapter", train_steps=1),
    }


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# --- each file's sha256 ----------------------------------------------------------------------------------


def test_text_and_json_show_each_files_sha256(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = folders["adapter"]
    code, out, _ = inspect(capsys, os.fspath(adapter))
    assert code == 0
    lines = out.splitlines()
    config_line = next(i for i, line in enumerate(lines) if line.lstrip().startswith("sha256"))
    assert lines[config_line].split() == ["sha256", CONFIG, sha256(adapter / CONFIG)]
    assert lines[config_line + 1].split() == [SAFETENSORS, sha256(adapter / SAFETENSORS)]
    code, out, _ = inspect(capsys, os.fspath(adapter), "--json")
    assert code == 0
    assert json.loads(out)["sha256"] == {
        CONFIG: sha256(adapter / CONFIG),
        SAFETENSORS: sha256(adapter / SAFETENSORS),
    }


# --- --sha256 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pins",
    [
        ["{weights}"],
        ["{WEIGHTS}"],
        ["adapter_model.safetensors={weights}"],
        ["adapter_config.json={config}"],
        ["adapter_config.json={CONFIG}", "adapter_model.safetensors={weights}"],
        ["adapter_model.safetensors={weights}", "adapter_model.safetensors={weights}"],  # the same twice
    ],
)
def test_right_pins_exit_0(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], pins: list[str]
) -> None:
    adapter = folders["adapter"]
    digests = {"weights": sha256(adapter / SAFETENSORS), "config": sha256(adapter / CONFIG)}
    digests |= {key.upper(): value.upper() for key, value in digests.items()}
    args = [arg for pin in pins for arg in ("--sha256", pin.format(**digests))]
    code, out, err = inspect(capsys, os.fspath(adapter), *args)
    assert (code, err) == (0, "")
    assert "loads safely: yes" in out


@pytest.mark.parametrize(
    ("pins", "name"),
    [
        ([ZEROS], SAFETENSORS),
        ([f"adapter_config.json={ZEROS}"], CONFIG),
        ([f"adapter_model.safetensors={ZEROS}", "adapter_config.json={config}"], SAFETENSORS),
    ],
)
def test_a_wrong_pin_exits_1_with_the_digests(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], pins: list[str], name: str
) -> None:
    adapter = folders["adapter"]
    args = [arg for pin in pins for arg in ("--sha256", pin.format(config=sha256(adapter / CONFIG)))]
    code, out, err = inspect(capsys, os.fspath(adapter), *args)
    assert code == 1
    assert "integrity: Adapter file does not match its pinned digest" in " ".join(out.split())
    assert err.startswith("safe-lora: error: ")
    assert f"'{adapter / name}' has sha256 {sha256(adapter / name)} — expected {ZEROS}" in err
    code, out, _ = inspect(capsys, os.fspath(adapter), *args, "--json")
    report = json.loads(out)
    assert (code, report["loads_safely"]) == (1, False)
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["integrity"]


def test_a_pin_for_a_file_that_is_not_read_exits_1(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = folders["adapter"]
    code, _, err = inspect(
        capsys,
        os.fspath(adapter),
        "--sha256",
        f"{SAFETENSORS}={sha256(adapter / SAFETENSORS)}",
        "--sha256",
        f"README.md={ZEROS}",
    )
    assert code == 1
    assert "Pinned digests for files that are not read: ['README.md']" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sha256", "abc"], "argument --sha256: expected FILE=HEX or HEX"),
        (["--sha256", f"{ZEROS}  adapter_model.safetensors"], "argument --sha256: expected FILE=HEX or HEX"),
        (["--sha256", f"={ZEROS}"], "expected a file name before '='"),
        (
            ["--sha256", ZEROS, "--sha256", f"{CONFIG}={ZEROS}"],
            "a bare --sha256 HEX pins the weights file alone",
        ),
        (["--sha256", ZEROS, "--sha256", ZEROS], "a bare --sha256 HEX pins the weights file alone"),
        (["--sha256", f"{CONFIG}={ZEROS}", "--sha256", f"{CONFIG}={'1' * 64}"], "two different digests for"),
    ],
)
def test_malformed_pins_are_usage_errors(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = inspect(capsys, os.fspath(folders["adapter"]), *args)
    assert (code, out) == (2, "")
    assert message in err


# --- --base ----------------------------------------------------------------------------------------------


def test_base_folder_checks_against_it(folders: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = inspect(capsys, os.fspath(folders["adapter"]), "--base", os.fspath(folders["base"]))
    assert (code, err) == (0, "")
    assert f"checked against  {folders['base']}" in out
    assert "would accept it into" in " ".join(out.split())
    code, out, _ = inspect(
        capsys, os.fspath(folders["adapter"]), "--base", os.fspath(folders["base"]), "--json"
    )
    assert json.loads(out)["checked_against"] == os.fspath(folders["base"])


def test_a_base_of_other_sizes_exits_1_naming_the_shapes(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = inspect(capsys, os.fspath(folders["adapter"]), "--base", os.fspath(folders["wide-base"]))
    assert code == 1
    assert "shape-mismatch" in out
    assert err.startswith("safe-lora: error: ")


def test_a_base_that_does_not_exist_exits_1(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = inspect(capsys, os.fspath(folders["adapter"]), "--base", os.fspath(tmp_path / "nope"))
    assert (code, out) == (1, "")
    assert "Base model config not found" in err


# --- --signed-by -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("model_signing.signing", reason="model-signing is not installed (the signing extra)")
    from _provenance_kit import sign, write_key_pair

    root = tmp_path_factory.mktemp("cli-signed")
    private, public = write_key_pair(root, "signer")
    folder = Path(shutil.copytree(folders["adapter"], root / "signed"))
    sign(folder, private)
    unsigned = Path(shutil.copytree(folders["adapter"], root / "unsigned"))
    return {"signed": folder, "unsigned": unsigned, "public": public}


@pytest.mark.signing
def test_signed_by_a_signed_folder_exits_0_and_shows_the_signatures_digest(
    signed: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder = signed["signed"]
    code, out, err = inspect(capsys, os.fspath(folder), "--signed-by", os.fspath(signed["public"]))
    assert (code, err) == (0, "")
    assert ["model.sig", sha256(folder / "model.sig")] in [line.split()[-2:] for line in out.splitlines()]
    code, out, _ = inspect(
        capsys,
        os.fspath(folder),
        "--signed-by",
        os.fspath(signed["public"]),
        "--sha256",
        f"model.sig={sha256(folder / 'model.sig')}",
    )
    assert code == 0


@pytest.mark.signing
def test_signed_by_an_unsigned_folder_exits_1(
    signed: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = inspect(
        capsys, os.fspath(signed["unsigned"]), "--signed-by", os.fspath(signed["public"])
    )
    assert code == 1
    assert "Adapter not signed" in err
    assert "signature: Adapter not signed" in " ".join(out.split())


@pytest.mark.signing
@pytest.mark.parametrize("key", ["missing", "not-a-key"])
def test_signed_by_an_unusable_key_exits_1_before_reading_the_adapter(
    signed: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str
) -> None:
    path = tmp_path / f"{key}.pem"
    if key == "not-a-key":
        path.write_text("not a key")
    code, out, err = inspect(capsys, os.fspath(signed["signed"]), "--signed-by", os.fspath(path))
    assert (code, out) == (1, "")
    assert err.startswith("safe-lora: error: --signed-by: ")
    assert "cannot be used as a public key" in err


# --- as a user runs it: the console, and a hub repo with a hub base --------------------------------------


@pytest.mark.slow
@pytest.mark.hub
def test_subprocess_against_the_hub_pins_checks_the_base_and_reads_only_its_config(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    adapter = folders["adapter"]
    server = HubServer()
    server.add_repo("org/cli-pinned", {"main": {**folder_files(adapter), "README.md": b"# adapter\n"}})
    server.add_repo("org/tiny-llama", {"main": folder_files(folders["base"])})
    weights = sha256(adapter / SAFETENSORS)
    commands = {
        "right": ["org/cli-pinned", "--sha256", weights, "--base", "org/tiny-llama", "--json"],
        "wrong": ["org/cli-pinned", "--sha256", f"{CONFIG}={ZEROS}", "--json"],
    }
    with server:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env = {
            **clean,
            "HF_ENDPOINT": server.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": os.fspath(tmp_path / "hf"),
        }
        env |= {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONIOENCODING": "utf-8"}
        runs: dict[str, tuple[subprocess.CompletedProcess[str], list[Request]]] = {}
        for name, args in commands.items():  # one after the other: the request log is split by time
            start = len(server.log)
            done = subprocess.run(
                [*PYTHON, "inspect", *args],
                env={**env, "HF_HOME": os.fspath(tmp_path / name)},  # a cold cache each
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            runs[name] = (done, server.log[start:])
    (right, right_requests), (wrong, wrong_requests) = runs["right"], runs["wrong"]
    assert right.returncode == 0, right.stderr
    report = json.loads(right.stdout)
    assert report["sha256"] == {CONFIG: sha256(adapter / CONFIG), SAFETENSORS: weights}
    assert report["checked_against"] == "org/tiny-llama"
    assert report["commit"]
    base_files = {r.resolved_file for r in right_requests if r.repo == "org/tiny-llama" and r.resolved_file}
    assert base_files == {"config.json"}  # the base is built on the meta device: no weights fetched
    assert wrong.returncode == 1
    assert "does not match its pinned digest" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    # A report fetches each file the loaders would, to show its digest, and parses none that failed.
    assert {r.resolved_file for r in wrong_requests if r.resolved_file} == {CONFIG, SAFETENSORS}
    refused = json.loads(wrong.stdout)
    assert refused["sha256"] == report["sha256"]
    assert (refused["peft_type"], refused["tensor_count"]) == (None, None)
