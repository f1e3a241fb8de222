"""Hub ids, downloaded like PEFT does -- but only the config and the weights -- from a real HTTP server.

The server (``hub_server.py``) serves repos made from adapters PEFT's ``save_pretrained`` wrote,
each next to files a loader must never fetch (a README, optimizer state, training arguments). The
real huggingface_hub client talks to it from a subprocess, since it reads ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` when imported; the ``child_*`` functions at the bottom are what runs there. Every
test asserts what was *requested* (the server's log), not only what came back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_adapter, tiny_llama
from hub_server import HubServer, Outcome, Request, folder_files
from peft import LoraConfig
from safetensors.torch import load_file

# Every test judges the child processes of one module fixture (~25 s).
pytestmark = [pytest.mark.hub, pytest.mark.slow]

CONFIG, SAFETENSORS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
# What a training run leaves next to an adapter; a loader has no business fetching any of it.
EXTRAS = {"README.md": b"# an adapter\n", "optimizer.pt": b"\x80optimizer", "training_args.bin": b"\x80args"}
TOKEN = "hf_granted"

ONLINE = [
    "child_load_by_id",
    "child_load_again_warm",
    "child_revision",
    "child_subfolder",
    "child_subfolder_missing",
    "child_force_download",
    "child_training_by_id",
    "child_unknown_repo",
    "child_unknown_revision",
    "child_missing_weights",
    "child_broken_config",
    "child_pickle_refused",
    "child_pickle_allowed",
    "child_gated_no_token",
    "child_gated_wrong_token",
    "child_gated_token",
    "child_inspect_pickle_repo",
    "child_moving_early",
    "child_moving_late",
]
OFFLINE = ["child_offline_warm", "child_offline_revision", "child_offline_cold", "child_offline_force"]
UNREACHABLE = ["child_unreachable_warm", "child_unreachable_cold"]


def _adapter(root: Path, name: str, seed: int, alpha: int = 4) -> Path:
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=alpha, task_type="CAUSAL_LM")
    return save_adapter(tiny_llama(), config, root / name, train_steps=1, seed=seed)


def _pickle_only(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    torch.save(load_file(target / SAFETENSORS), target / PICKLE)
    (target / SAFETENSORS).unlink()
    return target


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], dict[str, dict[str, str]]]:
    """Every ``child_*`` function run against the server: online, offline (server up), unreachable;
    and the commits of every repo (``{repo: {revision: commit}}``)."""
    root = tmp_path_factory.mktemp("hub")
    a, b = _adapter(root, "a", seed=1), _adapter(root, "b", seed=2)
    c = _adapter(root, "c", seed=3, alpha=8)  # another config: mixing it with a's weights would show
    pickled = _pickle_only(a, root / "pickled")
    broken = shutil.copytree(a, root / "broken")
    (broken / CONFIG).write_text(json.dumps({"peft_type": "NOT_A_TUNER"}), encoding="utf-8")

    server = HubServer()
    commits = {
        "org/adapter": server.add_repo(
            "org/adapter", {"main": {**folder_files(a), **EXTRAS}, "v2": folder_files(b)}
        ),
        "org/nested": server.add_repo("org/nested", {"main": {**folder_files(b, "sub/"), **EXTRAS}}),
        "org/pickle-only": server.add_repo("org/pickle-only", {"main": {**folder_files(pickled), **EXTRAS}}),
        "org/no-weights": server.add_repo(
            "org/no-weights", {"main": {CONFIG: (a / CONFIG).read_bytes(), **EXTRAS}}
        ),
        "org/broken-config": server.add_repo(
            "org/broken-config", {"main": {**folder_files(broken), **EXTRAS}}
        ),
        "org/gated": server.add_repo("org/gated", {"main": {**folder_files(a), **EXTRAS}}, gated_token=TOKEN),
    }
    # Branches that move while a load runs: right after the metadata answer, right after the config.
    moves: dict[str, Callable[[Request], bool]] = {
        "org/moving-early": lambda r: r.path == "/api/models/org/moving-early/revision/main",
        "org/moving-late": lambda r: (
            r.method == "GET" and r.path == f"/org/moving-late/resolve/main/{CONFIG}"
        ),
    }
    for repo, when in moves.items():
        commits[repo] = server.add_repo(repo, {"main": folder_files(a), "next": folder_files(c)})
        server.move_ref_after(when, repo, "main", commits[repo]["next"])

    context = root / "context.json"
    context.write_text(json.dumps({"a": str(a), "b": str(b), "cache": str(root / "cache")}), encoding="utf-8")
    env = {
        "HUB_TEST_CONTEXT": str(context),
        "HUB_TEST_OUT": str(root / "out.json"),
        "HF_HOME": str(root / "hf"),
    }
    with server:
        done = server.run_child("test_hub", ONLINE, env=env)
        done |= server.run_child("test_hub", OFFLINE, env={**env, "HF_HUB_OFFLINE": "1"})
    done |= server.run_child("test_hub", UNREACHABLE, env=env)  # same HF_ENDPOINT, nobody listening
    return done, commits


@pytest.fixture(scope="module")
def outcomes(hub_run: tuple[dict[str, Outcome], dict[str, dict[str, str]]]) -> dict[str, Outcome]:
    return hub_run[0]


@pytest.fixture(scope="module")
def commits(hub_run: tuple[dict[str, Outcome], dict[str, dict[str, str]]]) -> dict[str, dict[str, str]]:
    return hub_run[1]


def files_of(outcome: Outcome) -> set[str]:
    """The file names requested, without repo and subfolder."""
    return {path.rpartition("/")[2] for path in outcome.touched}


# --- loads: the right model, and only the two adapter files requested -------------------------------


@pytest.mark.parametrize(
    ("scenario", "repo", "revision", "downloads", "cache_knows_revision"),
    [
        ("child_load_by_id", "org/adapter", "main", [CONFIG, SAFETENSORS], False),
        ("child_revision", "org/adapter", "v2", [CONFIG, SAFETENSORS], False),
        ("child_subfolder", "org/nested", "main", [f"sub/{CONFIG}", f"sub/{SAFETENSORS}"], False),
        ("child_training_by_id", "org/adapter", "main", [CONFIG, SAFETENSORS], False),
        ("child_force_download", "org/adapter", "main", [CONFIG, SAFETENSORS], True),
        ("child_gated_token", "org/gated", "main", [CONFIG, SAFETENSORS], False),
        ("child_pickle_allowed", "org/pickle-only", "main", [CONFIG, PICKLE], False),
    ],
)
def test_load_by_id_equals_the_local_folder_and_fetches_two_files(
    outcomes: dict[str, Outcome],
    commits: dict[str, dict[str, str]],
    scenario: str,
    repo: str,
    revision: str,
    downloads: list[str],
    cache_knows_revision: bool,
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error is None, outcome.message
    assert outcome.value == {"equal": True}  # torch.equal logits with the same adapter loaded from disk
    # The config first (a broken one never costs the weights), then the weights; nothing else.
    assert outcome.downloads == [f"{repo}/{name}" for name in downloads]
    assert outcome.touched == [f"{repo}/{name}" for name in downloads for _ in ("HEAD", "GET")]
    # One metadata question, at the revision asked for. Every file at the commit it named -- except
    # the first, by the revision's name, while the cache does not map that name to the commit yet:
    # huggingface_hub then records the mapping itself, which an offline load by name needs.
    api = [r.path for r in outcome.requests if r.path.startswith("/api/")]
    assert api == [f"/api/models/{repo}/revision/{revision}"]
    commit = commits[repo][revision]
    first = commit if cache_knows_revision else revision
    at = [(r.resolved_file, r.path.split("/")[4]) for r in outcome.requests if r.resolved_file]
    assert at == [(downloads[0], first)] * 2 + [(downloads[1], commit)] * 2


@pytest.mark.parametrize("scenario", ["child_moving_early", "child_moving_late"])
def test_config_and_weights_come_from_one_commit_while_the_branch_moves(
    outcomes: dict[str, Outcome], commits: dict[str, dict[str, str]], scenario: str
) -> None:
    """The branch moves to another config right after the metadata answer (early) or the config (late)."""
    outcome = outcomes[scenario]
    repo = f"org/{scenario.removeprefix('child_').replace('_', '-')}"
    assert outcome.value == {"equal": True}, outcome.message  # a's config with a's weights
    listed = commits[repo]["main"]
    weights_at = {r.path.split("/")[4] for r in outcome.requests if r.resolved_file == SAFETENSORS}
    assert weights_at == {listed}
    config_at = [
        r.path.split("/")[4] for r in outcome.requests if r.method == "GET" and r.resolved_file == CONFIG
    ]
    # Early: the name already gave the other commit's config; it is fetched again at the listed commit.
    assert config_at == (["main", listed] if scenario == "child_moving_early" else ["main"])


def test_revision_is_asked_for_by_name(outcomes: dict[str, Outcome]) -> None:
    api = [r.path for r in outcomes["child_revision"].requests if r.path.startswith("/api/")]
    assert api == ["/api/models/org/adapter/revision/v2"]


def test_warm_cache_asks_one_question_and_downloads_nothing(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["child_load_again_warm"]
    assert outcome.value == {"equal": True}
    assert [r.path for r in outcome.requests] == ["/api/models/org/adapter/revision/main"]


def test_nothing_but_the_adapter_files_is_ever_requested(outcomes: dict[str, Outcome]) -> None:
    every = {name for outcome in outcomes.values() for name in files_of(outcome)}
    assert every == {CONFIG, SAFETENSORS, PICKLE}  # of EXTRAS, not one


# --- errors: the right type, the right hint, and what was (not) requested ---------------------------


@pytest.mark.parametrize(
    ("scenario", "error", "match", "requested"),
    [
        ("child_unknown_repo", "AdapterNotFoundError", r"Hub has no repo 'org/missing'.*token=", set()),
        ("child_unknown_revision", "AdapterNotFoundError", r"no revision 'nope'.*check revision=", set()),
        (
            "child_missing_weights",
            "AdapterNotFoundError",
            r"no adapter_model\.safetensors on the hub",
            {CONFIG},
        ),
        ("child_subfolder_missing", "AdapterNotFoundError", r"pass subfolder= one of \['sub'\]", set()),
        ("child_broken_config", "AdapterConfigError", r"expected one of .*found 'NOT_A_TUNER'", {CONFIG}),
        (
            "child_pickle_refused",
            "UnsafeAdapterError",
            r"Refusing to download and unpickle.*allow_pickle",
            {CONFIG},
        ),
        ("child_gated_no_token", "AdapterAccessError", r"answered 401 .*gated.*pass token=", {CONFIG}),
        ("child_gated_wrong_token", "AdapterAccessError", r"answered 403 .*gated.*pass token=", {CONFIG}),
    ],
)
def test_errors_name_what_is_missing_and_fetch_nothing_more(
    outcomes: dict[str, Outcome], scenario: str, error: str, match: str, requested: set[str]
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error == error
    assert "SafeLoraError" in outcome.error_types
    assert re.search(match, outcome.message), outcome.message
    assert files_of(outcome) == requested


@pytest.mark.parametrize(
    ("scenario", "builtin"),
    [
        ("child_unknown_repo", "FileNotFoundError"),
        ("child_gated_no_token", "PermissionError"),
        ("child_pickle_refused", "ValueError"),
    ],
)
def test_errors_are_the_builtins_callers_catch(
    outcomes: dict[str, Outcome], scenario: str, builtin: str
) -> None:
    assert builtin in outcomes[scenario].error_types


def test_pickle_only_repo_never_has_its_pickle_requested(outcomes: dict[str, Outcome]) -> None:
    for scenario in ("child_pickle_refused", "child_inspect_pickle_repo"):
        assert PICKLE not in files_of(outcomes[scenario])
    report = outcomes["child_inspect_pickle_repo"].value
    assert report["loads_safely"] is False
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["pickle-only"]
    assert [w["name"] for w in report["weight_files"]] == [PICKLE]
    assert report["weight_files"][0]["size_bytes"] > 0  # from the hub's listing, not a download


# --- offline and unreachable: the cache answers -------------------------------------------------------


def test_offline_with_a_warm_cache_loads_without_a_single_request(outcomes: dict[str, Outcome]) -> None:
    for scenario in ("child_offline_warm", "child_offline_revision"):
        outcome = outcomes[scenario]
        assert outcome.value == {"equal": True}, outcome.message
        assert outcome.requests == []
        assert outcome.warned("HubUnreachableWarning") == []  # offline on purpose: nothing to warn about


@pytest.mark.parametrize(
    ("scenario", "match"),
    [
        ("child_offline_cold", r"not in the Hugging Face cache .* HF_HUB_OFFLINE=1"),
        ("child_offline_force", r"force_download=True needs the hub, but HF_HUB_OFFLINE=1"),
        ("child_unreachable_cold", r"not in the Hugging Face cache .* the hub is unreachable: ConnectError"),
    ],
)
def test_cache_miss_offline_or_unreachable_is_not_found(
    outcomes: dict[str, Outcome], scenario: str, match: str
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error == "AdapterNotFoundError"
    assert re.search(match, outcome.message), outcome.message
    assert outcome.requests == []


def test_unreachable_hub_falls_back_to_the_cache_with_a_warning(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["child_unreachable_warm"]
    assert outcome.value == {"equal": True}, outcome.message
    (warning,) = outcome.warned("HubUnreachableWarning")
    assert "Hugging Face Hub unreachable (ConnectError" in warning
    assert "'org/adapter' at revision 'main'" in warning
    assert outcome.warned_from("HubUnreachableWarning") == ["test_hub.py"]  # the caller's line


# --- the child side: runs in a subprocess pointed at the server ----------------------------------------

X = [[1, 5, 9, 2, 7]]


def _context() -> dict[str, str]:
    return dict(json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8")))


def _cache(name: str) -> str:
    return str(Path(_context()["cache"]) / name)


def _same_as_local(adapter: str, local: str, *, training: bool = False, **kwargs: Any) -> dict[str, bool]:
    from safe_lora import load_for_inference, load_for_training

    load = load_for_training if training else load_for_inference
    by_id, from_disk = load(tiny_llama(), adapter, **kwargs), load(tiny_llama(), _context()[local])
    by_id.eval(), from_disk.eval()
    with torch.no_grad():
        return {"equal": torch.equal(by_id(torch.tensor(X)).logits, from_disk(torch.tensor(X)).logits)}


def child_load_by_id() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"))


def child_load_again_warm() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"))


def child_revision() -> dict[str, bool]:
    return _same_as_local("org/adapter", "b", revision="v2", cache_dir=_cache("rev"))


def child_subfolder() -> dict[str, bool]:
    return _same_as_local("org/nested", "b", subfolder="sub", cache_dir=_cache("sub"))


def child_subfolder_missing() -> dict[str, bool]:
    return _same_as_local("org/nested", "b", cache_dir=_cache("sub"))


def child_force_download() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"), force_download=True)


def child_training_by_id() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", training=True, cache_dir=_cache("training"))


def child_unknown_repo() -> dict[str, bool]:
    return _same_as_local("org/missing", "a", cache_dir=_cache("errors"))


def child_unknown_revision() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", revision="nope", cache_dir=_cache("errors"))


def child_missing_weights() -> dict[str, bool]:
    return _same_as_local("org/no-weights", "a", cache_dir=_cache("errors"))


def child_broken_config() -> dict[str, bool]:
    return _same_as_local("org/broken-config", "a", cache_dir=_cache("errors"))


def child_pickle_refused() -> dict[str, bool]:
    return _same_as_local("org/pickle-only", "a", cache_dir=_cache("errors"))


def child_pickle_allowed() -> dict[str, bool]:
    return _same_as_local("org/pickle-only", "a", allow_pickle=True, cache_dir=_cache("pickle"))


def child_gated_no_token() -> dict[str, bool]:
    return _same_as_local("org/gated", "a", cache_dir=_cache("gated"))


def child_gated_wrong_token() -> dict[str, bool]:
    return _same_as_local("org/gated", "a", token="hf_wrong", cache_dir=_cache("gated"))


def child_gated_token() -> dict[str, bool]:
    return _same_as_local("org/gated", "a", token=TOKEN, cache_dir=_cache("gated"))


def child_inspect_pickle_repo() -> dict[str, Any]:
    from safe_lora import inspect_adapter

    return inspect_adapter("org/pickle-only", cache_dir=_cache("inspect")).to_dict()


def child_moving_early() -> dict[str, bool]:
    return _same_as_local("org/moving-early", "a", cache_dir=_cache("moving-early"))


def child_moving_late() -> dict[str, bool]:
    return _same_as_local("org/moving-late", "a", cache_dir=_cache("moving-late"))


def child_offline_warm() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"))


def child_offline_revision() -> dict[str, bool]:
    return _same_as_local("org/adapter", "b", revision="v2", cache_dir=_cache("rev"))


def child_offline_cold() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("cold"))


def child_offline_force() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"), force_download=True)


def child_unreachable_warm() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("main"))


def child_unreachable_cold() -> dict[str, bool]:
    return _same_as_local("org/adapter", "a", cache_dir=_cache("cold"))
