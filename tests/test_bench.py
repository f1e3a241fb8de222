"""The benchmark script runs end to end (``--quick``); no timing is asserted, shared machines are noisy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Runs benchmarks/bench.py --quick in a subprocess: a minute or more.
pytestmark = [pytest.mark.bench, pytest.mark.slow]

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_quick_benchmark_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, os.fspath(BENCH), "--quick", "--json", os.fspath(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    # 0: every bar met; 1: a bar missed (timings of a tiny model on a shared machine mean nothing).
    # Anything else is a crash.
    assert proc.returncode in {0, 1}, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    rows = _table(lines, "| measurement | ratio median | min\u2013max | bar | ok |")
    # 7 + bf16 load time and memory + 7 serving rows + the big bf16 load
    assert len(rows) == 17, proc.stdout
    assert all(line.count("|") == 6 for line in rows)
    hostile = _table(lines, "| case | call | refused | seconds | peak growth MiB | bar ok |")
    assert len(hostile) == 22, proc.stdout  # 11 hostile configs x (load_for_inference, inspect_adapter)
    assert all(line.replace("\\|", "").count("|") == 7 for line in hostile)

    results = json.loads(out.read_text())
    assert [row["name"] for row in results["rows"]] == [line.split(" | ")[0][2:] for line in rows]
    for row in results["rows"]:
        assert row["a_values"], row["name"]  # every measurement ran, deterministic_lora included
        assert len(row["a_values"]) == len(row["b_values"])
    assert len(results["hostile"]) == len(hostile)
    for result in results["hostile"]:
        assert result["error"] is None, result  # a refusal is a safe_lora error, never a crash
        assert result["model_unchanged"] is not False, result
    # The exit code is the bars' verdict.
    missed = [row["ok"] is False for row in results["rows"]] + [not r["ok"] for r in results["hostile"]]
    assert proc.returncode == int(any(missed))


def _table(lines: list[str], header: str) -> list[str]:
    """The body rows of the markdown table under ``header``."""
    assert header in lines, "\n".join(lines)
    body = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("| "):
            break
        body.append(line)
    return body
