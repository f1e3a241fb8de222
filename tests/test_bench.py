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
    assert "| measurement | ratio median | min\u2013max | bar | ok |" in lines
    rows = [line for line in lines if line.startswith("| ") and "measurement" not in line]
    assert len(rows) == 16, proc.stdout  # 7 + bf16 load time and memory + 7 serving rows
    assert all(line.count("|") == 6 for line in rows)

    results = json.loads(out.read_text())
    assert [row["name"] for row in results["rows"]] == [line.split(" | ")[0][2:] for line in rows]
    for row in results["rows"]:
        assert row["a_values"], row["name"]  # every measurement ran, deterministic_lora included
        assert len(row["a_values"]) == len(row["b_values"])
    # The exit code is the bars' verdict.
    assert proc.returncode == int(any(row["ok"] is False for row in results["rows"]))
