"""HubFolder.read and HubFolder.recorded_digest: the bytes read are the bytes the Hub recorded.

The Hub records the sha256 of every LFS file and the git blob sha1 of every other file; huggingface_hub
never compares a download with either. The server (``hub_server.py``) announces both as the Hub does and
can flip a byte of a file in transit; tests also change a cached blob on disk. ``HubFolder`` runs in the
child process (see ``test_hub.py``), online, then offline, then online again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import save_adapter, tiny_llama
from hub_server import HubServer, Outcome, folder_files, git_sha1, tampered
from peft import LoraConfig

from safe_lora.errors import AdapterIntegrityError, AdapterNotFoundError, AdapterWeightsError

# Every test judges the child processes of one module fixture (~25 s).
pytestmark = [pytest.mark.hub, pytest.mark.slow]

CONFIG, SAFETENSORS = "adapter_config.json", "adapter_model.safetensors"
NAMES = [(CONFIG, "git-sha1"), (SAFETENSORS, "sha256")]

ONLINE = [
    "child_hub_records",
    "child_read_good",
    "child_read_subfolder",
    "child_tampered_config",
    "child_tampered_weights",
    "child_too_large",
    "child_unknown_file",
    "child_read_altered",  # fills the cache whose blobs the test then changes on disk
]
OFFLINE = ["child_offline_good", "child_offline_altered_config", "child_offline_altered_weights"]
REPAIR = ["child_online_altered"]
AFTER_REPAIR = ["child_offline_repaired"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, task_type="CAUSAL_LM")
    return save_adapter(tiny_llama(), config, tmp_path_factory.mktemp("adapter") / "a", train_steps=1, seed=1)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, adapter: Path) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("integrity")
    server = HubServer()
    for repo in ("org/good", "org/tampered-config", "org/tampered-weights", "org/altered"):
        server.add_repo(repo, {"main": folder_files(adapter)})
    server.add_repo("org/nested", {"main": folder_files(adapter, "sub/")})
    server.tamper |= {f"org/tampered-config/{CONFIG}", f"org/tampered-weights/{SAFETENSORS}"}
    cache = root / "cache"
    (root / "context.json").write_text(json.dumps({"cache": str(cache)}), encoding="utf-8")
    env = {"HUB_TEST_CONTEXT": str(root / "context.json"), "HUB_TEST_OUT": str(root / "out.json")}
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    with server:
        done = server.run_child("test_hub_integrity", ONLINE, env=env)
        for name in (CONFIG, SAFETENSORS):  # bit rot, or someone editing the cache by hand
            _flip_cached_blob(cache / "altered", "org/altered", name)
        done |= server.run_child("test_hub_integrity", OFFLINE, env=offline)
        done |= server.run_child("test_hub_integrity", REPAIR, env=env)
        done |= server.run_child("test_hub_integrity", AFTER_REPAIR, env=offline)
    return done


def _flip_cached_blob(cache: Path, repo: str, name: str) -> None:
    """Change one byte of the blob the cached ``name`` links to (the test may know the cache layout)."""
    (snapshot,) = (cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    blob = Path(os.path.realpath(snapshot / name))
    blob.write_bytes(tampered(blob.read_bytes()))


def _digest(kind: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if kind == "sha256" else git_sha1(data)


def _requests_for(outcome: Outcome, name: str) -> list[str]:
    return [f"{r.method} {r.path.split('/')[4]}" for r in outcome.requests if r.resolved_file == name]


# --- the record, and the bytes read against it ---------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), NAMES)
@pytest.mark.parametrize("view", ["model_info", "list_repo_tree", "get_paths_info"])
def test_the_test_hub_records_files_as_huggingface_hub_reads_the_hub(
    outcomes: dict[str, Outcome], adapter: Path, view: str, name: str, kind: str
) -> None:
    """The server's metadata, parsed by huggingface_hub itself: LFS ``sha256``, else the git blob id."""
    assert outcomes["child_hub_records"].value[view][name] == [
        kind,
        _digest(kind, (adapter / name).read_bytes()),
    ]


@pytest.mark.parametrize(("name", "kind"), NAMES)
@pytest.mark.parametrize(
    "scenario",
    [
        "child_read_good",  # online: model_info's siblings[].lfs.sha256 / blob_id
        "child_read_subfolder",  # the same, for a file in a subfolder of the repo
        "child_offline_good",  # offline: the digest the cache filed the blob under
        "child_online_altered",  # online, after a changed cached blob was downloaded again
        "child_offline_repaired",  # offline, the repaired cache
    ],
)
def test_read_returns_the_bytes_the_hub_recorded(
    outcomes: dict[str, Outcome], adapter: Path, scenario: str, name: str, kind: str
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error is None, outcome.message
    data = (adapter / name).read_bytes()
    got = outcome.value[name]
    assert got["recorded"] == [kind, _digest(kind, data)]
    assert got["sha256"] == hashlib.sha256(data).hexdigest()
    assert got["size"] == len(data)


@pytest.mark.parametrize("scenario", ["child_read_good", "child_offline_good"])
def test_no_record_for_a_file_the_hub_does_not_list_or_the_cache_does_not_hold(
    outcomes: dict[str, Outcome], scenario: str
) -> None:
    assert outcomes[scenario].value["unknown"] is None


def test_good_files_are_downloaded_once(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["child_read_good"]
    assert [r.method for r in outcome.requests if r.resolved_file] == ["HEAD", "GET"] * 2


# --- altered in transit: downloaded once more, then refused ---------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "repo", "name", "kind"),
    [
        ("child_tampered_config", "org/tampered-config", CONFIG, "git-sha1"),
        ("child_tampered_weights", "org/tampered-weights", SAFETENSORS, "sha256"),
    ],
)
def test_a_file_altered_in_transit_is_refused_after_one_more_download(
    outcomes: dict[str, Outcome], adapter: Path, scenario: str, repo: str, name: str, kind: str
) -> None:
    outcome = outcomes[scenario]
    data = (adapter / name).read_bytes()
    expected, actual = _digest(kind, data), _digest(kind, tampered(data))
    hint = (
        rf"bytes do not match the {kind} the Hub recorded — expected {kind} {expected}, found {actual} "
        r"\(also when downloaded again\) — .*check the connection and HF_ENDPOINT"
    )
    with pytest.raises(AdapterIntegrityError, match=hint) as caught:
        outcome.reraise()
    assert (caught.value.path, caught.value.expected, caught.value.actual) == (
        f"{repo}/{name}",
        expected,
        actual,
    )
    # The second download is pinned to the commit and forced past the cache.
    assert [request.split()[0] for request in _requests_for(outcome, name)] == ["HEAD", "GET", "HEAD", "GET"]


# --- altered on disk: refused offline, downloaded again online ------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "name", "kind"),
    [
        ("child_offline_altered_config", CONFIG, "git-sha1"),
        ("child_offline_altered_weights", SAFETENSORS, "sha256"),
    ],
)
def test_offline_a_cached_blob_changed_on_disk_is_refused(
    outcomes: dict[str, Outcome], adapter: Path, scenario: str, name: str, kind: str
) -> None:
    outcome = outcomes[scenario]
    data = (adapter / name).read_bytes()
    expected, actual = _digest(kind, data), _digest(kind, tampered(data))
    hint = (
        rf"{name} .* bytes do not match the {kind} the Hub recorded — expected {kind} {expected}, "
        rf"found {actual} \(in the local Hugging Face cache \(HF_HUB_OFFLINE=1\), filed under .*\) — "
        rf"the cached copy changed on disk — load it once with the hub reachable "
        rf".*`hf cache rm hf://models/org/altered/{name} --cache-dir .*/altered`"
    )
    with pytest.raises(AdapterIntegrityError, match=hint) as caught:
        outcome.reraise()
    assert (caught.value.expected, caught.value.actual) == (expected, actual)
    assert outcome.requests == []


def test_online_a_cached_blob_changed_on_disk_is_downloaded_again(outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes["child_online_altered"]
    assert outcome.error is None, outcome.message  # the good bytes: test_read_returns_the_bytes_...
    for name in (CONFIG, SAFETENSORS):
        assert [request.split()[0] for request in _requests_for(outcome, name)] == ["HEAD", "GET"]


# --- what is refused before anything is read ------------------------------------------------------------


def test_a_file_the_hub_lists_as_too_large_is_refused_before_it_is_downloaded(
    outcomes: dict[str, Outcome],
) -> None:
    outcome = outcomes["child_too_large"]
    with pytest.raises(AdapterWeightsError, match=r"is larger than 64 bytes \(\d+ bytes on the hub\)"):
        outcome.reraise()
    assert _requests_for(outcome, SAFETENSORS) == []


def test_a_file_not_in_the_repo_is_not_found_by_name(outcomes: dict[str, Outcome]) -> None:
    hint = (
        r"has no nope\.json on the hub .* — expected one of \[.*'adapter_config\.json'.*\] — check the file"
    )
    with pytest.raises(AdapterNotFoundError, match=hint):
        outcomes["child_unknown_file"].reraise()


# --- the child side --------------------------------------------------------------------------------------


def _cache(name: str) -> str:
    context = json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8"))
    return str(Path(context["cache"]) / name)


def _weights_error(found: str, hint: str) -> Exception:
    return AdapterWeightsError(f"Adapter weights refused: the file {found} — {hint}.")


def _read(
    repo: str, cache: str, names: tuple[str, ...] = (CONFIG, SAFETENSORS), **kwargs: Any
) -> dict[str, Any]:
    from safe_lora._hub import open_folder

    folder = open_folder(repo, cache_dir=_cache(cache), **kwargs)
    out: dict[str, Any] = {"unknown": folder.recorded_digest("nope.json")}
    for name in names:
        got = folder.read(name, max_bytes=1 << 30, error=_weights_error)
        digest = folder.recorded_digest(name)
        out[name] = {
            "sha256": got.sha256,
            "size": len(got.data),
            "recorded": list(digest) if digest else None,
        }
    return out


def child_hub_records() -> dict[str, dict[str, list[str]]]:
    from huggingface_hub import HfApi

    def record(lfs: Any, blob_id: str) -> list[str]:
        return ["sha256", lfs.sha256] if lfs is not None else ["git-sha1", blob_id]

    api = HfApi()
    siblings = api.model_info("org/good", files_metadata=True, timeout=10).siblings or []
    tree = [f for f in api.list_repo_tree("org/good") if hasattr(f, "blob_id")]
    paths = api.get_paths_info("org/good", [CONFIG, SAFETENSORS])
    return {
        "model_info": {s.rfilename: record(s.lfs, str(s.blob_id)) for s in siblings},
        "list_repo_tree": {f.path: record(f.lfs, f.blob_id) for f in tree},
        "get_paths_info": {f.path: record(f.lfs, f.blob_id) for f in paths if hasattr(f, "blob_id")},
    }


def child_read_good() -> dict[str, Any]:
    return _read("org/good", "good")


def child_read_subfolder() -> dict[str, Any]:
    return _read("org/nested", "nested", subfolder="sub")


def child_tampered_config() -> dict[str, Any]:
    return _read("org/tampered-config", "tampered-config", (CONFIG,))


def child_tampered_weights() -> dict[str, Any]:
    return _read("org/tampered-weights", "tampered-weights")


def child_too_large() -> None:
    from safe_lora._hub import open_folder

    open_folder("org/good", cache_dir=_cache("too-large")).read(
        SAFETENSORS, max_bytes=64, error=_weights_error
    )


def child_unknown_file() -> None:
    from safe_lora._hub import open_folder

    open_folder("org/good", cache_dir=_cache("unknown")).fetch("nope.json")


def child_read_altered() -> dict[str, Any]:
    return _read("org/altered", "altered")


def child_offline_good() -> dict[str, Any]:
    return _read("org/good", "good")


def child_offline_altered_config() -> dict[str, Any]:
    return _read("org/altered", "altered", (CONFIG,))


def child_offline_altered_weights() -> dict[str, Any]:
    return _read("org/altered", "altered", (SAFETENSORS,))


def child_online_altered() -> dict[str, Any]:
    return _read("org/altered", "altered")


def child_offline_repaired() -> dict[str, Any]:
    return _read("org/altered", "altered")
