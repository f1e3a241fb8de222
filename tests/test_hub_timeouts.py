"""A hub that accepts the connection and never answers (a black-holed proxy) is an unreachable hub.

huggingface_hub's HTTP session has no timeout of its own, so each request safe_lora makes carries
``HF_HUB_ETAG_TIMEOUT``; past it, the load goes on from the local cache (with a
``HubUnreachableWarning``) or fails with a typed error saying the hub did not answer. The bar is 35 s
from the call at huggingface_hub's default timeouts; the fast tests lower them through the environment,
the ``slow`` one keeps the defaults.

A hub that answers the metadata question and then stops answering downloads is left to
huggingface_hub's own bounded retries (``HF_HUB_DOWNLOAD_TIMEOUT`` per attempt, six attempts, a second
apart), after which the load fails with a typed error too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import save_adapter, tiny_llama
from hub_server import HubServer, Outcome, Request, folder_files
from peft import LoraConfig

from safe_lora.errors import AdapterNotFoundError

# Every test waits on a silent hub, from child processes.
pytestmark = [pytest.mark.hub, pytest.mark.slow]

BAR_S = 35.0  # from the call to the cached adapter or the typed error
SILENT = ["child_silent_warm", "child_silent_cold"]
METADATA = "/api/models/org/adapter/revision/main"
DOWNLOAD_ATTEMPTS = 6  # huggingface_hub's http_get: the first try and 5 retries, 1 s apart


def _is_download(request: Request) -> bool:
    return request.method == "GET" and request.resolved_file is not None


def _silent_hub(root: Path, timeouts: dict[str, str], *, midway: bool = False) -> dict[str, Outcome]:
    """Load once online (a warm cache), then load from a warm and a cold cache while the hub is silent;
    with ``midway``, also load from another cold cache while only downloads go unanswered."""
    adapter = save_adapter(
        tiny_llama(),
        LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, task_type="CAUSAL_LM"),
        root / "a",
        train_steps=1,
        seed=1,
    )
    context = root / "context.json"
    context.write_text(json.dumps({"a": str(adapter), "cache": str(root / "cache")}), encoding="utf-8")
    env = {"HUB_TEST_CONTEXT": str(context), "HUB_TEST_OUT": str(root / "out.json"), **timeouts}
    server = HubServer()
    server.add_repo("org/adapter", {"main": folder_files(adapter)})
    with server:
        warm_up = server.run_child("test_hub_timeouts", ["child_warm_up"], env=env)
        assert warm_up["child_warm_up"].value == {"equal": True}, warm_up["child_warm_up"].message
        with server.silenced():
            # A regression (a request without a bound) fails here instead of hanging the suite.
            done = server.run_child("test_hub_timeouts", SILENT, env=env, timeout=3 * BAR_S + 30)
        if midway:
            with server.silenced(when=_is_download):
                done |= server.run_child(
                    "test_hub_timeouts", ["child_silent_downloads"], env=env, timeout=120
                )
    return done


@pytest.fixture(scope="module")
def silent(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    timeouts = {"HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "1"}
    return _silent_hub(tmp_path_factory.mktemp("silent"), timeouts, midway=True)


def _assert_warm_cache_answers(outcome: Outcome, timeout_s: int) -> None:
    assert outcome.value == {"equal": True}, outcome.message
    (warning,) = outcome.warned("HubUnreachableWarning")
    assert f"Hugging Face Hub unreachable (ReadTimeout: timed out; no answer within {timeout_s} s" in warning
    assert "'org/adapter' at revision 'main'" in warning
    assert outcome.warned_from("HubUnreachableWarning") == ["test_hub_timeouts.py"]  # the caller's line
    assert [r.path for r in outcome.requests] == [METADATA]  # asked once; then the cache, no download


def _assert_cold_cache_fails(outcome: Outcome, timeout_s: int) -> None:
    hint = (
        rf"revision 'main' of it is not in the Hugging Face cache \(.*\) — the hub did not answer within "
        rf"{timeout_s} s \(ReadTimeout: timed out; HF_HUB_ETAG_TIMEOUT\), so nothing was downloaded — "
        r"load it once with the hub reachable"
    )
    with pytest.raises(AdapterNotFoundError, match=hint):
        outcome.reraise()
    assert [r.path for r in outcome.requests] == [METADATA]


def test_silent_hub_with_a_warm_cache_loads_the_cached_adapter_with_a_warning(
    silent: dict[str, Outcome],
) -> None:
    outcome = silent["child_silent_warm"]
    _assert_warm_cache_answers(outcome, timeout_s=2)
    assert 2 <= outcome.seconds < BAR_S


def test_silent_hub_with_a_cold_cache_is_a_typed_error(silent: dict[str, Outcome]) -> None:
    outcome = silent["child_silent_cold"]
    _assert_cold_cache_fails(outcome, timeout_s=2)
    assert 2 <= outcome.seconds < BAR_S


def test_hub_silent_on_downloads_only_is_a_typed_error_after_huggingface_hubs_retries(
    silent: dict[str, Outcome],
) -> None:
    outcome = silent["child_silent_downloads"]
    hint = (
        r"Adapter download failed: adapter_config\.json of 'org/adapter' at revision 'main' .* could not be "
        r"fetched \(ReadTimeout: timed out\) and is not in the local cache — .* — retry"
    )
    with pytest.raises(AdapterNotFoundError, match=hint):
        outcome.reraise()
    assert [r.method for r in outcome.requests if r.resolved_file] == ["HEAD"] + ["GET"] * DOWNLOAD_ATTEMPTS
    # Six attempts of HF_HUB_DOWNLOAD_TIMEOUT=1 s, a second apart: bounded by huggingface_hub, not by us.
    assert DOWNLOAD_ATTEMPTS * 1 <= outcome.seconds < BAR_S


@pytest.mark.slow
def test_silent_hub_at_the_default_timeouts_is_left_within_the_bar(tmp_path: Path) -> None:
    """huggingface_hub's defaults (10 s): both outcomes within 35 s of the call."""
    done = _silent_hub(tmp_path, timeouts={})
    _assert_warm_cache_answers(done["child_silent_warm"], timeout_s=10)
    _assert_cold_cache_fails(done["child_silent_cold"], timeout_s=10)
    for outcome in done.values():
        assert outcome.seconds < BAR_S


# --- the child side --------------------------------------------------------------------------------------

X = [[1, 5, 9, 2, 7]]


def _load(cache: str) -> dict[str, bool]:
    from safe_lora import load_for_inference

    context = json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8"))
    by_id = load_for_inference(tiny_llama(), "org/adapter", cache_dir=str(Path(context["cache"]) / cache))
    from_disk = load_for_inference(tiny_llama(), context["a"])
    with torch.no_grad():
        return {"equal": torch.equal(by_id(torch.tensor(X)).logits, from_disk(torch.tensor(X)).logits)}


def child_warm_up() -> dict[str, bool]:
    return _load("warm")


def child_silent_warm() -> dict[str, bool]:
    return _load("warm")


def child_silent_cold() -> dict[str, bool]:
    return _load("cold")


def child_silent_downloads() -> dict[str, bool]:
    return _load("cold-downloads")
