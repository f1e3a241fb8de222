"""Pinned digests through every entry point, and proof that they are computed over the bytes parsed.

``expected_sha256=`` as one digest (the weights file's, as ``sha256sum`` prints it) or as
``{file name: sha256}``, right and wrong, through ``load_for_inference``, ``load_for_training``,
``load_adapter`` (adding, and ``replace=True``), ``inspect_adapter`` and ``auto.for_inference``: a
wrong pin is an ``AdapterIntegrityError`` (a ``ValueError``) with ``path``, ``expected`` and
``actual``, and the model is left exactly as it was.

"The digest is of the very bytes that are parsed" is shown from the outside, with an audit hook
(:func:`sys.addaudithook`) on the interpreter's ``open`` events: each file is opened once per load,
and a file swapped on disk once it was read changes neither the verdict nor the model. Nothing of
safe_lora is mocked. The hub's own record and signatures through the loaders are in
``test_provenance_hub.py`` and ``test_provenance_signing.py``; the receipt in ``test_receipt.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _provenance_kit import (
    LOADERS,
    Opens,
    Setup,
    assert_same,
    make_call,
    make_setup,
    name_of,
    refused_and_untouched,
    sha256,
)
from conftest import CONFIG, SAFETENSORS, assert_unchanged, snapshot, tiny_llama

from safe_lora import AdapterReport, inspect_adapter, load_for_inference, receipt


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return make_setup(tmp_path_factory.mktemp("provenance"))


@pytest.fixture
def adapter(setup: Setup, tmp_path: Path) -> Path:
    """A private copy of the pinned adapter: tests may change its files."""
    return Path(shutil.copytree(setup.adapter, tmp_path / "adapter"))


# --- right pins: loads, and exactly what an unpinned load gives -----------------------------------------


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("form", ["str", "STR", "mapping", "mapping-weights-only", "mapping-config-only"])
def test_a_right_pin_loads_what_an_unpinned_load_loads(setup: Setup, kind: str, form: str) -> None:
    adapter = setup.adapter
    weights, config = sha256(adapter / SAFETENSORS), sha256(adapter / CONFIG)
    pinned: Any = {
        "str": weights,
        "STR": f"  {weights.upper()}\n",  # upper case, as some tools print it; whitespace around it
        "mapping": {CONFIG: config.upper(), SAFETENSORS: weights},
        "mapping-weights-only": {SAFETENSORS: weights},
        "mapping-config-only": {CONFIG: config},
    }[form]
    got = make_call(kind, setup, adapter, expected_sha256=pinned).run()
    assert_same(got, make_call(kind, setup, adapter).run())
    if kind == "inspect_adapter":
        assert got.sha256 == {CONFIG: config, SAFETENSORS: weights}


# --- wrong pins: refused, with the digests, before the model is touched ---------------------------------


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("wrong", ["weights-str", "weights-mapping", "config-mapping"])
def test_a_wrong_pin_is_refused_and_the_model_is_left_as_it_was(setup: Setup, kind: str, wrong: str) -> None:
    adapter = setup.adapter
    weights, config = sha256(adapter / SAFETENSORS), sha256(adapter / CONFIG)
    other = sha256(setup.other / SAFETENSORS)  # a real digest, of another file
    pinned: Any = {
        "weights-str": other.upper(),
        "weights-mapping": {CONFIG: config, SAFETENSORS: other},
        "config-mapping": {CONFIG: other, SAFETENSORS: weights},
    }[wrong]
    name, actual = (CONFIG, config) if wrong == "config-mapping" else (SAFETENSORS, weights)
    call = make_call(kind, setup, adapter, base_missing=True, expected_sha256=pinned)
    with Opens(adapter) as opens, refused_and_untouched(call) as caught:
        pass
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.path, err.expected, err.actual) == (os.fspath(adapter / name), other, actual)
    assert f"has sha256 {actual} — expected {other} (expected_sha256=)" in str(err)
    if kind == "inspect_adapter":  # a report reads every file for its digest, and parses none refused
        assert opens.names == [CONFIG, SAFETENSORS]
        report = inspect_adapter(adapter, expected_sha256=pinned)
        assert [f.code for f in report.errors] == ["integrity"]
        assert report.tensor_count is None
        assert report.peft_type is None if wrong == "config-mapping" else report.peft_type == "LORA"
    elif wrong == "config-mapping":  # a config not vouched for is never parsed, its weights never read
        assert opens.names == [CONFIG]


def test_load_for_inference_with_a_mapping_of_adapters_and_one_digest_is_refused(setup: Setup) -> None:
    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(TypeError, match="pins a single adapter's weights file"):
        load_for_inference(
            base, {"a": setup.adapter, "b": setup.other}, expected_sha256=sha256(setup.adapter / SAFETENSORS)
        )
    assert_unchanged(base, before)


# --- pins that cannot mean what they say ---------------------------------------------------------------


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("name", ["README.md", "adapter_model.bin", "model.sig", f"./{CONFIG}"])
def test_a_pin_for_a_file_that_is_not_read_is_refused(setup: Setup, kind: str, name: str) -> None:
    """A pin that would check nothing: README (never read), the pickle (the safetensors file is read),
    the signature without ``signed_by=``, a name spelt otherwise than the file read."""
    weights = sha256(setup.adapter / SAFETENSORS)
    call = make_call(
        kind, setup, setup.adapter, base_missing=True, expected_sha256={SAFETENSORS: weights, name: weights}
    )
    with refused_and_untouched(call) as caught:
        pass
    message = str(caught.value)
    assert f"Pinned digests for files that are not read: [{name!r}]" in message
    assert f"expected names among [{CONFIG!r}, {SAFETENSORS!r}]" in message
    assert caught.value.path == os.fspath(setup.adapter / name)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize(
    ("pinned", "error", "match"),
    [
        ("abc", ValueError, r"expected_sha256='abc' is not a sha256: expected 64 hexadecimal digits"),
        ("SHA", ValueError, "not a sha256"),  # replaced by a whole `sha256sum` line below
        ("g" * 64, ValueError, "not a sha256"),
        ("a" * 40, ValueError, "not a sha256"),  # a git sha1, what the Hub shows for small files
        ({}, ValueError, r"expected_sha256=\{\} pins nothing"),
        ({CONFIG: None}, TypeError, r"expected_sha256\['adapter_config.json'\] must be a sha256"),
        ({1: "a" * 64}, TypeError, "keys must be file names"),
        (b"a" * 64, TypeError, "found bytes"),
        (1234, TypeError, "found int"),
    ],
)
def test_a_malformed_pin_is_refused_before_any_file_is_opened(
    setup: Setup, kind: str, pinned: Any, error: type[Exception], match: str
) -> None:
    if pinned == "SHA":
        pinned = f"{sha256(setup.adapter / SAFETENSORS)}  {setup.adapter / SAFETENSORS}"
    call = make_call(kind, setup, setup.adapter, base_missing=True, expected_sha256=pinned)
    before = snapshot(call.target) if call.target is not None else None
    with Opens(setup.adapter) as opens, pytest.raises(error, match=match):
        call.run()
    assert opens.names == []
    if call.target is not None:
        assert before is not None
        assert_unchanged(call.target, before)


# --- the digest is of the bytes parsed -----------------------------------------------------------------


@pytest.mark.parametrize("kind", LOADERS)
def test_each_file_is_opened_once_per_load(setup: Setup, kind: str) -> None:
    pinned = {CONFIG: sha256(setup.adapter / CONFIG), SAFETENSORS: sha256(setup.adapter / SAFETENSORS)}
    call = make_call(kind, setup, setup.adapter, expected_sha256=pinned)
    with Opens(setup.adapter) as opens:
        call.run()
    assert opens.names == [CONFIG, SAFETENSORS]  # the config first, then the weights: once each


def _swap_config_when_weights_open(adapter: Path, replacement: bytes) -> Callable[[str], None]:
    def swap(name: str) -> None:
        if name == SAFETENSORS:  # the config was read (and parsed) by now
            (adapter / CONFIG).write_bytes(replacement)

    return swap


def _alpha_8(adapter: Path) -> bytes:
    return (adapter / CONFIG).read_bytes().replace(b'"lora_alpha": 4', b'"lora_alpha": 8')


@pytest.mark.parametrize("kind", LOADERS)
def test_a_config_swapped_on_disk_after_it_was_read_changes_nothing(
    setup: Setup, adapter: Path, kind: str
) -> None:
    """The config's pin holds for the bytes read, and those bytes are the config loaded: the file on
    disk is another one (``lora_alpha`` 8) by the time the weights are read, and is never looked at."""
    swapped = _alpha_8(adapter)
    assert swapped != (adapter / CONFIG).read_bytes()
    pinned = {CONFIG: sha256(adapter / CONFIG), SAFETENSORS: sha256(adapter / SAFETENSORS)}
    call = make_call(kind, setup, adapter, expected_sha256=pinned)
    with Opens(adapter, _swap_config_when_weights_open(adapter, swapped)) as opens:
        got = call.run()
    assert (adapter / CONFIG).read_bytes() == swapped  # the swap happened, during the load
    assert opens.names == [CONFIG, SAFETENSORS]
    assert_same(got, make_call(kind, setup, setup.adapter).run())  # alpha 4: the bytes read
    # What the model says it was loaded from: the digests of the bytes read, not of the file now.
    files = got.sha256 if isinstance(got, AdapterReport) else receipt(got)["adapters"][name_of(kind)]["files"]
    assert files == pinned
