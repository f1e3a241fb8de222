"""The Hub's own record of each file, through the loaders; and a base the caller chose.

``test_hub_integrity.py`` shows ``HubFolder.read`` against the record; here the same happens through
``load_for_inference`` / ``auto.for_inference`` / ``inspect_adapter``, with the model left untouched:
bytes altered in transit (the test hub flips a byte of a file's body, its headers and metadata still
announcing the true digest) are refused; a cached blob altered on disk is downloaded again online and
refused offline. ``auto.for_inference`` with ``trust_remote_code=True`` refuses a base the adapter
chose before a single request for it, and nothing of the adapter's own repo but its config and weights
is ever requested -- not its tokenizer, not its code. Pins and the receipt of a hub load close it.

The real huggingface_hub client runs in a child process against ``hub_server.py`` (it reads
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when imported); the ``child_*`` functions at the bottom run
there, and every test asserts what was requested.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CONFIG, SAFETENSORS, assert_unchanged, save_adapter, snapshot, tiny_llama
from hub_server import HubServer, Outcome, folder_files, tampered
from peft import LoraConfig

pytestmark = [pytest.mark.hub, pytest.mark.slow]

# What a repo may hold besides the adapter: a training run's leftovers, and what AutoTokenizer or
# trust_remote_code would load and run. None of it may ever be requested.
EXTRAS = {
    "README.md": b"# adapter\n",
    "optimizer.pt": b"\x80opt",
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": "x.Evil"}}',
    "special_tokens_map.json": b"{}",
    "modeling_evil.py": b"raise SystemExit('adapter code ran')\n",
    "configuration_evil.py": b"raise SystemExit('adapter code ran')\n",
}
ADAPTER_FILES = {CONFIG, SAFETENSORS}
BASE = "org/tiny-llama"

ONLINE = [
    "child_tampered_weights",
    "child_tampered_config",
    "child_inspect_tampered_weights",
    "child_auto_tampered_weights",
    "child_altered_fill",  # fills the cache whose blobs the test then changes on disk
    "child_auto",
    "child_auto_trust_remote_code_without_base",
    "child_auto_trust_remote_code_local_base",
    "child_auto_trust_remote_code_hub_base",
    "child_auto_wrong_weights_pin",
    "child_auto_wrong_config_pin",
    "child_pinned_load",
    "child_pinned_subfolder",
]
OFFLINE = ["child_altered_offline"]
REPAIR = ["child_altered_online"]
AFTER_REPAIR = ["child_altered_offline_repaired"]


def _flip_cached_blob(cache: Path, repo: str, name: str) -> None:
    """Change one byte of the blob the cached ``name`` links to (bit rot, or an edit by hand)."""
    (snapshot_dir,) = (cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    blob = Path(os.path.realpath(snapshot_dir / name))
    blob.write_bytes(tampered(blob.read_bytes()))


@pytest.fixture(scope="module")
def hub_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Outcome], dict[str, Any]]:
    root = tmp_path_factory.mktemp("provenance-hub")
    tiny_llama().save_pretrained(root / "base")
    base = tiny_llama()
    base.name_or_path = BASE  # what from_pretrained("org/tiny-llama") records, and PEFT copies
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, task_type="CAUSAL_LM")
    adapter = save_adapter(base, config, root / "adapter", train_steps=1, seed=1)
    files = {**folder_files(adapter), **EXTRAS}

    server = HubServer()
    commits = {BASE: server.add_repo(BASE, {"main": folder_files(root / "base")})}
    for repo in ("org/adapter", "org/tampered-weights", "org/tampered-config", "org/altered"):
        commits[repo] = server.add_repo(repo, {"main": files})
    commits["org/nested"] = server.add_repo("org/nested", {"v1": folder_files(adapter, "sub/")})
    server.tamper |= {f"org/tampered-weights/{SAFETENSORS}", f"org/tampered-config/{CONFIG}"}
    cache = root / "cache"
    context = {"adapter": os.fspath(adapter), "base": os.fspath(root / "base"), "cache": os.fspath(cache)}
    (root / "context.json").write_text(json.dumps(context), encoding="utf-8")
    env = {"HUB_TEST_CONTEXT": os.fspath(root / "context.json"), "HUB_TEST_OUT": os.fspath(root / "out.json")}
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    with server:
        done = server.run_child("test_provenance_hub", ONLINE, env=env)
        for name in (CONFIG, SAFETENSORS):
            _flip_cached_blob(cache / "altered", "org/altered", name)
        done |= server.run_child("test_provenance_hub", OFFLINE, env=offline)
        done |= server.run_child("test_provenance_hub", REPAIR, env=env)
        done |= server.run_child("test_provenance_hub", AFTER_REPAIR, env=offline)
    digests = {name: hashlib.sha256((adapter / name).read_bytes()).hexdigest() for name in ADAPTER_FILES}
    return done, {"commits": commits, "adapter": adapter, "digests": digests}


@pytest.fixture(scope="module")
def outcomes(hub_run: tuple[dict[str, Outcome], dict[str, Any]]) -> dict[str, Outcome]:
    return hub_run[0]


@pytest.fixture(scope="module")
def facts(hub_run: tuple[dict[str, Outcome], dict[str, Any]]) -> dict[str, Any]:
    return hub_run[1]


def files_of(outcome: Outcome, repo: str, *, downloads: bool = False) -> list[str]:
    """The files of ``repo`` asked about (``HEAD`` or ``GET``) or downloaded, by path in the repo."""
    paths = outcome.downloads if downloads else outcome.touched
    return [path[len(repo) + 1 :] for path in paths if path.startswith(f"{repo}/")]


def base_requests(outcome: Outcome) -> list[str]:
    return [f"{r.method} {r.path}" for r in outcome.requests if r.repo == BASE]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --- altered in transit: refused through the loaders, the model untouched ------------------------------


@pytest.mark.parametrize(
    ("scenario", "repo", "name"),
    [
        ("child_tampered_weights", "org/tampered-weights", SAFETENSORS),
        ("child_tampered_config", "org/tampered-config", CONFIG),
        ("child_inspect_tampered_weights", "org/tampered-weights", SAFETENSORS),
        ("child_auto_tampered_weights", "org/tampered-weights", SAFETENSORS),
    ],
)
def test_bytes_altered_in_transit_are_refused_and_the_model_is_untouched(
    outcomes: dict[str, Outcome], facts: dict[str, Any], scenario: str, repo: str, name: str
) -> None:
    outcome = outcomes[scenario]
    # The child compared the model with its snapshot before letting the error through.
    assert outcome.error == "AdapterIntegrityError", outcome.message
    assert "ValueError" in outcome.error_types
    data = (facts["adapter"] / name).read_bytes()
    kind, digest = ("sha256", _sha) if name == SAFETENSORS else ("git-sha1", _git_sha1)
    assert outcome.error_attrs["path"] == f"{repo}/{name}"
    assert (outcome.error_attrs["expected"], outcome.error_attrs["actual"]) == (
        digest(data),
        digest(tampered(data)),
    )
    assert f"bytes do not match the {kind} the Hub recorded" in outcome.message
    assert "also when downloaded again" in outcome.message
    # Downloaded twice (the second time forced, pinned to the commit), then refused; a refused config
    # never costs the weights; and no base was asked for.
    requests = [(r.method, r.resolved_file) for r in outcome.requests if r.repo == repo and r.resolved_file]
    assert [method for method, file in requests if file == name] == ["HEAD", "GET", "HEAD", "GET"]
    if name == CONFIG:
        assert {file for _, file in requests} == {CONFIG}
    assert base_requests(outcome) == []


# --- a cached blob altered on disk: downloaded again online, refused offline ---------------------------


def test_offline_a_cached_blob_altered_on_disk_is_refused_and_never_loaded(
    outcomes: dict[str, Outcome],
) -> None:
    outcome = outcomes["child_altered_offline"]
    assert outcome.error == "AdapterIntegrityError", outcome.message
    assert re.search(r"in the local Hugging Face cache \(HF_HUB_OFFLINE=1\)", outcome.message)
    assert "the cached copy changed on disk" in outcome.message
    assert outcome.error_attrs["path"] == f"org/altered/{CONFIG}"  # the first file read
    assert outcome.requests == []


def test_online_a_cached_blob_altered_on_disk_is_downloaded_again_and_loads_the_right_numbers(
    outcomes: dict[str, Outcome],
) -> None:
    filled, repaired = outcomes["child_altered_fill"], outcomes["child_altered_online"]
    assert filled.error is None, filled.message
    assert repaired.error is None, repaired.message
    assert repaired.value["same"] is True  # torch.equal logits with the adapter loaded from its folder
    for name in (CONFIG, SAFETENSORS):  # each downloaded again, once
        assert [r.method for r in repaired.requests if r.resolved_file == name] == ["HEAD", "GET"]
    after = outcomes["child_altered_offline_repaired"]
    assert after.error is None, after.message
    assert after.value["same"] is True
    assert after.requests == []


# --- auto: a base the caller chose, and nothing but the adapter's two files ------------------------------


def test_trust_remote_code_without_base_model_is_refused_before_any_request_for_the_base(
    outcomes: dict[str, Outcome],
) -> None:
    outcome = outcomes["child_auto_trust_remote_code_without_base"]
    assert outcome.error == "UnsafeAdapterError", outcome.message
    assert "ValueError" in outcome.error_types
    assert "trust_remote_code=True" in outcome.message
    assert f"({BASE!r})" in outcome.message
    assert "pass base_model=" in outcome.message
    assert base_requests(outcome) == []
    assert set(files_of(outcome, "org/adapter")) == ADAPTER_FILES  # checked first, as always


@pytest.mark.parametrize(
    ("scenario", "base_asked"),
    [
        ("child_auto", True),
        ("child_auto_trust_remote_code_local_base", False),
        ("child_auto_trust_remote_code_hub_base", True),
    ],
)
def test_auto_loads_with_a_base_the_caller_chose_and_nothing_executable_from_the_adapter_repo(
    outcomes: dict[str, Outcome], scenario: str, base_asked: bool
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error is None, outcome.message
    assert outcome.value["same"] is True
    # Of the adapter's repo: its config, then its weights -- no tokenizer, no code, no README.
    assert files_of(outcome, "org/adapter", downloads=True) == [CONFIG, SAFETENSORS]
    assert set(files_of(outcome, "org/adapter")) == ADAPTER_FILES
    base_weights = [
        r for r in base_requests(outcome) if r.startswith("GET ") and r.endswith("/model.safetensors")
    ]
    assert len(base_weights) == (1 if base_asked else 0)
    # (With trust_remote_code=True, transformers asks the *base* repo for its code -- the base the
    # caller chose. Of the adapter's repo, never.)
    assert not any(path.endswith(".py") for path in files_of(outcome, "org/adapter"))
    if base_asked:  # the adapter's files came before the first request for the base
        first_base = next(i for i, r in enumerate(outcome.requests) if r.repo == BASE)
        adapter_files = [i for i, r in enumerate(outcome.requests) if r.repo == "org/adapter"]
        assert max(adapter_files) < first_base


@pytest.mark.parametrize(
    ("scenario", "name", "fetched"),
    [
        ("child_auto_wrong_weights_pin", SAFETENSORS, [CONFIG, SAFETENSORS]),
        ("child_auto_wrong_config_pin", CONFIG, [CONFIG]),
    ],
)
def test_auto_with_a_wrong_pin_is_refused_before_any_request_for_the_base(
    outcomes: dict[str, Outcome], facts: dict[str, Any], scenario: str, name: str, fetched: list[str]
) -> None:
    outcome = outcomes[scenario]
    assert outcome.error == "AdapterIntegrityError", outcome.message
    assert outcome.error_attrs["path"] == f"org/adapter/{name}"
    assert outcome.error_attrs["actual"] == facts["digests"][name]
    assert outcome.error_attrs["expected"] == "0" * 64
    assert base_requests(outcome) == []
    assert files_of(outcome, "org/adapter", downloads=True) == fetched


# --- pins and the receipt, for a hub load ------------------------------------------------------------------


def test_a_pinned_hub_load_gives_a_receipt_of_the_repo_and_commit(
    outcomes: dict[str, Outcome], facts: dict[str, Any]
) -> None:
    outcome = outcomes["child_pinned_load"]
    assert outcome.error is None, outcome.message
    entry = outcome.value["receipt"]["adapters"]["default"]
    assert entry["source"] == "org/adapter"
    assert entry["revision"] == "main"
    assert entry["commit"] == facts["commits"]["org/adapter"]["main"]
    assert entry["subfolder"] is None
    assert entry["files"] == facts["digests"]
    assert outcome.value["same"] is True
    auto_entry = outcomes["child_auto"].value["receipt"]
    assert auto_entry["adapters"]["default"]["files"] == facts["digests"]
    assert auto_entry["base_model"]["name_or_path"] == BASE


def test_a_pinned_hub_load_from_a_subfolder_at_a_revision(
    outcomes: dict[str, Outcome], facts: dict[str, Any]
) -> None:
    outcome = outcomes["child_pinned_subfolder"]
    assert outcome.error is None, outcome.message
    entry = outcome.value["receipt"]["adapters"]["default"]
    assert (entry["source"], entry["revision"], entry["subfolder"]) == ("org/nested", "v1", "sub")
    assert entry["commit"] == facts["commits"]["org/nested"]["v1"]
    assert entry["files"] == facts["digests"]  # names within the subfolder, as the pins name them
    assert files_of(outcome, "org/nested", downloads=True) == [f"sub/{CONFIG}", f"sub/{SAFETENSORS}"]


# --- the child side --------------------------------------------------------------------------------------

X = [[1, 5, 9, 2, 7]]


def _context() -> dict[str, str]:
    return dict(json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8")))


def _cache(name: str) -> str:
    return os.path.join(_context()["cache"], name)


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(X)).logits


def _same_as_local(model: Any) -> bool:
    from safe_lora import load_for_inference

    return torch.equal(_logits(model), _logits(load_for_inference(tiny_llama(), _context()["adapter"])))


def _load(repo: str, cache: str, **kwargs: Any) -> dict[str, Any]:
    """``load_for_inference`` into a fresh tiny Llama; on a refusal the model is compared with its
    snapshot before the error goes on (a change would surface as an AssertionError instead)."""
    from safe_lora import load_for_inference, receipt

    base = tiny_llama()
    before = snapshot(base)
    try:
        model = load_for_inference(base, repo, cache_dir=_cache(cache), **kwargs)
    except Exception:
        assert_unchanged(base, before)
        raise
    return {"same": _same_as_local(model), "receipt": receipt(model)}


def _auto(cache: str, **kwargs: Any) -> dict[str, Any]:
    from safe_lora import auto, receipt

    model = auto.for_inference(kwargs.pop("repo", "org/adapter"), cache_dir=_cache(cache), **kwargs)
    return {"same": _same_as_local(model), "receipt": receipt(model)}


def _digest(name: str) -> str:
    return hashlib.sha256((Path(_context()["adapter"]) / name).read_bytes()).hexdigest()


def child_tampered_weights() -> dict[str, Any]:
    return _load("org/tampered-weights", "tampered-weights")


def child_tampered_config() -> dict[str, Any]:
    return _load("org/tampered-config", "tampered-config")


def child_inspect_tampered_weights() -> None:
    from safe_lora import inspect_adapter

    report = inspect_adapter("org/tampered-weights", cache_dir=_cache("inspect-tampered"))
    assert [f.code for f in report.errors] == ["integrity"]
    assert report.tensor_count is None  # bytes that are not the Hub's are not parsed
    error = report.errors[0].error
    assert error is not None
    raise error


def child_auto_tampered_weights() -> dict[str, Any]:
    return _auto("auto-tampered", repo="org/tampered-weights")


def child_altered_fill() -> dict[str, Any]:
    return _load("org/altered", "altered")


def child_altered_offline() -> dict[str, Any]:
    return _load("org/altered", "altered")


def child_altered_online() -> dict[str, Any]:
    return _load("org/altered", "altered")


def child_altered_offline_repaired() -> dict[str, Any]:
    return _load("org/altered", "altered")


def child_auto() -> dict[str, Any]:
    return _auto("auto")


def child_auto_trust_remote_code_without_base() -> dict[str, Any]:
    return _auto("auto-trc", trust_remote_code=True)


def child_auto_trust_remote_code_local_base() -> dict[str, Any]:
    return _auto("auto-trc-local", trust_remote_code=True, base_model=_context()["base"])


def child_auto_trust_remote_code_hub_base() -> dict[str, Any]:
    return _auto("auto-trc-hub", trust_remote_code=True, base_model=BASE)


def child_auto_wrong_weights_pin() -> dict[str, Any]:
    return _auto("auto-pin-weights", expected_sha256="0" * 64)


def child_auto_wrong_config_pin() -> dict[str, Any]:
    return _auto("auto-pin-config", expected_sha256={CONFIG: "0" * 64, SAFETENSORS: _digest(SAFETENSORS)})


def child_pinned_load() -> dict[str, Any]:
    return _load(
        "org/adapter", "pinned", expected_sha256={CONFIG: _digest(CONFIG), SAFETENSORS: _digest(SAFETENSORS)}
    )


def child_pinned_subfolder() -> dict[str, Any]:
    return _load(
        "org/nested", "nested", subfolder="sub", revision="v1", expected_sha256=_digest(SAFETENSORS).upper()
    )
