"""``signed_by=`` through the loaders, for a local folder and for a hub repo.

Real PEFT adapters signed offline by model_signing's own signing API with elliptic-curve keys made
here (``test_signing.py`` covers the signature check itself: certificates, garbage, hashing schemes).
Through ``load_for_inference``, ``load_for_training``, ``load_adapter`` (adding and ``replace=True``),
``inspect_adapter`` and ``auto.for_inference``: signed loads; unsigned, a config or weights changed
after signing, and another key's signature are refused -- and the model is left exactly as it was.

The signature is read and verified first, then each file is compared with the signed manifest as it
is read, before it is parsed: an unsigned adapter or another signer's costs no read of the adapter's
files, a changed config never gets its weights read. The comparison is with the digests of the bytes
read: a config swapped on disk after it was read changes nothing.

Sigstore identities (``model_signing.verifying.Config().use_sigstore_verifier(identity=...,
oidc_issuer=...)``) need the network -- Sigstore's trust root, Fulcio's certificates, Rekor's log --
and are not tested here; safe_lora hands that Config's verifier the bundle it read, as for a key.

On the hub (``hub_server.py``, the huggingface_hub client in a child process), ``model.sig`` is one
more file of the repo: fetched only when ``signed_by=`` is given, first, and checked against the Hub's
record like the others.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "model_signing.signing",
    reason="model-signing is not installed: signed_by= is the optional extra (pip install -e '.[test]')",
)

import model_signing.verifying
import torch
from _provenance_kit import (
    LOADERS,
    SIG,
    Opens,
    Setup,
    assert_same,
    make_call,
    make_setup,
    name_of,
    refused_and_untouched,
    sha256,
    sign,
    write_key_pair,
)
from conftest import CONFIG, SAFETENSORS, assert_unchanged, snapshot, tiny_llama
from hub_server import HubServer, Outcome, folder_files

from safe_lora import AdapterReport, inspect_adapter, receipt

pytestmark = pytest.mark.signing

CASES = ["unsigned", "tampered-config", "tampered-weights", "other-key"]


# --- keys and signed folders -----------------------------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    """One bit of the last tensor value: the file stays a valid safetensors file."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@dataclass(frozen=True)
class Signed:
    setup: Setup
    public: Path  # the signer's public key: signed_by=
    other_public: Path
    folders: dict[str, Path]  # "signed", and each of CASES


def make_signed(root: Path) -> Signed:
    setup = make_setup(root)
    (root / "keys").mkdir()
    private, public = write_key_pair(root / "keys", "signer")
    other_private, other_public = write_key_pair(root / "keys", "other")
    folders = {}
    for name in ["signed", *CASES]:
        folders[name] = Path(shutil.copytree(setup.adapter, root / name))
    for name in ("signed", "tampered-config", "tampered-weights"):
        sign(folders[name], private)
    sign(folders["other-key"], other_private)
    config = folders["tampered-config"] / CONFIG
    config.write_bytes(config.read_bytes().replace(b'"lora_alpha": 4', b'"lora_alpha": 8'))
    flip_last_byte(folders["tampered-weights"] / SAFETENSORS)
    return Signed(setup, public, other_public, folders)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    return make_signed(tmp_path_factory.mktemp("signed"))


# --- a local folder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("form", ["str", "Path", "Config"])
def test_a_signed_adapter_loads_what_an_unsigned_load_loads(signed: Signed, kind: str, form: str) -> None:
    signed_by: Any = {
        "str": os.fspath(signed.public),
        "Path": signed.public,
        "Config": model_signing.verifying.Config().use_elliptic_key_verifier(public_key=signed.public),
    }[form]
    folder = signed.folders["signed"]
    got = make_call(kind, signed.setup, folder, signed_by=signed_by).run()
    assert_same(got, make_call(kind, signed.setup, signed.setup.adapter).run())
    digests = {name: sha256(folder / name) for name in (CONFIG, SAFETENSORS, SIG)}
    if isinstance(got, AdapterReport):
        assert got.sha256 == digests
    else:
        assert receipt(got)["adapters"][name_of(kind)]["files"] == digests


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("case", CASES)
def test_a_signature_that_does_not_hold_is_refused_and_the_model_is_left_as_it_was(
    signed: Signed, kind: str, case: str
) -> None:
    folder = signed.folders[case]
    call = make_call(kind, signed.setup, folder, base_missing=True, signed_by=signed.public)
    with Opens(folder) as opens, refused_and_untouched(call) as caught:
        pass
    err = caught.value
    assert isinstance(err, ValueError)
    message = str(err)
    if case == "unsigned":
        assert message.startswith("Adapter not signed:")
        assert err.path == os.fspath(folder / SIG)
    elif case == "other-key":
        assert "does not verify" in message
        assert "the public key given" in message
        assert (err.path, err.expected, err.actual) == (f"{folder}/{SIG}", None, sha256(folder / SIG))
    else:
        name = CONFIG if case == "tampered-config" else SAFETENSORS
        assert "does not match its signature" in message
        assert err.path == f"{folder}/{name}"
        assert err.actual == sha256(folder / name)
        assert err.expected == sha256(signed.setup.adapter / name)  # what was signed
    # What was read before the refusal: the signature first; a file only once the ones before held.
    # A report reads every file for its digests, and parses none of them.
    read = {
        "unsigned": [],
        "other-key": [SIG],
        "tampered-config": [SIG, CONFIG],
        "tampered-weights": [SIG, CONFIG, SAFETENSORS],
    }[case]
    if kind == "inspect_adapter":
        assert opens.names == ([] if case == "unsigned" else [SIG]) + [CONFIG, SAFETENSORS]
        report = inspect_adapter(folder, signed_by=signed.public)
        assert [f.code for f in report.errors] == ["signature"]
        assert report.tensor_count is None
    else:
        assert opens.names == read


@pytest.mark.parametrize("kind", LOADERS)
def test_each_file_and_the_signature_are_opened_once(signed: Signed, kind: str) -> None:
    folder = signed.folders["signed"]
    call = make_call(
        kind, signed.setup, folder, signed_by=signed.public, expected_sha256={SIG: sha256(folder / SIG)}
    )
    with Opens(folder) as opens:
        call.run()
    assert opens.names == [SIG, CONFIG, SAFETENSORS]


@pytest.mark.parametrize("kind", LOADERS)
def test_a_wrong_pin_of_the_signature_is_refused(signed: Signed, kind: str) -> None:
    folder = signed.folders["signed"]
    other = sha256(signed.folders["other-key"] / SIG)
    call = make_call(
        kind, signed.setup, folder, base_missing=True, signed_by=signed.public, expected_sha256={SIG: other}
    )
    with refused_and_untouched(call) as caught:
        pass
    assert (caught.value.path, caught.value.expected, caught.value.actual) == (
        os.fspath(folder / SIG),
        other,
        sha256(folder / SIG),
    )


@pytest.mark.parametrize("kind", LOADERS)
def test_a_config_swapped_on_disk_after_it_was_read_changes_nothing(
    signed: Signed, tmp_path: Path, kind: str
) -> None:
    """The signature, then the config are read; when the weights are opened the config on disk
    becomes another one (``lora_alpha`` 8, unsigned). A check that re-hashed the folder at the end
    (model_signing's own ``verify``) would refuse; a load that read the config again would load alpha
    8. Neither happens: the signature holds for the bytes read, and they are what is loaded."""
    folder = Path(shutil.copytree(signed.folders["signed"], tmp_path / "signed"))
    replacement = (signed.folders["tampered-config"] / CONFIG).read_bytes()

    def swap(name: str) -> None:
        if name == SAFETENSORS:
            (folder / CONFIG).write_bytes(replacement)

    call = make_call(kind, signed.setup, folder, signed_by=signed.public)
    with Opens(folder, swap) as opens:
        got = call.run()
    assert (folder / CONFIG).read_bytes() == replacement  # swapped during the load
    assert opens.names == [SIG, CONFIG, SAFETENSORS]
    assert_same(got, make_call(kind, signed.setup, signed.setup.adapter).run())


def test_a_signed_adapter_under_a_mapping_of_adapters(signed: Signed) -> None:
    """``signed_by=`` holds for every adapter of a mapping: one unsigned one refuses the load."""
    from safe_lora import load_for_inference

    both = {"a": signed.folders["signed"], "b": signed.folders["unsigned"]}
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(ValueError, match="Adapter not signed"):
        load_for_inference(base, both, signed_by=signed.public)
    assert_unchanged(base, before)
    model = load_for_inference(tiny_llama(), {"a": signed.folders["signed"]}, signed_by=signed.public)
    assert receipt(model)["adapters"]["a"]["files"][SIG] == sha256(signed.folders["signed"] / SIG)


# --- a hub repo ----------------------------------------------------------------------------------------

# What a training run leaves next to an adapter: never fetched.
EXTRAS = {"README.md": b"# adapter\n", "optimizer.pt": b"\x80opt"}
REPOS = {"signed": "org/signed", **{case: f"org/{case}" for case in CASES}}
KINDS = ["inference", "adapter", "inspect", "auto"]
HUB = [
    "child_signed_unsigned_load",  # first: fills the cache without the signature
    "child_signed_inference",
    "child_signed_adapter",
    "child_signed_inspect",
    "child_signed_auto",
    *(f"child_{kind}_{case.replace('-', '_')}" for kind in KINDS for case in CASES),
    "child_signed_offline_fill",
]
OFFLINE = ["child_signed_offline"]


@pytest.fixture(scope="module")
def hub_outcomes(signed: Signed, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("signed-hub")
    server = HubServer()
    for case, repo in REPOS.items():
        server.add_repo(repo, {"main": {**folder_files(signed.folders[case]), **EXTRAS}})
    server.add_repo("org/other", {"main": folder_files(signed.setup.other)})
    server.add_repo("org/tiny-llama", {"main": folder_files(signed.setup.base)})
    context = {
        "public": os.fspath(signed.public),
        "base": os.fspath(signed.setup.base),
        "adapter": os.fspath(signed.setup.adapter),
        "cache": os.fspath(root / "cache"),
    }
    (root / "context.json").write_text(json.dumps(context), encoding="utf-8")
    env = {"HUB_TEST_CONTEXT": os.fspath(root / "context.json"), "HUB_TEST_OUT": os.fspath(root / "out.json")}
    with server:
        done = server.run_child("test_provenance_signing", HUB, env=env)
        done |= server.run_child("test_provenance_signing", OFFLINE, env={**env, "HF_HUB_OFFLINE": "1"})
    return done


def _files(outcome: Outcome, repo: str, *, touched: bool = False) -> list[str]:
    """The files of ``repo`` downloaded (or asked about at all), by name, in order."""
    paths = outcome.touched if touched else outcome.downloads
    return [path.rpartition("/")[2] for path in paths if path.startswith(f"{repo}/")]


@pytest.mark.hub
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_signed_hub_repo_loads_and_its_signature_is_fetched_first(
    hub_outcomes: dict[str, Outcome], kind: str
) -> None:
    outcome = hub_outcomes[f"child_signed_{kind}"]
    assert outcome.error is None, outcome.message
    assert outcome.value["same"] is True
    assert _files(outcome, "org/signed") == [SIG, CONFIG, SAFETENSORS]  # a fresh cache: the sig first
    assert set(_files(outcome, "org/signed", touched=True)) == {CONFIG, SAFETENSORS, SIG}


@pytest.mark.hub
@pytest.mark.slow
def test_without_signed_by_the_signature_is_never_requested(hub_outcomes: dict[str, Outcome]) -> None:
    outcome = hub_outcomes["child_signed_unsigned_load"]
    assert outcome.error is None, outcome.message
    assert outcome.value["same"] is True
    assert SIG not in {path.rpartition("/")[2] for path in outcome.touched}
    assert outcome.value["files"] == [CONFIG, SAFETENSORS]  # the receipt: the files read


@pytest.mark.hub
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_a_hub_repo_whose_signature_does_not_hold_is_refused(
    hub_outcomes: dict[str, Outcome], signed: Signed, kind: str, case: str
) -> None:
    outcome = hub_outcomes[f"child_{kind}_{case.replace('-', '_')}"]
    assert outcome.error == "AdapterIntegrityError", outcome.message
    assert "ValueError" in outcome.error_types
    repo = REPOS[case]
    expected_start = {
        "unsigned": "Adapter not signed:",
        "other-key": "Adapter signature does not verify:",
        "tampered-config": "Adapter file does not match its signature:",
        "tampered-weights": "Adapter file does not match its signature:",
    }[case]
    assert outcome.message.startswith(expected_start), outcome.message
    if case.startswith("tampered"):
        name = CONFIG if case == "tampered-config" else SAFETENSORS
        assert outcome.error_attrs["path"] == f"{repo}/{name}"
        assert outcome.error_attrs["expected"] == sha256(signed.setup.adapter / name)
    # The child checked that the model it loaded into was left untouched (else: an AssertionError).
    # Downloaded: the signature first, then each file only once the ones before held (a report
    # downloads every file for its digests). An unsigned repo: the hub's listing says so, nothing fetched.
    fetched = {
        "unsigned": [],
        "other-key": [SIG],
        "tampered-config": [SIG, CONFIG],
        "tampered-weights": [SIG, CONFIG, SAFETENSORS],
    }[case]
    if kind == "inspect":
        fetched = [*fetched[:1], CONFIG, SAFETENSORS]
    assert _files(outcome, repo) == fetched
    assert not any(r.repo == "org/tiny-llama" for r in outcome.requests)  # auto: the base never asked for


@pytest.mark.hub
@pytest.mark.slow
def test_offline_a_cached_signed_repo_loads_with_its_cached_signature(
    hub_outcomes: dict[str, Outcome],
) -> None:
    outcome = hub_outcomes["child_signed_offline"]
    assert outcome.error is None, outcome.message
    assert outcome.value["same"] is True
    assert outcome.requests == []


# --- the child side ------------------------------------------------------------------------------------

X = [[1, 5, 9, 2, 7]]


def _context() -> dict[str, str]:
    return dict(json.loads(Path(os.environ["HUB_TEST_CONTEXT"]).read_text(encoding="utf-8")))


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(X)).logits


def _same_as_local(model: Any) -> bool:
    from safe_lora import load_for_inference

    return torch.equal(_logits(model), _logits(load_for_inference(tiny_llama(), _context()["adapter"])))


def _run(kind: str, repo: str, cache: str, **kwargs: Any) -> dict[str, Any]:
    """``kind`` on ``repo`` with ``signed_by=`` the signer's key; on a refusal, the model the call was
    given is checked to be untouched before the error goes on."""
    from safe_lora import auto, inspect_adapter, load_adapter, load_for_inference

    ctx = _context()
    options = {"cache_dir": os.path.join(ctx["cache"], cache), **kwargs}
    if kind == "inspect":
        report = inspect_adapter(repo, **options)
        if report.errors:
            error = report.errors[0].error
            assert error is not None
            raise error
        return {"same": report.sha256[SAFETENSORS] == sha256(Path(ctx["adapter"]) / SAFETENSORS)}
    if kind == "auto":
        model = auto.for_inference(repo, base_model="org/tiny-llama", **options)
        return {"same": _same_as_local(model)}
    target = (
        load_for_inference(tiny_llama(), "org/other", cache_dir=options["cache_dir"])
        if kind == "adapter"
        else tiny_llama()
    )
    before = snapshot(target)
    try:
        if kind == "adapter":
            model = load_adapter(target, repo, adapter_name="default", replace=True, **options)
        else:
            model = load_for_inference(target, repo, **options)
    except Exception:
        assert_unchanged(target, before)
        raise
    return {"same": _same_as_local(model), "files": sorted(receipt(model)["adapters"]["default"]["files"])}


def _signed_by() -> dict[str, str]:
    return {"signed_by": _context()["public"]}


def child_signed_unsigned_load() -> dict[str, Any]:
    return _run("inference", "org/signed", "no-signature")


def child_signed_inference() -> dict[str, Any]:
    return _run("inference", "org/signed", "inference", **_signed_by())


def child_signed_adapter() -> dict[str, Any]:
    return _run("adapter", "org/signed", "adapter", **_signed_by())


def child_signed_inspect() -> dict[str, Any]:
    return _run("inspect", "org/signed", "inspect", **_signed_by())


def child_signed_auto() -> dict[str, Any]:
    return _run("auto", "org/signed", "auto", **_signed_by())


def child_signed_offline_fill() -> dict[str, Any]:
    return _run("inference", "org/signed", "offline", **_signed_by())


def child_signed_offline() -> dict[str, Any]:
    return _run("inference", "org/signed", "offline", **_signed_by())


def _refused(kind: str, case: str) -> Any:
    def child() -> dict[str, Any]:
        return _run(kind, REPOS[case], f"{kind}-{case}", **_signed_by())

    child.__name__ = f"child_{kind}_{case.replace('-', '_')}"
    return child


for _kind in KINDS:
    for _case in CASES:
        _child = _refused(_kind, _case)
        globals()[_child.__name__] = _child
