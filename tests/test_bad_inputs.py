"""Bad inputs: every broken or hostile adapter folder ends in a typed error with the model exactly as it
was, or in a clean load whose outputs are finite and repeatable.

Nothing may block (a FIFO), read without bound (``/dev/zero``), or escape as an untyped exception,
and ``inspect_adapter`` / ``safe-lora inspect`` never crash on any of it. Three parts:

* a table of hand-written cases (special files, absurd headers, dtypes, config content, pickles);
* a ``hypothesis`` campaign of byte-level and structural mutations of real PEFT files (derandomised,
  so CI runs the same examples every time);
* every tuner's real files: no false alarm from the new checks, and the no-op rule proven sound
  (when it says "changes nothing", the outputs equal the base model's bit for bit).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import signal
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from _tuners import TUNERS, Base, Tuner, make_base, output, tuner_params
from conftest import A_KEY, B_KEY, CONFIG, PICKLE, SAFETENSORS, assert_unchanged, save_adapter, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file, save_file

from safe_lora import (
    AdapterConfigError,
    AdapterNotFoundError,
    AdapterWeightsError,
    NoOpAdapterWarning,
    SafeLoraError,
    UnknownConfigFieldWarning,
    UnsafeAdapterError,
    cli,
    deterministic_lora,
    inspect_adapter,
    load_adapter,
    load_for_inference,
    load_for_training,
)
from safe_lora._checks import noop_adapter, wrong_dtypes
from safe_lora._config import CONFIG_MAX_BYTES, parse_config, read_config, read_config_json
from safe_lora._peft import NOOP_RULES
from safe_lora._readers import Weights


def iter_tensors(path: Path) -> Any:
    """The file's tensors, as safetensors reads them."""
    return load_file(path).items()


def read_header(path: Path) -> Any:
    """What the file says of each tensor, in safe_lora's spelling."""
    return Weights.of(load_file(path)).header


pytestmark = [
    # PEFT's and torch's own notes while saving and loading the adapters below.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

# The two bases: the MLP in the quick tier, the tiny Llama (more modules, larger files) in the slow one.
KINDS = ["mlp", pytest.param("llama", marks=pytest.mark.slow)]

# Every dtype name safetensors knows, and some it does not.
ST_DTYPES = [
    "BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64", "C64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "Q99", "", "f32",
]  # fmt: skip
LOADERS: dict[str, Callable[..., Any]] = {"inference": load_for_inference, "training": load_for_training}


# --------------------------------------------------------------------------------------------------
# The pristine files every case starts from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pristine:
    """A real adapter's two files, as bytes, and the base model kind they belong to."""

    kind: Base
    config: bytes
    weights: bytes

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG).write_bytes(self.config)
        (folder / SAFETENSORS).write_bytes(self.weights)
        return folder

    @property
    def header_end(self) -> int:
        return 8 + int(struct.unpack("<Q", self.weights[:8])[0])

    def header(self) -> dict[str, Any]:
        return json.loads(self.weights[8 : self.header_end])  # type: ignore[no-any-return]

    def raw_config(self) -> dict[str, Any]:
        return json.loads(self.config)  # type: ignore[no-any-return]


def _pristine(root: Path, kind: Base, config: PeftConfig) -> Pristine:
    folder = save_adapter(make_base(kind), config, root / "a", train_steps=1)  # trained: not a no-op
    return Pristine(kind, (folder / CONFIG).read_bytes(), (folder / SAFETENSORS).read_bytes())


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    config = LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8, lora_dropout=0.0)
    return _pristine(tmp_path_factory.mktemp("mlp"), "mlp", config)


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, task_type="CAUSAL_LM")
    return _pristine(tmp_path_factory.mktemp("llama"), "llama", config)


def write_safetensors(
    header: dict[str, Any], data: bytes, *, length: int | None = None, text: str | None = None
) -> bytes:
    """A safetensors file: the header (or raw ``text``), then ``data``; ``length`` overrides the length."""
    raw = (json.dumps(header) if text is None else text).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


# --------------------------------------------------------------------------------------------------
# The contract every case is held to
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def no_hang(seconds: float = 30.0) -> Iterator[None]:
    """Fail instead of hanging: a read that blocks (on a FIFO, say) is interrupted by SIGALRM."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _largest_number(folder: Path) -> float:
    """The largest magnitude among the adapter's own numbers (weights and config), NaN-free by then."""
    largest = 0.0
    for _, tensor in iter_tensors(folder / SAFETENSORS):
        if tensor.is_floating_point() and tensor.numel():
            largest = max(largest, float(tensor.abs().max()))
    stack: list[Any] = [json.loads((folder / CONFIG).read_text())]
    while stack:
        value = stack.pop()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            largest = max(largest, abs(float(value)))
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return largest


def assert_clean_load(model: torch.nn.Module, kind: Base, folder: Path) -> None:
    """Two forwards give the same finite outputs (dropout off, as for validation)."""
    with deterministic_lora(model):
        first = output(model, kind)
        second = output(model, kind)
    assert torch.equal(first, second) or torch.allclose(first, second, rtol=0, atol=0, equal_nan=True)
    if not bool(torch.isfinite(first).all()):
        # Finite on disk but so large that float32 arithmetic overflows (a flipped exponent bit turns
        # 0.1 into ~1e37): the file's own numbers, faithfully loaded; nothing a loader may refuse.
        assert _largest_number(folder) > 1e30, "non-finite outputs from an adapter with sane numbers"


@dataclass
class Verdict:
    """What inspect and the two loaders made of a folder."""

    errors: dict[str, SafeLoraError | None] = field(default_factory=dict)  # loader -> error, None: loaded
    warnings: dict[str, list[type[Warning]]] = field(default_factory=dict)
    inspect_codes: list[str] | None = None  # None: inspect raised AdapterNotFoundError
    inspect_ok: bool | None = None


# A refusal is read in a terminal: at most a screen (80 columns x 25 lines), not counting the paths
# it names (a temporary folder's path is long; a user's is what it is).
SCREEN = 80 * 25


def assert_fits_a_screen(exc: BaseException, folder: Path) -> None:
    text = str(exc).replace(str(folder.resolve()), "F").replace(str(folder), "F")
    assert len(text) <= SCREEN, f"a {len(text)}-character message: {text[:300]}..."


def run_everywhere(folder: Path, kind: Base, **kwargs: Any) -> Verdict:
    """Run ``folder`` through inspect and both loaders, holding each to the contract.

    inspect may only raise ``AdapterNotFoundError``; its report must serialise as strict JSON. A loader
    either raises a ``SafeLoraError`` and leaves the model bit-identical (values, module tree,
    ``training`` flags, ``requires_grad``), or loads cleanly. Any other exception fails the test.

    One truth per check: ``inspect_adapter(folder, base_model=model)`` must say ``loads_safely``
    exactly when ``load_for_inference(model, folder)`` accepts the folder, and leave the model as it was.
    """
    verdict = Verdict()
    with no_hang():
        try:
            report = inspect_adapter(folder, allow_pickle=kwargs.get("allow_pickle", False))
        except AdapterNotFoundError:
            pass
        else:
            json.dumps(report.to_dict(), allow_nan=False)
            verdict.inspect_codes = [f.code for f in report.findings]
            verdict.inspect_ok = report.loads_safely
        with_base: bool | None = None
        base = make_base(kind)
        before_inspect = snapshot(base)
        with contextlib.suppress(AdapterNotFoundError):
            with_base = inspect_adapter(folder, base_model=base, **kwargs).loads_safely
        assert_unchanged(base, before_inspect)
        for name, loader in LOADERS.items():
            model = make_base(kind)
            before = snapshot(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    loaded = loader(model, folder, **kwargs)
                except SafeLoraError as exc:
                    assert_unchanged(model, before)
                    assert_fits_a_screen(exc, folder)
                    verdict.errors[name] = exc
                    loaded = None
            verdict.warnings[name] = [w.category for w in caught]
            if loaded is not None:
                assert_clean_load(loaded, kind, folder)
                verdict.errors[name] = None
    if with_base is not None:
        loaded_fine = verdict.errors["inference"] is None
        assert with_base is loaded_fine, (
            f"inspect_adapter(base_model=...) says loads_safely={with_base}, the loader "
            f"{'accepted it' if loaded_fine else 'refused it: ' + str(verdict.errors['inference'])}"
        )
    return verdict


# --------------------------------------------------------------------------------------------------
# Hand-written cases
# --------------------------------------------------------------------------------------------------


def _config_text(text: str | bytes) -> Callable[[Path, Pristine], None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        (folder / CONFIG).write_bytes(text.encode() if isinstance(text, str) else text)

    return mutate


def _config_edit(**changes: Any) -> Callable[[Path, Pristine], None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        raw = pristine.raw_config()
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        (folder / CONFIG).write_text(json.dumps(raw))  # writes NaN / Infinity as Python's json does

    return mutate


def _config_replace(old: str, new: str) -> Callable[[Path, Pristine], None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        text = pristine.config.decode()
        assert old in text
        (folder / CONFIG).write_text(text.replace(old, new, 1))

    return mutate


def _special(name: str, make: str) -> Callable[[Path, Pristine], None]:
    """Put a FIFO, a directory or a symlink to a device (or nowhere) where ``name`` should be."""

    def mutate(folder: Path, pristine: Pristine) -> None:
        path = folder / name
        path.unlink()
        if make == "fifo":
            os.mkfifo(path)
        elif make == "directory":
            path.mkdir()
            (path / "inner").write_bytes(b"x")
        elif make == "dangling":
            path.symlink_to(folder / "nowhere")
        elif make == "loop":
            path.symlink_to(path)
        else:
            path.symlink_to(make)

    return mutate


def _linked_elsewhere(folder: Path, pristine: Pristine) -> None:
    # The Hugging Face cache layout: every file is a symlink to a blob. Must load.
    blobs = folder.parent / f"{folder.name}-blobs"
    blobs.mkdir()
    for name in (CONFIG, SAFETENSORS):
        (blobs / name).write_bytes((folder / name).read_bytes())
        (folder / name).unlink()
        (folder / name).symlink_to(blobs / name)


def _header_edit(edit: Callable[[dict[str, Any]], None], *, length: int | None = None) -> Callable[..., None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        header = pristine.header()
        edit(header)
        data = pristine.weights[pristine.header_end :]
        (folder / SAFETENSORS).write_bytes(write_safetensors(header, data, length=length))

    return mutate


def _nothing(header: dict[str, Any]) -> None:
    pass


def _set(key: str, **values: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[key].update(values)

    return edit


def _weights_bytes(make: Callable[[bytes], bytes]) -> Callable[[Path, Pristine], None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        (folder / SAFETENSORS).write_bytes(make(pristine.weights))

    return mutate


def _extra_tensor(key: str, tensor: torch.Tensor) -> Callable[[Path, Pristine], None]:
    def mutate(folder: Path, pristine: Pristine) -> None:
        state = load_file(folder / SAFETENSORS)
        save_file({**state, key: tensor}, folder / SAFETENSORS)

    return mutate


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.getcwd, ())


def _pickle(payload: Callable[[dict[str, torch.Tensor]], Any] | bytes) -> Callable[[Path, Pristine], None]:
    """Replace the safetensors file with ``adapter_model.bin`` holding ``payload(state)`` (or raw bytes)."""

    def mutate(folder: Path, pristine: Pristine) -> None:
        state = load_file(folder / SAFETENSORS)
        (folder / SAFETENSORS).unlink()
        if isinstance(payload, bytes):
            (folder / PICKLE).write_bytes(payload)
            return
        value = payload(state)
        if isinstance(value, bytes):
            (folder / PICKLE).write_bytes(value)
        else:
            torch.save(value, folder / PICKLE)

    return mutate


def _pickle_fifo(folder: Path, pristine: Pristine) -> None:
    (folder / SAFETENSORS).unlink()
    os.mkfifo(folder / PICKLE)


def _zero_b(folder: Path, pristine: Pristine) -> None:
    state = load_file(folder / SAFETENSORS)
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, folder / SAFETENSORS
    )


def _relabel(dtype: str, scale: float = 1.0) -> Callable[[dict[str, Any]], None]:
    """Relabel lora_A as ``dtype`` with its bytes unchanged (the shape scaled to cover them)."""

    def edit(header: dict[str, Any]) -> None:
        entry = header[A_KEY]
        entry["dtype"] = dtype
        entry["shape"] = [entry["shape"][0], int(entry["shape"][1] * scale)]

    return edit


def _overlap(header: dict[str, Any]) -> None:
    header[B_KEY]["data_offsets"] = list(header[A_KEY]["data_offsets"])


@dataclass(frozen=True)
class Case:
    """A hand-written bad input and what must come of it."""

    id: str
    mutate: Callable[[Path, Pristine], None]
    error: type[Exception] | None  # what both loaders raise; None: both load cleanly
    match: str = ""  # a regex the loaders' message must contain
    inspect: str | None = None  # a finding code inspect must report
    warns: type[Warning] | None = None  # a warning both loaders must emit
    kwargs: dict[str, Any] = field(default_factory=dict)
    posix: bool = False  # needs FIFOs or /dev


PICKLE_OK = {"allow_pickle": True}
NESTED_100000 = "[" * 100_000 + "]" * 100_000

# Each group: (id, mutation, expected error or None, message regex, inspect code).
CONFIG_CASES = [
    (
        "config-nested-100000",
        _config_text('{"peft_type": "LORA", "x": ' + NESTED_100000 + "}"),
        "nested deeper",
    ),
    (
        "config-nested-40",
        _config_text('{"peft_type": "LORA", "x": ' + "[" * 40 + "]" * 40 + "}"),
        "41 levels",
    ),
    ("config-too-large", _config_text(b"{" + b" " * (CONFIG_MAX_BYTES + 1) + b"}"), "larger than 4 MiB"),
    ("config-a-list", _config_text("[1, 2]"), "holds a JSON list"),
    ("config-empty", _config_text(""), "not valid UTF-8 JSON"),
    ("config-not-utf8", _config_text(b'{"peft_type": "\xff\xfe"}'), "not valid UTF-8"),
    ("config-huge-integer", _config_replace('"r": 4', '"r": ' + "9" * 5000), "not valid UTF-8 JSON"),
]
NONFINITE_CASES = [
    ("config-alpha-nan", _config_edit(lora_alpha=math.nan), "lora_alpha"),
    ("config-alpha-inf", _config_edit(lora_alpha=math.inf), "lora_alpha"),
    ("config-alpha-1e999", _config_replace('"lora_alpha": 8', '"lora_alpha": 1e999'), "lora_alpha"),
    ("config-alpha-pattern-neginf", _config_edit(alpha_pattern={"fc1": -math.inf}), r"alpha_pattern\.fc1"),
    (
        "config-nan-in-list",
        _config_edit(layers_to_transform=[0, math.nan]),
        r"layers_to_transform\[1\]",
    ),
]
UNKNOWN_CASES = [
    (
        "config-unknown-subconfig",
        _config_edit(new_variant_config={"rank": 2}),
        r"new_variant_config=.*upgrade peft",
    ),
    ("config-unknown-true", _config_edit(use_new_variant=True), r"use_new_variant=True"),
    ("config-unknown-number", _config_edit(new_scale=0), r"new_scale=0"),
    (
        "config-unknown-nested",
        _config_edit(eva_config={"rho": 2.0, "new_knob": 3}),
        r"eva_config\.new_knob=3",
    ),
]
IGNORED_CASES = [
    ("config-unknown-null", _config_edit(new_variant_config=None)),
    ("config-unknown-false", _config_edit(use_new_variant=False)),
    ("config-unknown-empty", _config_edit(new_list=[], new_map={}, new_text="")),
]
# (file, what is put there, message regex); the error is the file's: config or weights.
SPECIAL_CASES = [
    (CONFIG, "fifo", "FIFO"),
    (CONFIG, "directory", "a directory"),
    (CONFIG, "/dev/zero", "character device"),
    (CONFIG, "/dev/urandom", "character device"),
    (CONFIG, "loop", "unreadable"),
    (SAFETENSORS, "fifo", "FIFO"),
    (SAFETENSORS, "directory", "a directory"),
    (SAFETENSORS, "/dev/zero", "character device"),
    (SAFETENSORS, "/dev/urandom", "character device"),
]
# Relabel lora_A (float32) as another dtype over the same bytes, the shape scaled to cover them.
RELABEL_CASES = [
    ("I32", 1),
    ("U32", 1),
    ("I16", 2),
    ("BOOL", 4),
    ("U8", 4),
    ("I8", 4),
    ("F8_E4M3", 4),
    ("C64", 0.5),
]
HEADER_CASES = [
    ("shape-overflow", _header_edit(_set(A_KEY, shape=[2**62, 2**62])), "overflow"),
    ("shape-negative", _header_edit(_set(A_KEY, shape=[-4, 2])), "-4"),
    ("shape-huge", _header_edit(_set(A_KEY, shape=[2**40, 2])), "not a valid safetensors"),
    ("shape-not-a-list", _header_edit(_set(A_KEY, shape="4x2")), "invalid"),
    ("offsets-past-eof", _header_edit(_set(B_KEY, data_offsets=[32, 2**40])), "not a valid safetensors"),
    ("offsets-overlapping", _header_edit(_overlap), "not a valid safetensors"),
    ("offsets-negative", _header_edit(_set(A_KEY, data_offsets=[-32, 0])), "-32"),
    ("offsets-reversed", _header_edit(_set(A_KEY, data_offsets=[32, 0])), "invalid offset"),
    ("header-length-2**62", _header_edit(_nothing, length=2**62), "header too large"),
    ("header-length-2**64-1", _header_edit(_nothing, length=2**64 - 1), "header too large"),
    ("header-length-past-eof", _header_edit(_nothing, length=90_000_000), "invalid header length"),
    ("header-length-zero", _header_edit(_nothing, length=0), "EOF while parsing"),
    ("header-unknown-dtype", _header_edit(_set(A_KEY, dtype="Q99")), "Q99"),
    (
        "header-nested-100000",
        _weights_bytes(lambda w: write_safetensors({}, b"", text=NESTED_100000)),
        "invalid",
    ),
    ("weights-three-bytes", _weights_bytes(lambda w: w[:3]), "header too small"),
    ("weights-empty-file", _weights_bytes(lambda w: b""), "header too small"),
    ("weights-truncated-data", _weights_bytes(lambda w: w[:-4]), "not fully covered"),
]
PICKLE_CASES = [
    (
        "pickle-garbage",
        _pickle(b"hello, I am not a pickle"),
        AdapterWeightsError,
        "not a readable torch pickle",
    ),
    ("pickle-empty", _pickle(b""), AdapterWeightsError, "EOFError"),
    (
        "pickle-truncated",
        _pickle(lambda s: _saved(s)[:100]),
        AdapterWeightsError,
        "not a readable torch pickle",
    ),
    ("pickle-list", _pickle(lambda s: list(s.values())), AdapterWeightsError, "holds a list"),
    ("pickle-tensor", _pickle(lambda s: s[A_KEY]), AdapterWeightsError, "holds a Tensor"),
    ("pickle-int-values", _pickle(lambda s: {**s, A_KEY: 3}), AdapterWeightsError, "str -> int"),
    ("pickle-int-keys", _pickle(lambda s: {0: s[A_KEY]}), AdapterWeightsError, "int -> Tensor"),
    ("pickle-nested", _pickle(lambda s: {"a": dict(s)}), AdapterWeightsError, "str -> dict"),
    (
        "pickle-int-tensor",
        _pickle(lambda s: {**s, A_KEY: s[A_KEY].view(torch.int32)}),
        AdapterWeightsError,
        r"lora_A\.weight \(I32\)",
    ),
    ("pickle-code", _pickle(lambda s: pickle.dumps({A_KEY: _Evil()})), UnsafeAdapterError, "weights_only"),
    ("pickle-code-torch-save", _pickle(lambda s: {**s, A_KEY: _Evil()}), UnsafeAdapterError, "weights_only"),
]


def _special_case(name: str, make: str, match: str) -> Case:
    error = AdapterConfigError if name == CONFIG else AdapterWeightsError
    prefix = "config" if name == CONFIG else "weights"
    return Case(
        f"{prefix}-{make.strip('/').replace('/', '-')}",
        _special(name, make),
        error,
        match,
        "not-a-file",
        posix=make != "directory",
    )


CASES = [
    *(Case(i, m, AdapterConfigError, r, "config-invalid") for i, m, r in CONFIG_CASES),
    *(Case(i, m, AdapterConfigError, r, "config-nonfinite") for i, m, r in NONFINITE_CASES),
    *(Case(i, m, AdapterConfigError, r, "config-unknown-fields") for i, m, r in UNKNOWN_CASES),
    *(Case(i, m, None, "", "config-ignored-fields", UnknownConfigFieldWarning) for i, m in IGNORED_CASES),
    Case("config-rank-zero", _config_edit(r=0), AdapterConfigError, "positive integer", "rank-mismatch"),
    Case("config-runtime-config", _config_edit(runtime_config={"ephemeral_gpu_offload": True}), None),
    *(_special_case(name, make, match) for name, make, match in SPECIAL_CASES),
    Case("config-dangling-symlink", _special(CONFIG, "dangling"), AdapterNotFoundError, "not found",
         posix=True),
    Case("weights-dangling-symlink", _special(SAFETENSORS, "dangling"), AdapterNotFoundError,
         "weights not found", "weights-missing", posix=True),
    Case("files-linked-to-blobs", _linked_elsewhere, None, posix=True),
    *(Case(f"relabel-f32-as-{d.lower()}", _header_edit(_relabel(d, k)), AdapterWeightsError,
           rf"lora_A\.weight \({d}\)", "wrong-dtype") for d, k in RELABEL_CASES),
    Case("relabel-f32-as-f16", _header_edit(_relabel("F16", 2)), AdapterWeightsError, "wrong shape"),
    Case("extra-int-adapter-tensor", _extra_tensor(A_KEY.replace("weight", "extra"), torch.zeros(2).long()),
         AdapterWeightsError, r"\(I64\)", "wrong-dtype"),
    *(Case(i, m, AdapterWeightsError, r, "weights-corrupt") for i, m, r in HEADER_CASES),
    Case("header-metadata-not-strings", _header_edit(lambda h: h.update(__metadata__={"format": 5})),
         AdapterWeightsError, "invalid type"),
    Case("header-duplicate-key", _weights_bytes(lambda w: _duplicate_key(w)), None),  # the last one wins
    Case("weights-no-tensors", _weights_bytes(lambda w: write_safetensors({}, b"")), AdapterWeightsError,
         "missing 2 key", "no-tensors"),
    *(Case(i, m, e, r, kwargs=PICKLE_OK) for i, m, e, r in PICKLE_CASES),
    Case("pickle-fifo", _pickle_fifo, AdapterWeightsError, "FIFO", kwargs=PICKLE_OK, posix=True),
    Case("pickle-fifo-not-allowed", _pickle_fifo, UnsafeAdapterError, "Refusing to unpickle", "not-a-file",
         posix=True),
    Case("all-lora-B-zero", _zero_b, None, "", "noop-adapter", NoOpAdapterWarning),
    # Once escapes inside PEFT's injection/loading: a KeyError from PEFT's ModulesToSaveWrapper
    # lookup, and a MonteCLoRA config whose sampler buffers the file lacks.
    Case("config-modules-to-save-missing", _config_edit(modules_to_save=["fc2"]), AdapterWeightsError, "fc2"),
    Case("config-monteclora-enabled", _config_edit(monteclora_config={}), AdapterWeightsError, "monteclora"),
]  # fmt: skip
CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def _duplicate_key(weights: bytes) -> bytes:
    end = 8 + int(struct.unpack("<Q", weights[:8])[0])
    header = json.loads(weights[8:end])
    text = ("{" + f"{json.dumps(A_KEY)}: {json.dumps(header[A_KEY])}, " + json.dumps(header)[1:]).encode()
    return struct.pack("<Q", len(text)) + text + weights[end:]


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_hand_written_case(tmp_path: Path, mlp_files: Pristine, case: Case) -> None:
    if case.posix and os.name != "posix":
        pytest.skip("needs POSIX special files")
    folder = mlp_files.write(tmp_path / "adapter")
    case.mutate(folder, mlp_files)
    verdict = run_everywhere(folder, "mlp", **case.kwargs)
    for loader, error in verdict.errors.items():
        if case.error is None:
            assert error is None, f"{loader}: {error!r}"
        else:
            assert isinstance(error, case.error), f"{loader}: {error!r}"
            assert case.match
            assert re.search(case.match, str(error)), str(error)
    if case.warns is not None:
        for loader, caught in verdict.warnings.items():
            assert case.warns in caught, loader
    if case.inspect is not None:
        assert verdict.inspect_codes is not None
        assert case.inspect in verdict.inspect_codes, verdict.inspect_codes
        assert verdict.inspect_ok is (case.error is None)
    if case.error is None:
        assert verdict.inspect_ok, verdict.inspect_codes


@pytest.mark.parametrize("case", [c for c in CASES if c.inspect or c.error is None], ids=lambda c: str(c.id))
def test_cli_inspect_never_shows_a_traceback(
    tmp_path: Path, mlp_files: Pristine, case: Case, capsys: pytest.CaptureFixture[str]
) -> None:
    if case.posix and os.name != "posix":
        pytest.skip("needs POSIX special files")
    folder = mlp_files.write(tmp_path / "adapter")
    case.mutate(folder, mlp_files)
    with no_hang():
        code = cli.main(["inspect", str(folder), "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    if case.error is not None:
        assert code == 1
        assert "would not load safely" in captured.err
    else:
        assert code == 0, captured.err
    assert case.inspect is None or case.inspect in [f["code"] for f in json.loads(captured.out)["findings"]]


def test_messages_name_fields_and_versions(tmp_path: Path, mlp_files: Pristine) -> None:
    import peft

    folder = mlp_files.write(tmp_path / "adapter")
    _config_edit(new_variant_config={"rank": 2}, use_other=1, lora_alpha=math.nan, peft_version="9.9.9")(
        folder, mlp_files
    )
    with pytest.raises(AdapterConfigError) as nonfinite:
        read_config(folder)
    assert nonfinite.value.fields == ["lora_alpha"]
    _config_edit(new_variant_config={"rank": 2}, use_other=1, peft_version="9.9.9")(folder, mlp_files)
    with pytest.raises(AdapterConfigError, match="upgrade peft") as unknown:
        read_config(folder)
    assert unknown.value.fields == ["new_variant_config", "use_other"]
    assert f"installed peft {peft.__version__}" in str(unknown.value)
    assert "saved by peft 9.9.9" in str(unknown.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_lora_warns_a_trained_one_does_not(tmp_path: Path, kind: Base) -> None:
    targets = ["fc1"] if kind == "mlp" else ["q_proj", "v_proj"]
    config = LoraConfig(target_modules=targets)  # lora_B starts at zero
    fresh = save_adapter(make_base(kind), config, tmp_path / "fresh")
    trained = save_adapter(make_base(kind), config, tmp_path / "trained", train_steps=1)
    for loader in LOADERS.values():
        with pytest.warns(
            NoOpAdapterWarning, match=r"Adapter 'default' from .*fresh' changes nothing"
        ) as caught:
            model = loader(make_base(kind), fresh, strict=True)  # a warning, never an error
        assert [w.filename for w in caught if w.category is NoOpAdapterWarning] == [__file__]
        assert torch.equal(output(model, kind), output(make_base(kind), kind))
        with warnings.catch_warnings():
            warnings.simplefilter("error", NoOpAdapterWarning)
            model = loader(make_base(kind), trained)
        with pytest.warns(NoOpAdapterWarning, match="'second'"):
            load_adapter(model, fresh, adapter_name="second")


# --------------------------------------------------------------------------------------------------
# The campaign: hypothesis-generated mutations of real files
# --------------------------------------------------------------------------------------------------

CAMPAIGN = settings(
    derandomize=True,  # the same examples on every run: CI is reproducible
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


_PRINTABLE = st.integers(32, 126)  # JSON edits that stay text: digits, letters, quotes, brackets


@st.composite
def byte_edits(draw: st.DrawFn, start: int, stop: int, *, resize: bool) -> list[tuple[str, int, int]]:
    """1-3 edits (kind, position, value) at positions in [start, stop); ``resize`` adds truncations,
    deletions and insertions to in-place flips and sets."""
    kinds = ["flip", "set", "truncate", "delete", "insert"] if resize else ["flip", "set"]
    edit = st.tuples(
        st.sampled_from(kinds), st.integers(start, stop - 1), st.one_of(_PRINTABLE, st.integers(1, 255))
    )
    return draw(st.lists(edit, min_size=1, max_size=3))


def apply_edits(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        position = min(position, max(len(out) - 1, 0))
        if kind == "truncate":
            del out[position:]
        elif not out:
            continue
        elif kind == "flip":
            out[position] ^= value
        elif kind == "set":
            out[position] = value
        elif kind == "delete":
            del out[position : position + value % 9 + 1]
        else:
            out[position:position] = bytes([value]) * (value % 5 + 1)
    return bytes(out)


def _campaign_folder(tmp_path_factory: pytest.TempPathFactory, pristine: Pristine) -> Path:
    return pristine.write(tmp_path_factory.mktemp("case") / "adapter")


# Where the edits land: the config anywhere; the safetensors header (length field and JSON) with any
# edit; the tensor data with in-place flips only (the file stays valid, the values change).
# Examples per (model, region): the Llama loads cost ~10x the MLP's, so it gets fewer.
REGIONS = {"config": (60, 20), "header": (60, 20), "data": (80, 15)}


@pytest.mark.slow  # a hypothesis campaign: the hand-written cases above are the quick tier's
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("region", list(REGIONS))
def test_campaign_byte_edits(
    kind: Base, region: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pristine: Pristine = request.getfixturevalue(f"{kind}_files")
    target = CONFIG if region == "config" else SAFETENSORS
    original = pristine.config if region == "config" else pristine.weights
    start, stop = {
        "config": (0, len(original)),
        "header": (0, pristine.header_end),
        "data": (pristine.header_end, len(original)),
    }[region]
    examples = REGIONS[region][0 if kind == "mlp" else 1]

    @settings(CAMPAIGN, max_examples=examples)
    @given(edits=byte_edits(start, stop, resize=region != "data"))
    def campaign(edits: list[tuple[str, int, int]]) -> None:
        folder = _campaign_folder(tmp_path_factory, pristine)
        (folder / target).write_bytes(apply_edits(original, edits))
        run_everywhere(folder, kind)

    campaign()


_ints = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 2, 31, 32, 33, 2**31, 2**32, 2**63 - 1, 2**64 - 1, -1]),
)


@st.composite
def header_edits(draw: st.DrawFn, header: dict[str, Any], size: int) -> tuple[dict[str, Any], int | None]:
    """A structurally edited safetensors header (dtypes, shapes, offsets, keys) and maybe a bad length."""
    header = json.loads(json.dumps(header))
    keys = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(keys))
        what = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "copy", "junk", "metadata"]))
        entry = header.get(key)
        if not isinstance(entry, dict):  # dropped or junked by an earlier edit
            entry = header[key] = {}
        if what == "dtype":
            entry["dtype"] = draw(st.sampled_from(ST_DTYPES))
        elif what == "shape":
            entry["shape"] = draw(st.lists(_ints, max_size=4))
        elif what == "offsets":
            entry["data_offsets"] = draw(st.lists(_ints, min_size=2, max_size=2))
        elif what == "drop":
            del header[key]
        elif what == "copy":
            header[draw(st.sampled_from([*keys, "base_model.model.fc1.lora_A.extra"]))] = dict(entry)
        elif what == "junk":
            header[key] = draw(st.sampled_from([None, 3, "x", [], {}, {"dtype": "F32"}]))
        else:
            header["__metadata__"] = draw(st.sampled_from([None, {"format": "pt"}, {"a": 1}, [], "x"]))
    length = draw(st.one_of(st.none(), st.none(), _ints.filter(lambda n: 0 <= n < 2**64)))
    return header, length


@pytest.mark.slow  # a hypothesis campaign: the hand-written cases above are the quick tier's
@pytest.mark.parametrize("kind", KINDS)
def test_campaign_header_edits(
    kind: Base, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pristine: Pristine = request.getfixturevalue(f"{kind}_files")
    data = pristine.weights[pristine.header_end :]

    @settings(CAMPAIGN, max_examples=80 if kind == "mlp" else 25)
    @given(edit=header_edits(pristine.header(), len(pristine.weights)))
    def campaign(edit: tuple[dict[str, Any], int | None]) -> None:
        header, length = edit
        folder = _campaign_folder(tmp_path_factory, pristine)
        (folder / SAFETENSORS).write_bytes(write_safetensors(header, data, length=length))
        run_everywhere(folder, kind)

    campaign()


# Plausible magnitudes only: an alpha of 1e300 is finite, loads, and overflows every output.
# Words the config's fields are made of: module names of both models, PEFT's choices.
_WORDS = [
    *("fc1", "fc2", "act", "q_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens", "lm_head"),
    *("model.layers.0.self_attn.q_proj", "layers", "all-linear", ".*proj", "none", "all", "lora_only"),
    *("gaussian", "pissa", "olora", "eva", "orthogonal", "loftq", "LORA", "IA3", "CAUSAL_LM", "SEQ_CLS"),
]
_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 64),
    st.floats(-1e6, 1e6),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(max_size=6),
    st.sampled_from(_WORDS),
    st.lists(st.sampled_from(_WORDS), max_size=3),  # target_modules, modules_to_save, ...
    st.lists(st.integers(-1, 3), max_size=3),  # layers_to_transform, token indices, ...
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def config_edits(draw: st.DrawFn, raw: dict[str, Any]) -> dict[str, Any]:
    """A config with 1-3 fields set to arbitrary JSON values, deleted, or added (unknown to PEFT)."""
    raw = json.loads(json.dumps(raw))
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if what == "add":
            raw[draw(st.text(min_size=1, max_size=12))] = draw(_json_values)
            continue
        key = draw(st.sampled_from(sorted(raw)))
        if what == "delete":
            del raw[key]
        else:
            raw[key] = draw(_json_values)
    return raw


@pytest.mark.slow  # a hypothesis campaign: the hand-written cases above are the quick tier's
@pytest.mark.parametrize("kind", KINDS)
def test_campaign_config_edits(
    kind: Base, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    pristine: Pristine = request.getfixturevalue(f"{kind}_files")

    @settings(CAMPAIGN, max_examples=100 if kind == "mlp" else 20)
    @given(raw=config_edits(pristine.raw_config()))
    def campaign(raw: dict[str, Any]) -> None:
        folder = _campaign_folder(tmp_path_factory, pristine)
        (folder / CONFIG).write_text(json.dumps(raw))
        run_everywhere(folder, kind)

    campaign()


# --------------------------------------------------------------------------------------------------
# Every tuner's real files: no false alarms, and a sound no-op rule
# --------------------------------------------------------------------------------------------------

NEW_ERROR_CODES = {"config-unknown-fields", "config-nonfinite", "wrong-dtype", "not-a-file"}


def _zeroed(path: Path, tuner: Tuner) -> None:
    """Set every output factor of the saved adapter to zero (identities to one), the rest untouched."""
    rule = NOOP_RULES[tuner.peft_type]
    state = load_file(path / SAFETENSORS)
    for key, tensor in state.items():
        parts = key.split(".")
        index = next(i for i, part in enumerate(parts) if part in rule.slots)
        factor = rule.factor(parts[index], ".".join(parts[index + 1 :]))
        if factor in rule.ones:
            state[key] = torch.ones_like(tensor)
        elif factor is not None and factor not in rule.neutral:
            state[key] = torch.zeros_like(tensor)
    save_file(state, path / SAFETENSORS)


def _noop_warned(path: Path, tuner: Tuner) -> tuple[bool, torch.nn.Module]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_for_inference(make_base(tuner.base), path)
    return any(issubclass(w.category, NoOpAdapterWarning) for w in caught), model


@pytest.mark.parametrize("tuner", tuner_params(TUNERS))
def test_real_adapters_raise_no_false_alarm_and_noop_is_sound(tmp_path: Path, tuner: Tuner) -> None:
    if not tuner.available:
        pytest.skip(f"{tuner.peft_type} needs {tuner.needs}")
    base_output = output(make_base(tuner.base), tuner.base, **tuner.forward_kwargs)
    for trained in (False, True):
        path = save_adapter(
            make_base(tuner.base), tuner.config(), tmp_path / f"t{trained}", train_steps=int(trained)
        )
        parsed = parse_config(read_config_json(path / CONFIG), path=path / CONFIG)
        assert parsed.unknown == {}
        tensors = dict(iter_tensors(path / SAFETENSORS))
        assert wrong_dtypes(parsed.config, read_header(path / SAFETENSORS)) == {}
        noop = noop_adapter(parsed.config, tensors)
        assert noop is (tuner.fresh_noop and not trained)
        report = inspect_adapter(path)
        assert NEW_ERROR_CODES.isdisjoint(f.code for f in report.errors), report.errors
        assert ("noop-adapter" in [f.code for f in report.findings]) is noop
    if tuner.peft_type not in NOOP_RULES:
        return
    # Soundness: whenever the rule says "changes nothing", the loaded model computes the base model's
    # outputs bit for bit -- for fresh adapters, and for trained ones with their output factors zeroed.
    paths = [tmp_path / "tFalse"] if tuner.fresh_noop else []
    if tuner.id in {
        "fourierft",
        "c3a",
        "unilora",
        "unilora-indices",
        "lora",
        "ia3",
        "boft",
        "road",
        "tinylora",
    }:
        _zeroed(tmp_path / "tTrue", tuner)
        paths.append(tmp_path / "tTrue")
    for path in paths:
        warned, model = _noop_warned(path, tuner)
        assert warned
        assert torch.equal(output(model, tuner.base, **tuner.forward_kwargs), base_output)


@pytest.mark.parametrize(
    ("trained_on", "loaded_into", "error", "attribute"),
    [
        ({"hidden_size": 32}, {"hidden_size": 48}, AdapterWeightsError, "mismatched_keys"),
        ({"num_hidden_layers": 24}, {"num_hidden_layers": 12}, AdapterWeightsError, "unexpected_keys"),
    ],
    ids=["336-shapes", "168-strays"],
)
def test_a_refusal_of_a_large_adapter_fits_a_screen(
    tmp_path: Path, trained_on: dict[str, int], loaded_into: dict[str, int], error: type, attribute: str
) -> None:
    """A 24-layer all-linear adapter into the wrong base: hundreds of keys, ten shown, all in the error."""
    from conftest import tiny_llama

    layers = {"num_hidden_layers": 24, "num_attention_heads": 4, "num_key_value_heads": 4}
    config = LoraConfig(r=4, target_modules="all-linear")
    folder = save_adapter(tiny_llama(**{**layers, **trained_on}), config, tmp_path / "adapter")
    model = tiny_llama(**{**layers, **loaded_into})
    before = snapshot(model)
    with pytest.raises(error, match=r"and \d+ more") as refused:
        load_for_inference(model, folder)
    assert_unchanged(model, before)
    assert_fits_a_screen(refused.value, folder)
    assert len(getattr(refused.value, attribute)) >= 168
