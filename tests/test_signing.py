"""OpenSSF model signatures checked over the digests of the bytes safe_lora read (``safe_lora._signing``).

Real adapters written by PEFT, signed offline by model_signing's own signing API with keys and
certificates made here. Sigstore identities need the network (Fulcio, Rekor, the TUF trust root)
and are documented, not tested.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "model_signing.signing",
    reason="model-signing is not installed: the signature checks are the optional extra "
    "(pip install -e '.[signing]' or '.[test]')",
)

import model_signing.hashing
import model_signing.signing
import model_signing.verifying
from _provenance_kit import write_key_pair
from conftest import CONFIG, SAFETENSORS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from safe_lora._readers import FileBytes, read_bounded, sha256_hex
from safe_lora._signing import (
    SIGNATURE_NAME,
    read_signature,
    signed_digests,
    verify_signed_digests,
    verifying_config,
)
from safe_lora.errors import AdapterIntegrityError

pytestmark = pytest.mark.signing

READ = (CONFIG, SAFETENSORS)  # the files a safetensors load reads


# --- keys, certificates, signing ------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``{name: (private PEM, public PEM)}``: the signer's P-256 key, another P-384 key, an RSA key."""
    folder = tmp_path_factory.mktemp("keys")
    return {
        "signer": write_key_pair(folder, "signer", ec.generate_private_key(ec.SECP256R1())),
        "other": write_key_pair(folder, "other", ec.generate_private_key(ec.SECP384R1())),
        "rsa": write_key_pair(folder, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }


def _certificate(subject: str, key: Any, issuer: tuple[str, Any] | None, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A root CA, a leaf certificate it issued (with its key), and an unrelated root CA."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, leaf_key, stranger_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    files = {
        "ca": _certificate("safe-lora test CA", ca_key, None, ca=True),
        "leaf": _certificate("safe-lora signer", leaf_key, ("safe-lora test CA", ca_key), ca=False),
        "stranger": _certificate("another CA", stranger_key, None, ca=True),
    }
    paths = {}
    for name, cert in files.items():
        paths[name] = folder / f"{name}.crt"
        paths[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["leaf_key"], _ = write_key_pair(folder, "leaf", leaf_key)
    return paths


def _hashing(**serialization_args: Any) -> Any:
    """model_signing's default hashing, minus the signature file itself (as its CLI signs)."""
    config = model_signing.hashing.Config()
    if serialization_args:
        method = serialization_args.pop("method", "files")
        if method == "shards":
            config.use_shard_serialization(**serialization_args)
        else:
            config.use_file_serialization(**serialization_args)
    return config.set_ignored_paths(paths=[SIGNATURE_NAME])


def sign(folder: Path, private_key: Path, *, hashing: Any = None, ignore: tuple[str, ...] = ()) -> Path:
    """Sign ``folder`` into ``folder/model.sig`` with model_signing's public signing API."""
    hashing = hashing or _hashing()
    if ignore:
        hashing.set_ignored_paths(paths=[SIGNATURE_NAME, *ignore])
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(hashing).sign(folder, folder / SIGNATURE_NAME)
    return folder / SIGNATURE_NAME


def sign_with_certificate(folder: Path, pki: dict[str, Path]) -> None:
    model_signing.signing.Config().use_certificate_signer(
        private_key=pki["leaf_key"], signing_certificate=pki["leaf"], certificate_chain=[pki["ca"]]
    ).set_hashing_config(_hashing()).sign(folder, folder / SIGNATURE_NAME)


# --- what a loader does: read each file once, then check the digests of those bytes --------------


def read(folder: Path, names: tuple[str, ...] = READ) -> dict[str, FileBytes]:
    def error(found: str, hint: str) -> Exception:
        return ValueError(f"{found}: {hint}")

    return {name: read_bounded(folder / name, max_bytes=1 << 26, error=error) for name in names}


def check(folder: Path, signed_by: Any, names: tuple[str, ...] = READ) -> None:
    files = read(folder, names)
    signature = read_signature(folder, where=str(folder))
    verify_signed_digests(
        signature, {n: f.sha256 for n, f in files.items()}, signed_by=signed_by, where=str(folder)
    )


@pytest.fixture
def signed(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]) -> Path:
    """A real PEFT adapter folder, signed by the signer's key."""
    sign(mlp_adapter, keys["signer"][0])
    return mlp_adapter


def digest_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- it passes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["str", "Path", "Config"])
def test_signed_adapter_passes_with_the_public_key(
    signed: Path, keys: dict[str, tuple[Path, Path]], form: str
) -> None:
    public = keys["signer"][1]
    signed_by: Any = {
        "str": str(public),
        "Path": public,
        "Config": model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public),
    }[form]
    check(signed, signed_by)


def test_signed_digests_is_the_manifest(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    manifest = signed_digests(read_signature(signed, where="a"), signed_by=keys["signer"][1], where="a")
    on_disk = sorted(set(os.listdir(signed)) - {SIGNATURE_NAME})  # save_pretrained writes a README too
    assert manifest == {name: digest_of(signed / name) for name in on_disk}
    assert list(manifest) == sorted(manifest)


def test_certificate_config_passes_and_an_unrelated_root_fails(
    mlp_adapter: Path, pki: dict[str, Path]
) -> None:
    sign_with_certificate(mlp_adapter, pki)
    check(
        mlp_adapter, model_signing.verifying.Config().use_certificate_verifier(certificate_chain=[pki["ca"]])
    )
    stranger = model_signing.verifying.Config().use_certificate_verifier(certificate_chain=[pki["stranger"]])
    with pytest.raises(AdapterIntegrityError, match="does not verify") as info:
        check(mlp_adapter, stranger)
    assert "a certificate of the chain given" in str(info.value)


def test_extra_unread_file_in_the_folder_passes(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    (signed / "README.md").write_text("added after signing, never read")
    (signed / "adapter_model.bin").write_bytes(b"not read either")
    check(signed, keys["signer"][1])


def test_extra_signed_file_missing_from_the_folder_passes(
    mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    (mlp_adapter / "README.md").write_text("signed, then not shipped")
    (mlp_adapter / "optimizer.pt").write_bytes(b"\x00" * 64)
    sign(mlp_adapter, keys["signer"][0])
    (mlp_adapter / "README.md").unlink()
    check(mlp_adapter, keys["signer"][1])
    manifest = signed_digests(read_signature(mlp_adapter, where="a"), signed_by=keys["signer"][1], where="a")
    assert sorted(manifest) == sorted([*READ, "README.md", "optimizer.pt"])


def test_a_file_in_a_signed_subfolder_is_named_by_its_relative_path(
    tmp_path: Path, mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    for name in READ:
        (repo / "sub" / name).write_bytes((mlp_adapter / name).read_bytes())
    sign(repo, keys["signer"][0])
    files = read(repo / "sub")
    digests = {f"sub/{n}": f.sha256 for n, f in files.items()}
    verify_signed_digests(
        read_signature(repo, where="org/repo"), digests, signed_by=keys["signer"][1], where="org/repo"
    )
    with pytest.raises(AdapterIntegrityError, match="not in the manifest") as info:
        verify_signed_digests(
            read_signature(repo, where="org/repo"),
            {n: f.sha256 for n, f in files.items()},
            signed_by=keys["signer"][1],
            where="org/repo",
        )
    assert info.value.path == f"org/repo/{CONFIG}"


# --- no re-hashing: the digests checked are those of the bytes read -------------------------------


def test_files_are_not_read_again(
    signed: Path, keys: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = read(signed)
    signature = read_signature(signed, where="a")
    for name in READ:  # what is on disk now cannot matter: it is never looked at again
        (signed / name).write_bytes(b"swapped after the read")

    def no_hashing(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("model_signing hashed the folder")

    monkeypatch.setattr(model_signing.hashing.Config, "hash", no_hashing)
    verify_signed_digests(
        signature, {n: f.sha256 for n, f in files.items()}, signed_by=keys["signer"][1], where="a"
    )


def test_bytes_read_that_differ_from_the_signed_file_on_disk_fail(
    signed: Path, keys: dict[str, tuple[Path, Path]]
) -> None:
    # The file on disk is the signed one; the bytes read (and parsed) were not. That is what fails.
    original = (signed / CONFIG).read_bytes()
    (signed / CONFIG).write_bytes(original.replace(b'"r": 4', b'"r": 8'))
    files = read(signed)
    (signed / CONFIG).write_bytes(original)
    with pytest.raises(AdapterIntegrityError) as info:
        verify_signed_digests(
            read_signature(signed, where="a"),
            {n: f.sha256 for n, f in files.items()},
            signed_by=keys["signer"][1],
            where="a",
        )
    assert info.value.actual == files[CONFIG].sha256
    assert info.value.expected == sha256_hex(original)


# --- it fails -------------------------------------------------------------------------------------


def test_missing_signature(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(AdapterIntegrityError, match=r"model\.sig is missing") as info:
        check(mlp_adapter, keys["signer"][1])
    assert info.value.path == f"{mlp_adapter}/{SIGNATURE_NAME}"
    assert (info.value.expected, info.value.actual) == (None, None)
    assert "model_signing sign key" in str(info.value)


def test_signature_that_is_a_directory(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    (mlp_adapter / SIGNATURE_NAME).mkdir()
    with pytest.raises(AdapterIntegrityError, match="is a directory"):
        check(mlp_adapter, keys["signer"][1])


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00binary",
        b"{}",
        b"[1, 2]",
        json.dumps({"mediaType": "x", "verificationMaterial": {}}).encode(),
    ],
    ids=["empty", "text", "binary", "empty-object", "list", "wrong-bundle"],
)
def test_garbage_signature(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]], garbage: bytes) -> None:
    (mlp_adapter / SIGNATURE_NAME).write_bytes(garbage)
    with pytest.raises(AdapterIntegrityError, match="Adapter signature") as info:
        check(mlp_adapter, keys["signer"][1])
    assert info.value.path == f"{mlp_adapter}/{SIGNATURE_NAME}"
    assert info.value.expected is None
    assert info.value.actual == sha256_hex(garbage)


def test_tampered_config(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    signed_digest = digest_of(signed / CONFIG)
    text = (signed / CONFIG).read_text()
    (signed / CONFIG).write_text(text.replace('"lora_alpha": 8', '"lora_alpha": 800'))
    with pytest.raises(AdapterIntegrityError) as info:
        check(signed, keys["signer"][1])
    err = info.value
    assert err.path == f"{signed}/{CONFIG}"
    assert err.expected == signed_digest
    assert err.actual == digest_of(signed / CONFIG) != signed_digest
    message = str(err)
    assert f"expected sha256 {signed_digest}" in message
    assert f"found {err.actual}" in message
    assert CONFIG in message
    assert "re-download" in message
    assert "also failing" not in message


def test_tampered_weights(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    data = bytearray((signed / SAFETENSORS).read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value
    (signed / SAFETENSORS).write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError, match="does not match its signature") as info:
        check(signed, keys["signer"][1])
    assert info.value.path == f"{signed}/{SAFETENSORS}"
    assert info.value.actual == sha256_hex(bytes(data))


def test_every_failing_file_is_named_in_order(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    for name in READ:
        with (signed / name).open("ab") as f:
            f.write(b" ")
    with pytest.raises(AdapterIntegrityError) as info:
        check(signed, keys["signer"][1])
    assert info.value.path == f"{signed}/{CONFIG}"  # the first in name order
    assert f"also failing: {SAFETENSORS} (sha256 differs)" in str(info.value)


def test_signature_by_another_key(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    sign(mlp_adapter, keys["other"][0])
    with pytest.raises(AdapterIntegrityError, match="does not verify") as info:
        check(mlp_adapter, keys["signer"][1])
    assert info.value.path == f"{mlp_adapter}/{SIGNATURE_NAME}"
    assert info.value.expected is None
    assert info.value.actual == digest_of(mlp_adapter / SIGNATURE_NAME)
    assert "the public key given" in str(info.value)


def test_manifest_without_a_file_that_is_read(mlp_adapter: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    sign(mlp_adapter, keys["signer"][0], ignore=(SAFETENSORS,))
    with pytest.raises(AdapterIntegrityError, match="not in the manifest") as info:
        check(mlp_adapter, keys["signer"][1])
    err = info.value
    assert err.path == f"{mlp_adapter}/{SAFETENSORS}"
    assert err.expected is None
    assert err.actual == digest_of(mlp_adapter / SAFETENSORS)
    assert f"(it lists README.md, {CONFIG})" in str(err)  # sorted: capitals first


def test_manifest_changed_under_the_signature(signed: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    # Swap the config's signed digest for the tampered file's: the payload no longer verifies.
    (signed / CONFIG).write_text((signed / CONFIG).read_text() + " ")
    bundle = json.loads((signed / SIGNATURE_NAME).read_text())
    payload = base64.b64decode(bundle["dsseEnvelope"]["payload"]).decode()
    statement = json.loads(payload)
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == CONFIG:
            resource["digest"] = digest_of(signed / CONFIG)
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (signed / SIGNATURE_NAME).write_text(json.dumps(bundle))
    with pytest.raises(AdapterIntegrityError, match="does not verify"):
        check(signed, keys["signer"][1])


@pytest.mark.parametrize(
    ("hashing", "found"),
    [
        ({"method": "shards", "shard_size": 64}, "file shards of 64 bytes hashed with 'sha256'"),
        ({"hashing_algorithm": "blake2"}, "whole files hashed with 'blake2b'"),
        ({"hashing_algorithm": "blake3"}, "whole files hashed with 'blake3'"),
    ],
    ids=["sharded", "blake2", "blake3"],
)
def test_other_hashing_schemes_are_refused(
    mlp_adapter: Path, keys: dict[str, tuple[Path, Path]], hashing: dict[str, Any], found: str
) -> None:
    sign(mlp_adapter, keys["signer"][0], hashing=_hashing(**hashing))
    with pytest.raises(AdapterIntegrityError, match="Adapter signature unsupported") as info:
        check(mlp_adapter, keys["signer"][1])
    assert found in str(info.value)
    assert "use_file_serialization" in str(info.value)
    assert info.value.path == f"{mlp_adapter}/{SIGNATURE_NAME}"


# --- signed_by itself -----------------------------------------------------------------------------


def test_config_without_a_verifier() -> None:
    with pytest.raises(ValueError, match="no verifier"):
        verifying_config(model_signing.verifying.Config())


@pytest.mark.parametrize("bad", [42, b"key.pub", None])
def test_signed_by_of_the_wrong_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="signed_by= must be"):
        verifying_config(bad)


def test_unusable_public_keys(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    (tmp_path / "garbage.pub").write_text("not a key")
    for key in (tmp_path / "missing.pub", tmp_path / "garbage.pub", keys["rsa"][1]):
        with pytest.raises(ValueError, match="cannot be used as a public key") as info:
            verifying_config(key)
        assert not isinstance(info.value, AdapterIntegrityError)
        assert str(key) in str(info.value)


# --- the optional extra ---------------------------------------------------------------------------


def test_without_the_extra_the_error_says_how_to_install(
    signed: Path, keys: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    signature = read_signature(signed, where="a")
    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None: "import model_signing" raises ImportError
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(ImportError, match=r"pip install 'safe-lora\[signing\]'"):
        verify_signed_digests(signature, {}, signed_by=keys["signer"][1], where="a")
    with pytest.raises(TypeError, match="signed_by= must be"):  # a wrong type is still a TypeError
        verifying_config(42)


@pytest.mark.slow  # a fresh interpreter importing torch and PEFT
def test_importing_safe_lora_does_not_import_model_signing() -> None:
    code = (
        "import sys, safe_lora, safe_lora._signing, safe_lora.auto\n"
        "roots = ('model_signing', 'sigstore', 'OpenSSL')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in roots)\n"
        "print(loaded)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
