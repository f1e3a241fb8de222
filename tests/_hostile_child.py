"""Run hostile adapter folders through the loader and inspect, measuring each call: wall time and peak
RSS growth (the kernel's high-water mark, reset before each call through /proc/self/clear_refs).

Run as a script by ``tests/test_hostile.py``: ``python _hostile_child.py CASES.json RESULTS.json``, in
its own process, so that the memory measured is this process's own and a runaway allocation cannot
take the test runner with it. Each case names a folder and the base model's folder; the results say
what each call raised, how long it took, how much memory it added, and whether the model was left
exactly as it was.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.simplefilter("ignore")


def _hwm_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        return int(re.search(r"VmHWM:\s+(\d+)", status.read()).group(1))  # type: ignore[union-attr]


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure(call: Any) -> dict[str, Any]:
    """``call()``'s outcome, seconds and peak RSS growth in MiB (``None`` when it cannot be measured)."""
    import gc

    gc.collect()
    resettable = _reset_hwm()
    before = _hwm_kib() if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        outcome = call()
        error = None
    except Exception as exc:  # the outcome is judged by the test, in the parent
        outcome, error = None, exc
    seconds = time.perf_counter() - start
    after = _hwm_kib() if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": seconds,
        "grew_mib": (after - before) / 1024,
        "error": None if error is None else type(error).__name__,
        "safe_lora_error": error is not None and type(error).__module__.startswith("safe_lora"),
        "fields": list(getattr(error, "fields", []) or []),
        "message": "" if error is None else str(error)[:400],
        "outcome": outcome,
        "resettable": resettable,
    }


def main(cases_path: str, results_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from safe_lora import inspect_adapter, load_for_inference, load_for_training

    cases = json.loads(Path(cases_path).read_text())
    results = {}
    for case in cases:
        folder, base = Path(case["folder"]), case["base"]
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        names = [n for n, _ in model.named_modules()]
        out = {"load": measure(lambda: load_for_inference(model, folder) and "loaded")}  # noqa: B023
        unchanged = [n for n, _ in model.named_modules()] == names and all(
            torch.equal(v, state[k]) for k, v in model.named_parameters()
        )
        # A refusal leaves the model as it was; a config that loads (a list reduced to what matches)
        # changes it, as any load does: inspect then gets a fresh base.
        out["model_unchanged"] = {"outcome": unchanged, "loaded": out["load"]["error"] is None}
        if out["load"]["error"] is None:
            model = AutoModelForCausalLM.from_pretrained(base).eval()
        out["load_training"] = measure(lambda: load_for_training(model, folder) and "loaded")  # noqa: B023
        if out["load_training"]["error"] is None:
            model = AutoModelForCausalLM.from_pretrained(base).eval()
        out["inspect"] = measure(lambda: inspect_adapter(folder).loads_safely)  # noqa: B023
        out["inspect_model"] = measure(lambda: inspect_adapter(folder, base_model=model).loads_safely)  # noqa: B023
        out["inspect_folder"] = measure(lambda: inspect_adapter(folder, base_model=base).loads_safely)  # noqa: B023
        results[case["id"]] = out
        slowest = max((v["seconds"], k) for k, v in out.items() if "seconds" in v)
        print(f"{case['id']}: slowest {slowest[1]} {slowest[0]:.2f} s", file=sys.stderr, flush=True)
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
