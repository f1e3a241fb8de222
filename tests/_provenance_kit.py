"""Shared by the provenance tests: opens seen by an audit hook, and one call per entry point.

:class:`Opens` watches the interpreter's ``open`` audit events (:func:`sys.addaudithook`) for the files
of one folder -- how the tests show that each file is read once, and swap a file on disk once it was
read. :func:`make_call` runs one entry point (``load_for_inference``, ``load_for_training``,
``load_adapter``, ``replace=True``, ``inspect_adapter``, ``auto.for_inference``) on an adapter with the
same keyword arguments, so every provenance check is shown through all of them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import assert_unchanged, save_adapter, snapshot, tiny_llama
from peft import LoraConfig
from torch import nn
from transformers import LlamaForCausalLM

from safe_lora import (
    AdapterIntegrityError,
    AdapterReport,
    inspect_adapter,
    load_adapter,
    load_for_inference,
    load_for_training,
)
from safe_lora import auto as safe_auto

LOADERS = ["load_for_inference", "load_for_training", "load_adapter", "replace", "inspect_adapter", "auto"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- opens, seen from the interpreter's audit hook --------------------------------------------------------


class Opens:
    """While entered: every ``open`` of a file under ``folder`` (by name), and an optional action.

    ``on_open(name)`` runs when the interpreter is about to open ``folder/name`` -- before the open, so
    it can change *other* files of the folder, e.g. one that was already read.
    """

    _watching: ClassVar[list[Opens]] = []
    _busy = threading.local()

    def __init__(self, folder: Path, on_open: Callable[[str], None] | None = None) -> None:
        self.folder = os.fspath(folder.resolve()) + os.sep
        self.on_open = on_open
        self.names: list[str] = []
        self.failure: BaseException | None = None

    def __enter__(self) -> Opens:
        Opens._watching.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        Opens._watching.remove(self)
        if self.failure is not None:
            raise self.failure

    def count(self, name: str) -> int:
        return self.names.count(name)

    @staticmethod
    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or not Opens._watching or getattr(Opens._busy, "on", False):
            return
        target = args[0] if args else None
        if not isinstance(target, (str, bytes, os.PathLike)):
            return  # an open by file descriptor
        Opens._busy.on = True  # the action's own opens are not watched
        try:
            path = os.path.realpath(os.fsdecode(target))
            for watcher in list(Opens._watching):
                if path.startswith(watcher.folder):
                    name = path[len(watcher.folder) :]
                    watcher.names.append(name)
                    if watcher.on_open is not None:
                        try:
                            watcher.on_open(name)
                        except BaseException as exc:  # raised at __exit__, not inside someone's open()
                            watcher.failure = exc
        finally:
            Opens._busy.on = False


sys.addaudithook(Opens.hook)  # for the life of the process; it does nothing unless a test watches


# --- adapters --------------------------------------------------------------------------------------------


def lora() -> LoraConfig:
    return LoraConfig(
        target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4, lora_dropout=0.1, task_type="CAUSAL_LM"
    )


@dataclass(frozen=True)
class Setup:
    base: Path  # a saved tiny Llama: the base the adapters' configs name (auto loads it)
    adapter: Path  # the adapter pinned
    other: Path  # another adapter of the same config: loaded first for load_adapter and replace=True


# --- one call per entry point ----------------------------------------------------------------------------


@dataclass
class Call:
    """One entry point, ready to run: ``target`` is the caller's model it may change (``None``: none)."""

    target: nn.Module | None
    run: Callable[[], Any]


def make_call(kind: str, setup: Setup, adapter: Path, *, base_missing: bool = False, **kwargs: Any) -> Call:
    """``kind`` called on ``adapter`` with ``kwargs`` (the pins).

    For ``auto``, ``base_missing`` names a base that does not exist: a refusal that came after the
    base was loaded would be transformers' OSError instead.
    """
    if kind in ("load_for_inference", "load_for_training"):
        base = tiny_llama()
        load = load_for_inference if kind == "load_for_inference" else load_for_training
        return Call(base, lambda: load(base, adapter, **kwargs))
    if kind in ("load_adapter", "replace"):
        model = load_for_inference(tiny_llama(), setup.other)
        name = "default" if kind == "replace" else "pinned"
        return Call(
            model,
            lambda: load_adapter(model, adapter, adapter_name=name, replace=kind == "replace", **kwargs),
        )
    if kind == "inspect_adapter":
        return Call(None, lambda: verdict(inspect_adapter(adapter, **kwargs)))
    assert kind == "auto"
    base = setup.base.parent / "no-such-base" if base_missing else setup.base
    return Call(None, lambda: safe_auto.for_inference(adapter, base_model=base, **kwargs))


def verdict(report: AdapterReport) -> AdapterReport:
    """The report, or the error of its first error finding raised (a loader's verdict)."""
    if report.errors:
        assert report.errors[0].code in ("integrity", "signature"), report.errors
        error = report.errors[0].error
        assert error is not None
        raise error
    return report


def tensors(result: Any) -> dict[str, Any]:
    """What to compare two results by: every tensor of a model, or a report's fields."""
    if isinstance(result, AdapterReport):
        return {k: v for k, v in result.to_dict().items() if k not in ("path", "source", "sha256")}
    return {name: t.detach().clone() for name, t in result.state_dict().items()}


def assert_same(got: Any, reference: Any) -> None:
    a, b = tensors(got), tensors(reference)
    assert a.keys() == b.keys()
    for key, value in a.items():
        same = torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key]
        assert same, key


@contextmanager
def refused_and_untouched(call: Call) -> Iterator[pytest.ExceptionInfo[AdapterIntegrityError]]:
    before = snapshot(call.target) if call.target is not None else None
    with pytest.raises(AdapterIntegrityError) as caught:
        call.run()
    if call.target is not None:
        assert before is not None
        assert_unchanged(call.target, before)
    yield caught


def make_setup(root: Path) -> Setup:
    """A saved tiny Llama, and two adapters of one config whose configs name it."""
    tiny_llama().save_pretrained(root / "base")
    named = LlamaForCausalLM.from_pretrained(root / "base")  # so the configs name the base folder
    return Setup(
        base=root / "base",
        adapter=save_adapter(named, lora(), root / "adapter", train_steps=1, seed=1),
        other=save_adapter(named, lora(), root / "other", train_steps=1, seed=2),
    )


def name_of(kind: str) -> str:
    """The name the adapter gets in the model (``load_adapter`` adds it under another)."""
    return "pinned" if kind == "load_adapter" else "default"


# --- signing (model-signing, the optional extra: imported only here) --------------------------------------

SIG = "model.sig"


def write_key_pair(folder: Path, name: str, key: Any = None) -> tuple[Path, Path]:
    """``key`` (default: a new P-256 private key) and its public key, as PEM files ``name.pem`` /
    ``name.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def sign(folder: Path, private_key: Path) -> None:
    """Sign ``folder`` into ``folder/model.sig`` as model_signing's CLI does (all files but the signature)."""
    import model_signing.hashing
    import model_signing.signing

    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[SIG])
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(hashing).sign(folder, folder / SIG)
