"""OpenSSF model signing: check the files safe_lora read against a signed manifest of their digests.

A `model_signing <https://pypi.org/project/model-signing/>`_ signature (``model.sig``, a Sigstore
bundle) holds a DSSE envelope whose payload is a manifest: every signed file of a folder with its
sha256. :func:`verify_signed_digests` checks that the signature is valid for the caller's key,
certificate chain or Sigstore identity, then compares the manifest's digests with the digests of the
bytes safe_lora read and parsed (:class:`~safe_lora._readers.FileBytes`). No adapter file is read
again: model_signing's own ``Config.verify`` re-hashes the folder from disk, which would check bytes
other than the ones that are loaded.

Only the files safe_lora reads must be signed and match: a signed folder may hold more files than
the adapter uses, and the adapter folder may lack files that the manifest lists but safe_lora does
not read.

model-signing is an optional extra (``pip install 'safe-lora[signing]'``): nothing here imports it
until a signature is checked.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Union

from safe_lora._readers import FileBytes, read_bounded
from safe_lora._source import SIGNATURE_NAME  # the adapter's file names live with the source
from safe_lora.errors import AdapterIntegrityError

if TYPE_CHECKING:
    import model_signing.verifying

__all__ = [
    "SIGNATURE_NAME",
    "SignedBy",
    "check_digests",
    "read_signature",
    "signed_digests",
    "verify_signed_digests",
    "verifying_config",
]

#: What ``signed_by=`` accepts: the path of a PEM elliptic-curve public key, or a
#: ``model_signing.verifying.Config`` (a key, a certificate chain or a Sigstore identity).
SignedBy = Union[str, "os.PathLike[str]", "model_signing.verifying.Config"]

#: The largest signature read: a manifest line is ~150 bytes, so this is room for ~100k files.
MAX_SIGNATURE_BYTES = 16 << 20

_INSTALL = "pip install 'safe-lora[signing]'"
_RESIGN = (
    "sign the adapter folder with model_signing's default hashing, e.g. "
    "`model_signing sign key ADAPTER_DIR --private_key KEY.pem --signature ADAPTER_DIR/model.sig`"
)


def _model_signing_verifying() -> Any:
    """``model_signing.verifying``, or an ImportError that says how to install the extra."""
    try:
        return importlib.import_module("model_signing.verifying")
    except ImportError as exc:  # model-signing itself, or a dependency it imports (pyOpenSSL)
        raise ImportError(
            f"Signature checks need the optional model-signing package: importing it failed ({exc}) — "
            f"signed_by= checks OpenSSF model signatures with it — install it: {_INSTALL}"
        ) from exc


def verifying_config(signed_by: SignedBy) -> model_signing.verifying.Config:
    """The ``model_signing.verifying.Config`` that ``signed_by`` means.

    A path is read at once as an elliptic-curve public key in PEM (P-256, P-384 or P-521, the
    curves model_signing signs with), so a wrong ``signed_by=`` fails before anything is downloaded
    or read. A ``Config`` is returned as it is.

    Args:
        signed_by: The public key's path (``str`` or ``os.PathLike``), or a
            ``model_signing.verifying.Config`` with a verifier configured.

    Returns:
        The configuration whose verifier checks the signature.

    Raises:
        ImportError: model-signing is not installed (the message says ``pip install 'safe-lora[signing]'``).
        TypeError: ``signed_by`` is neither a path nor a ``model_signing.verifying.Config``.
        ValueError: The key cannot be read or is not a supported public key; the ``Config`` has no
            verifier configured.

    Example:
        >>> config = verifying_config("keys/signer.pub")  # doctest: +SKIP
        >>> import model_signing  # doctest: +SKIP
        >>> verifying_config(model_signing.verifying.Config().use_sigstore_verifier(  # doctest: +SKIP
        ...     identity="ci@example.com", oidc_issuer="https://accounts.google.com"))
    """
    is_path = isinstance(signed_by, str | os.PathLike) and isinstance(os.fspath(signed_by), str)
    try:
        verifying = _model_signing_verifying()
    except ImportError:
        if is_path:
            raise
        verifying = None  # then signed_by cannot be a model_signing Config either
    if verifying is not None and isinstance(signed_by, verifying.Config):
        if _verifier_of(signed_by) is None:
            raise ValueError(
                "signed_by= is a model_signing.verifying.Config with no verifier — expected one that "
                "says whose signature to accept — call use_elliptic_key_verifier(public_key=...), "
                "use_certificate_verifier(certificate_chain=...) or use_sigstore_verifier(identity=..., "
                "oidc_issuer=...) on it."
            )
        return signed_by
    if not is_path or verifying is None:
        raise TypeError(
            f"signed_by= must be the path of a PEM public key or a model_signing.verifying.Config, "
            f"not {type(signed_by).__name__}."
        )
    key = os.fspath(signed_by)
    try:
        return verifying.Config().use_elliptic_key_verifier(public_key=key)
    except Exception as exc:  # model_signing reads and parses the key: OSError, ValueError, ...
        raise ValueError(
            f"signed_by={key!r} cannot be used as a public key ({_reason(exc)}) — expected a PEM "
            f"elliptic-curve public key (P-256, P-384 or P-521) — pass the public key of the private key "
            f"that signed the adapter; for a certificate or a Sigstore identity pass a "
            f"model_signing.verifying.Config."
        ) from exc


def read_signature(folder: Path, *, where: str) -> FileBytes:
    """Read ``folder/model.sig`` once, bounded, as every other file safe_lora reads.

    Args:
        folder: The folder the signature covers (the adapter folder, or a hub snapshot's folder).
        where: How messages name that folder: a local path, or ``repo_id`` (``repo_id/subfolder``).

    Returns:
        The signature's bytes and their sha256.

    Raises:
        AdapterIntegrityError: The signature is missing, not a regular file, unreadable, or larger
            than 16 MiB (``expected`` and ``actual`` are ``None``: nothing was read).

    Example:
        >>> read_signature(Path("out/adapter"), where="out/adapter")  # doctest: +SKIP
        FileBytes(path=PosixPath('out/adapter/model.sig'), sha256='5b1e...')
    """
    shown = _join(where, SIGNATURE_NAME)

    def error(found: str, hint: str) -> AdapterIntegrityError:
        if found == "is missing":
            hint = f"{_RESIGN}, or drop signed_by="
        return AdapterIntegrityError(
            f"Adapter signature unusable: {shown} {found} — signed_by= expects a model_signing signature "
            f"beside the adapter's files — {hint}.",
            path=shown,
        )

    return read_bounded(folder / SIGNATURE_NAME, max_bytes=MAX_SIGNATURE_BYTES, error=error)


def verify_signed_digests(
    signature: FileBytes, digests: Mapping[str, str], *, signed_by: SignedBy, where: str
) -> None:
    """Raise unless ``signature`` is valid by ``signed_by`` and its manifest holds exactly these digests.

    ``signature`` is the content of ``model.sig``. It must verify with ``signed_by`` (a key, a
    certificate chain or a Sigstore identity, see :func:`verifying_config`), and the manifest it
    carries must list every name of ``digests`` with exactly that sha256. Names the manifest lists
    beyond ``digests`` are not looked at: safe_lora does not read those files, so they need not be
    there. Nothing is read from disk but the public key: the digests are those of the bytes the
    caller read and parsed, so nothing can change between this check and their use.

    What is honoured of a ``model_signing.verifying.Config``: its verifier, exactly as its own
    ``verify`` uses it — the key; the certificate chain (the chain given, or certifi's roots); or the
    Sigstore identity and OIDC issuer, checked with the bundle's transparency-log entry against
    Sigstore's trust root (``use_sigstore_verifier`` fetches that root over the network, unless given
    ``trust_config=``; the check itself reads no adapter file either). Not used: its hashing settings
    (``set_hashing_config``) and ``set_ignore_unsigned_files``; they steer model_signing's own
    re-hashing of a folder, which is what this function replaces by comparing digests already
    computed, so which files must be signed is the rule above. The manifest must therefore be of
    whole-file sha256 digests (model_signing's default); one of sharded or BLAKE2/BLAKE3 hashing is
    refused rather than checked by reading the files a second time. The ``Config`` is not modified.

    Args:
        signature: The bytes of ``model.sig`` as read (:func:`read_signature`).
        digests: ``{name: sha256 hex}`` for every file safe_lora read; names are relative to the
            folder the signature covers, with ``/`` separators (e.g. ``"adapter_config.json"``).
        signed_by: Whose signature to accept (see :data:`SignedBy`).
        where: How messages name the signed folder: a local path, or ``repo_id`` for a hub adapter.

    Raises:
        AdapterIntegrityError: The signature does not parse, does not verify, or uses a hashing
            scheme other than whole-file sha256 (``path`` the signature, ``expected=None``,
            ``actual`` its sha256); or a file read is not in the manifest (``expected=None``) or
            does not match it (``path`` the file, ``expected`` the signed sha256, ``actual`` the
            sha256 of the bytes read). With several files failing, the first in name order is
            ``path`` and the message names them all.
        ImportError: model-signing is not installed.
        TypeError, ValueError: ``signed_by`` is unusable (see :func:`verifying_config`).

    Example:
        >>> config = read_bounded(Path("a/adapter_config.json"), max_bytes=1 << 24, error=e)  # doctest: +SKIP
        >>> verify_signed_digests(
        ...     read_signature(Path("a"), where="a"),
        ...     {"adapter_config.json": config.sha256},
        ...     signed_by="signer.pub",
        ...     where="a",
        ... )  # doctest: +SKIP
    """
    signed = signed_digests(signature, signed_by=signed_by, where=where)
    check_digests(signed, digests, where=where, signature_name=signature.path.name)


def check_digests(
    signed: Mapping[str, str],
    digests: Mapping[str, str],
    *,
    where: str,
    signature_name: str = SIGNATURE_NAME,
) -> None:
    """Raise unless every file of ``digests`` is in the verified manifest ``signed`` with that sha256.

    The second half of :func:`verify_signed_digests`, for a caller that verified the signature first
    (:func:`signed_digests`) and compares each file as it is read, before parsing it.

    Args:
        signed: The manifest, from :func:`signed_digests`.
        digests: ``{name: sha256 hex}`` of files read (names as in :func:`verify_signed_digests`).
        where: How messages name the signed folder.
        signature_name: The signature's file name in that folder, for messages.

    Raises:
        AdapterIntegrityError: As :func:`verify_signed_digests`, for a file not in the manifest or
            not matching it.

    Example:
        >>> check_digests({"a.json": "00" * 32}, {"a.json": "00" * 32}, where="out/adapter")
    """
    problems: list[tuple[str, str | None, str]] = []  # (name, signed sha256 or None, sha256 read)
    for name, actual in sorted((_name(n), d.lower()) for n, d in digests.items()):
        expected = signed.get(name)
        if expected != actual:
            problems.append((name, expected, actual))
    if not problems:
        return
    name, expected, actual = problems[0]
    sig = _join(where, signature_name)
    if expected is None:
        listed = _first(sorted(signed)) or "no file"
        what = (
            f"Adapter file not signed: {_join(where, name)} is not in the manifest of {sig} (it lists "
            f"{listed}) — expected every file safe_lora reads to be signed — sign a folder that "
            f"includes it"
        )
    else:
        what = (
            f"Adapter file does not match its signature: {_join(where, name)} — expected sha256 "
            f"{expected} (signed in {sig}), found {actual} — the file changed after it was signed: "
            f"re-download it, or re-sign the adapter if the change is yours"
        )
    if len(problems) > 1:
        what += "; also failing: " + ", ".join(
            f"{n} ({'not signed' if e is None else 'sha256 differs'})" for n, e, _ in problems[1:]
        )
    raise AdapterIntegrityError(what + ".", path=_join(where, name), expected=expected, actual=actual)


def signed_digests(signature: FileBytes, *, signed_by: SignedBy, where: str) -> dict[str, str]:
    """The ``{name: sha256 hex}`` manifest of a signature that verifies with ``signed_by``.

    The signature is checked (:func:`verify_signed_digests` explains what of ``signed_by`` is used),
    and its manifest must be of whole-file sha256 digests.

    Args:
        signature: The bytes of ``model.sig`` as read.
        signed_by: Whose signature to accept.
        where: How messages name the signed folder.

    Returns:
        Every file the manifest lists, with its signed sha256 (lower-case hex), sorted by name.

    Raises:
        AdapterIntegrityError: The signature does not parse, does not verify, or its manifest is
            not of whole-file sha256 digests.
        ImportError, TypeError, ValueError: As :func:`verifying_config`.

    Example:
        >>> signed_digests(read_signature(Path("a"), where="a"), signed_by="signer.pub", where="a")
        ... # doctest: +SKIP
        {'adapter_config.json': '44136f...', 'adapter_model.safetensors': 'fc11d6...'}
    """
    config = verifying_config(signed_by)
    sig = _join(where, signature.path.name)

    def refuse(found: str, hint: str) -> AdapterIntegrityError:
        return AdapterIntegrityError(f"{found} — {hint}.", path=sig, actual=signature.sha256)

    manifest = _verified_manifest(config, signature.data, sig, refuse)
    scheme = manifest.serialization
    if scheme.get("method") != "files" or scheme.get("hash_type") != "sha256":
        raise refuse(
            f"Adapter signature unsupported: {sig} is signed over {_describe(scheme)} — expected "
            f"whole-file sha256 digests (model_signing's default), which safe_lora compares with the "
            f"digests of the bytes it read without reading the files again",
            "re-sign the adapter with model_signing.hashing.Config().use_file_serialization("
            "hashing_algorithm='sha256')",
        )
    odd = sorted(name for name, (algorithm, _) in manifest.items.items() if algorithm != "sha256")
    if odd:
        raise refuse(
            f"Adapter signature unsupported: {sig} lists {', '.join(odd)} with a digest other than "
            f"sha256 — expected whole-file sha256 digests",
            "re-sign the adapter with model_signing's default hashing",
        )
    return {name: digest for name, (_, digest) in sorted(manifest.items.items())}


@dataclass(frozen=True)
class _Manifest:
    """What safe_lora uses of a verified model_signing manifest.

    Attributes:
        items: ``{name: (digest algorithm, digest hex)}``, names normalised as POSIX paths.
        serialization: How the manifest was hashed, e.g. ``{"method": "files", "hash_type": "sha256"}``.
    """

    items: dict[str, tuple[str, str]]
    serialization: dict[str, Any]


class _SignatureText:
    """The signature's bytes where model_signing's ``Signature.read`` expects a path to read them from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._data.decode(encoding, errors)

    def read_bytes(self) -> bytes:
        return self._data


def _verified_manifest(
    config: model_signing.verifying.Config,
    data: bytes,
    sig: str,
    refuse: Callable[[str, str], AdapterIntegrityError],
) -> _Manifest:
    """Verify a signature's bytes with ``config``'s verifier and return the manifest it signs.

    PRIVATE model_signing API (1.1.x) — the only place safe_lora uses it. model_signing's public
    ``Config.verify(model_path, signature_path)`` verifies the signature *and* re-hashes the folder
    from disk; nothing public returns the verified manifest alone. This does the first half of
    ``Config.verify`` exactly as it does (same bundle classes, same verifier), and stops there:

    - ``config._uses_sigstore`` picks the bundle format, as ``Config.verify`` does:
      ``sign_sigstore.Signature`` (sigstore-python's bundle, for Sigstore identities) or
      ``sign_sigstore_pb.Signature`` (keys and certificates). Their ``read(path)`` only calls
      ``path.read_text(encoding="utf-8")``; it is handed the bytes already read instead of a path.
    - ``config._verifier.verify(signature)`` checks the signature (key, certificate chain, or
      Sigstore identity with its transparency log), the DSSE payload and in-toto statement types,
      and that the manifest's resources hash to the signed subject digest; it returns the
      ``model_signing.manifest.Manifest``, whose public ``resource_descriptors()`` and
      ``serialization_type`` are read here.

    The extra pins ``model-signing>=1.1.1,<1.2``; a release that renames these fails here with a
    message saying so, never by skipping the check.
    """
    try:
        from model_signing._signing import sign_sigstore, sign_sigstore_pb

        verifier = config._verifier
        bundle_class = sign_sigstore.Signature if config._uses_sigstore else sign_sigstore_pb.Signature
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"Unsupported model-signing release: {_reason(exc)} — safe_lora's signature check uses "
            f"model-signing 1.1's verifier internals — install a supported release: {_INSTALL}"
        ) from exc
    try:
        bundle = bundle_class.read(_SignatureText(data))
    except Exception as exc:  # JSON, UTF-8, bundle schema: anything that is not a signature
        raise refuse(
            f"Adapter signature unusable: {sig} is not a model_signing signature ({_reason(exc)}) — "
            f"expected a Sigstore bundle written by model_signing",
            _RESIGN,
        ) from exc
    try:
        manifest = verifier.verify(bundle)
    except Exception as exc:  # InvalidSignature, ValueError, a bundle of the other kind, ...
        raise refuse(
            f"Adapter signature does not verify: {sig} is not a valid signature by {_signer(config)} "
            f"({_reason(exc)}) — expected one made by that signer over the adapter's files",
            "check signed_by= (the signer's public key, certificate chain or identity), or re-sign "
            "the adapter",
        ) from exc
    items = {
        _name(str(rd.identifier)): (str(rd.digest.algorithm), str(rd.digest.digest_hex).lower())
        for rd in manifest.resource_descriptors()
    }
    return _Manifest(items=items, serialization=dict(manifest.serialization_type))


def _verifier_of(config: Any) -> Any:
    return getattr(config, "_verifier", None)


def _signer(config: Any) -> str:
    """Who ``config`` accepts, for messages (model_signing keeps it in private attributes)."""
    verifier = _verifier_of(config)
    kind = type(verifier).__module__.rsplit(".", 1)[-1]
    return {
        "sign_ec_key": "the public key given",
        "sign_certificate": "a certificate of the chain given",
        "sign_sigstore": "the Sigstore identity given",
    }.get(kind, "the signer given")


def _describe(scheme: Mapping[str, Any]) -> str:
    method, size = scheme.get("method"), scheme.get("shard_size")
    if isinstance(size, float) and size.is_integer():  # numbers come back from the JSON payload as floats
        size = int(size)
    shown = {"files": "whole files", "shards": f"file shards of {size} bytes"}
    return f"{shown.get(str(method), repr(method))} hashed with {scheme.get('hash_type')!r}"


def _first(names: list[str], limit: int = 10) -> str:
    """``a, b, c`` — at most ``limit`` names, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _name(name: str) -> str:
    """A manifest name as model_signing normalises it (``./a`` and ``a`` are one file)."""
    return str(PurePosixPath(name))


def _join(where: str, name: str) -> str:
    return f"{where}{'' if where.endswith(('/', os.sep)) else '/'}{name}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
