"""The ``safe-lora`` command: ``demo``, ``inspect ID_OR_PATH`` and ``--version``.

``inspect`` also takes what the loaders take to vouch for the bytes and the fit: ``--sha256 FILE=HEX``
(``expected_sha256=``), ``--signed-by KEY.pem`` (``signed_by=``) and ``--base ID_OR_PATH``
(``inspect_adapter(base_model=...)``).

Thin by design: argument parsing, dispatch, printing and exit codes. The work is done by
:func:`safe_lora._demo.run_demo`, :func:`safe_lora._inspect.inspect_adapter` and
:func:`safe_lora._config.trainer_checkpoints`.

Exit codes: 0 success (for ``inspect``: the folder would load safely), 1 failure (the reason on
stderr, never a traceback), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from safe_lora._version import __version__
from safe_lora.errors import SafeLoraError

if TYPE_CHECKING:
    from safe_lora._demo import DemoReport
    from safe_lora._inspect import AdapterReport

__all__ = ["main"]

PROG = "safe-lora"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
BAR_WIDTH = 32
WRAP = 100


def main(argv: list[str] | None = None) -> int:
    """Run the ``safe-lora`` command line.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit code: 0 success, 1 failure (reason on stderr), 2 usage error, 130 interrupted.

    Example:
        >>> main(["inspect", "out/my-adapter", "--json"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: expected a command (demo or inspect)", file=sys.stderr)
        return EXIT_USAGE

    _quiet_third_party_imports()
    try:
        return handler(args)
    except SafeLoraError as exc:
        _fail(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # unreadable files and the like: the same contract, no traceback
        _fail(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED


def _quiet_third_party_imports() -> None:
    """Keep the command's stderr for its own messages.

    bitsandbytes, imported by PEFT, logs a warning at import on CPUs with AVX512-BF16 when its
    optional ``kernels`` package is missing ("Failed to load CPU gemm_4bit_forward ..."): about 4-bit
    matrix speed, nothing ``inspect`` or ``demo`` use. The command owns its process's logging, so it
    raises that logger's level unless the user configured it.
    """
    logger = logging.getLogger("bitsandbytes")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``safe-lora`` (exposed for documentation tools and tests)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Load and evaluate PEFT adapters safely and deterministically.",
        epilog="Exit codes: 0 success, 1 failure (reason on stderr), 2 usage error.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="show raw PEFT loading giving different outputs, and safe_lora giving one",
        description=(
            "Train a tiny LoRA adapter with dropout (built in code, nothing downloaded), save it, and "
            "run one input many times through each way of loading it: raw PEFT for training, raw "
            "PEFT for inference, load_for_inference, and load_for_training inside deterministic_lora."
        ),
    )
    demo.add_argument(
        "--trials", type=_int_in(1, 100_000), default=200, help="runs per variant (default: 200)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    demo.add_argument(
        "--dropout", type=_rate, default=0.5, help="the adapter's lora_dropout, in [0, 1) (default: 0.5)"
    )
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(handler=_demo)

    inspect = commands.add_parser(
        "inspect",
        help="what is in an adapter (folder or hub repo), and would it load safely",
        description=(
            "Report an adapter's PEFT type, rank, every dropout rate, targets, base model, "
            "weight files and tensor sizes (from the safetensors header; a pickle is opened only with "
            "--allow-pickle), "
            "and what would go wrong. Exit 0 when safe_lora would load it, 1 when not. A hub repo id "
            "is fetched as the loaders fetch it: adapter_config.json and adapter_model.safetensors, "
            "nothing else. On a Trainer output folder (holding checkpoint-* adapters) the checkpoints "
            "are listed and the latest is inspected."
        ),
    )
    inspect.add_argument(
        "path",
        metavar="ID_OR_PATH",
        help="adapter folder, Trainer output folder, or hub repo id (e.g. org/name)",
    )
    inspect.add_argument("--revision", metavar="R", help="hub branch, tag or commit (default: main)")
    inspect.add_argument("--subfolder", metavar="S", help="the adapter's folder inside the repo or folder")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument(
        "--allow-pickle",
        action="store_true",
        help="judge a pickle-only folder as load_*(allow_pickle=True) would: read with "
        "torch.load(weights_only=True), as the loaders read it",
    )
    inspect.add_argument(
        "--header-only", action="store_true", help="skip scanning the tensor values for NaN/inf"
    )
    inspect.add_argument(
        "--sha256",
        metavar="FILE=HEX",
        type=_pin,
        action="append",
        help=(
            "require a file's sha256 (as sha256sum prints it), e.g. adapter_config.json=HEX; a bare HEX "
            "pins the weights file; repeat for several files (expected_sha256=)"
        ),
    )
    inspect.add_argument(
        "--signed-by",
        metavar="KEY.pem",
        help="require an OpenSSF model-signing signature (model.sig) by this PEM public key (signed_by=)",
    )
    inspect.add_argument(
        "--base",
        metavar="ID_OR_PATH",
        help=(
            "also check against this base model (a folder or hub id; only its config.json is read, and "
            "the model built on the meta device): exactly the verdict load_for_inference would give"
        ),
    )
    inspect.set_defaults(handler=_inspect)
    return parser


# --------------------------------------------------------------------------------------------------
# Argument types
# --------------------------------------------------------------------------------------------------


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, found {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, found {value}")
        return value

    return parse


_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def _pin(text: str) -> tuple[str | None, str]:
    """``FILE=HEX`` or a bare ``HEX`` (the weights file): ``(file name or None, hex)``."""
    name, sep, digest = text.rpartition("=")
    digest = digest.strip()
    if not _SHA256.fullmatch(digest):
        raise argparse.ArgumentTypeError(
            f"expected FILE=HEX or HEX, HEX being 64 hexadecimal digits as sha256sum prints them, "
            f"found {text!r}"
        )
    if sep and not name.strip():
        raise argparse.ArgumentTypeError(f"expected a file name before '=', found {text!r}")
    return (name.strip() if sep else None), digest.lower()


def _pins(given: list[tuple[str | None, str]] | None) -> str | dict[str, str] | None:
    """The ``expected_sha256=`` that ``--sha256`` options mean.

    Raises:
        ValueError: Two digests for one file, or a bare digest next to named ones.
    """
    if not given:
        return None
    bare = [digest for name, digest in given if name is None]
    if bare:
        if len(given) > 1:
            raise ValueError(
                "a bare --sha256 HEX pins the weights file alone; to pin several files, name each one "
                "(--sha256 adapter_model.safetensors=HEX --sha256 adapter_config.json=HEX)"
            )
        return bare[0]
    pins: dict[str, str] = {}
    for name, digest in given:
        assert name is not None
        if pins.setdefault(name, digest) != digest:
            raise ValueError(f"--sha256 gives two different digests for {name}")
    return pins


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), found {value:g}")
    return value


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from safe_lora._demo import run_demo

    report = run_demo(trials=args.trials, seed=args.seed, dropout=args.dropout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_demo(report, bar=_bar_char(sys.stdout)))
    if not report.ok:
        _fail(report.verdict)
        return EXIT_FAILED
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    try:
        pins = _pins(args.sha256)
    except ValueError as exc:
        print(f"{PROG} inspect: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from safe_lora._inspect import inspect_adapter
    from safe_lora._source import CONFIG_NAME, trainer_checkpoints

    signed_by = None
    if args.signed_by is not None:
        from safe_lora._signing import verifying_config

        try:  # the key is read now: a wrong one fails before anything is downloaded
            signed_by = verifying_config(args.signed_by)
        except (ImportError, ValueError, TypeError) as exc:
            _fail(f"--signed-by: {exc}")
            return EXIT_FAILED
    target, checkpoints = args.path, []
    if args.subfolder is None and not (Path(args.path) / CONFIG_NAME).is_file():
        checkpoints = trainer_checkpoints(args.path)  # a Trainer output folder: the latest checkpoint
        target = checkpoints[-1] if checkpoints else args.path
    report = inspect_adapter(
        target,
        base_model=args.base,
        allow_pickle=args.allow_pickle,
        check_values=not args.header_only,
        expected_sha256=pins,
        signed_by=signed_by,
        subfolder=args.subfolder,
        revision=args.revision,
    )
    if args.json:
        listed = {"checkpoints": [os.fspath(p) for p in checkpoints]} if checkpoints else {}
        print(json.dumps({**listed, **report.to_dict()}, indent=2))
    else:
        if checkpoints:
            print(render_checkpoints(args.path, checkpoints) + "\n")
        print(render_inspect(report))
    if not report.loads_safely:
        reasons = "\n".join(f"  - {f.message}" for f in report.errors)
        _fail(f"{report.path} would not load safely:\n{reasons}")
        return EXIT_FAILED
    return EXIT_OK


def _fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _bar_char(stream: TextIO) -> str:
    """A full block when the stream can encode it (a Windows code page may not), else ``#``."""
    try:
        "█".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "#"
    return "█"


def render_demo(report: DemoReport, *, bar: str = "#") -> str:
    """The text of ``safe-lora demo``: setup, one histogram per variant, the verdict.

    Output values are printed with ``repr``, so they read exactly as in the ``--json`` report.

    Args:
        report: What :func:`safe_lora._demo.run_demo` returned.
        bar: The character the histogram bars are drawn with.

    Returns:
        The text, without a trailing newline.
    """
    lines = [
        f"safe-lora demo: one input, {report.trials} runs through each of {len(report.variants)} ways "
        f"of loading the same LoRA adapter",
        "",
        f"  network  Linear(2->8) -> ReLU -> Linear(8->1); LoRA r={report.rank}, alpha={report.alpha} "
        f"on fc1, lora_dropout={report.dropout:g}; seed {report.seed}",
        f"  adapter  trained {report.train_steps} Adam steps on synthetic data, "
        f"MSE {report.loss_base!r} -> {report.loss_adapter!r}",
        f"  input    x = {report.input!r}",
        f"  outputs  base model {report.base_output!r}, trained adapter {report.adapter_output!r} "
        f"(eval mode, before saving)",
    ]
    width = max(len(repr(o.value)) for v in report.variants for o in v.outputs)
    for number, variant in enumerate(report.variants, 1):
        kind = "safe_lora" if variant.safe else "raw PEFT"
        plural = "output" if variant.distinct == 1 else "outputs"
        lines += ["", f"{number}. [{kind}] {variant.code}"]
        lines.append(f"   {variant.distinct} distinct {plural} in {report.trials} runs")
        for out in variant.outputs:
            share = out.count / report.trials
            drawn = bar * max(1, round(share * BAR_WIDTH))
            marks = []
            if out.is_adapter:
                marks.append("= trained adapter")
            if out.is_base:
                marks.append("= base model (the adapter dropped out entirely)")
            mark = f"  {', '.join(marks)}" if marks else ""
            lines.append(
                f"     {out.value!r:>{width}}  {drawn:<{BAR_WIDTH}} {out.count:>6}  {100 * share:5.1f}%{mark}"
            )
    lines += ["", f"verdict: {report.verdict}"]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) if value else "-"
    return str(value)


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WRAP, initial_indent=indent, subsequent_indent=indent + "  ") or [indent]


def render_checkpoints(folder: str, checkpoints: list[Path]) -> str:
    """The lines ``safe-lora inspect`` prints above the report of a Trainer output folder's latest checkpoint.

    Args:
        folder: The folder given on the command line.
        checkpoints: Its ``checkpoint-*`` adapters, oldest first (see ``trainer_checkpoints``).

    Returns:
        The text, without a trailing newline.
    """
    names = ", ".join(p.name for p in checkpoints)
    lines = [f"checkpoints  {folder} holds {len(checkpoints)} Trainer checkpoint(s): {names}"]
    lines += _wrap(
        f"inspecting the latest: {checkpoints[-1].name} (give a checkpoint's path to inspect another)",
        " " * 13,
    )
    return "\n".join(lines)


def render_inspect(report: AdapterReport) -> str:
    """The text of ``safe-lora inspect``: the config and files, the findings, whether it loads safely.

    Args:
        report: What :func:`safe_lora.inspect_adapter` returned.

    Returns:
        The text, without a trailing newline.
    """
    rows: list[tuple[str, Any]] = [
        ("peft type", report.peft_type),
        ("task type", report.task_type),
        ("rank", report.rank),
        ("alpha", report.alpha),
    ]
    if report.rank_pattern:
        rows.append(("rank_pattern", report.rank_pattern))
    if report.alpha_pattern:
        rows.append(("alpha_pattern", report.alpha_pattern))
    rows += [
        ("dropout", report.dropout),
        ("target modules", report.target_modules),
    ]
    if report.target_parameters:
        rows.append(("target params", report.target_parameters))
    rows += [
        ("modules_to_save", report.modules_to_save),
        ("base model", report.base_model_name_or_path),
        ("inference_mode", report.inference_mode),
    ]
    lines = [f"adapter  {report.path}", ""]
    lines += [f"  {name:<16} {_fmt(value)}" for name, value in rows]
    files = [
        f"{w.name} ({w.format}, {w.size_bytes:,} bytes{', not opened' if w.format == 'pickle' else ''})"
        for w in report.weight_files
    ]
    lines.append(f"  {'weights':<16} {files[0] if files else '-'}")
    lines += [f"  {'':<16} {line}" for line in files[1:]]
    if report.tensor_count is not None:
        dtypes = ", ".join(f"{dtype} x{count}" for dtype, count in report.dtypes.items())
        lines.append(
            f"  {'tensors':<16} {report.tensor_count:,} tensors, {report.parameter_count:,} parameters, "
            f"{report.tensor_bytes:,} bytes" + (f" ({dtypes})" if dtypes else "")
        )
    if report.commit is not None:
        lines.append(f"  {'commit':<16} {report.commit}")
    width = max((len(name) for name in report.sha256), default=0)
    for index, (name, digest) in enumerate(report.sha256.items()):
        lines.append(f"  {'sha256' if index == 0 else '':<16} {name:<{width}}  {digest}")
    if report.checked_against is not None:
        lines.append(f"  {'checked against':<16} {report.checked_against}")
    lines += ["", "findings" if report.findings else "findings: none"]
    for finding in report.findings:
        lines += _wrap(f"{finding.severity:<7} {finding.code}: {finding.message}", "  ")
    lines.append("")
    if report.loads_safely and report.checked_against is not None:
        lines += _wrap(
            f"loads safely: yes (load_for_inference / load_for_training would accept it into "
            f"{report.checked_against})",
            "",
        )
    elif report.loads_safely:
        lines += _wrap(
            "loads safely: yes (load_for_inference / load_for_training would accept it; shapes are "
            "checked against your base model when loading)",
            "",
        )
    else:
        lines.append(f"loads safely: no ({len(report.errors)} error(s) above)")
    return "\n".join(lines)
