"""The ``autoseg`` command line: parses arguments and hands them to one stage.

Each command lives in ``autoseg/commands/<name>.py`` with ``register(subparsers)`` that
adds its parser and sets ``func``. Known errors (``AutosegError``) become one line on
stderr and exit code 2; anything else is an internal error, exit code 1, with the
traceback only under ``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

# The command's start, as near to the process start as this module gets: a training time budget counts from it.
STARTED = time.perf_counter()

from autoseg import __version__
from autoseg.errors import AutosegError, DatasetCheckFailed

COMMANDS = [
    "check",
    "plan_and_preprocess",
    "convert_msd",
    "convert_dicom",
    "demo",
    "train",
    "pretrain",
    "predict",
    "ensemble",
    "export",
    "evaluate",
    "find_best",
    "report",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2, like every other user error
        # The usage block, wrapped over several lines for train and predict, would break the one-line rule;
        # the line points at --help instead.
        print(f"autoseg: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoseg", description="Self-configuring segmentation for 2D and 3D medical images.")
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"autoseg.commands.{name}").register(subparsers)
    return parser


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every command shares: the three roots and --verbose."""
    parser.add_argument("--raw", help="raw datasets folder (default: $AUTOSEG_RAW, $nnUNet_raw, ./autoseg_data/raw)")
    parser.add_argument("--preprocessed", help="preprocessed folder (default: $AUTOSEG_PREPROCESSED, ...)")
    parser.add_argument("--results", help="trained models folder (default: $AUTOSEG_RESULTS, ...)")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks of errors")


def refuse_contradicting_precision(args: argparse.Namespace) -> None:
    """``--fp32`` with ``--cpu-bf16`` (train, pretrain): neither may silently win over the other."""
    from autoseg.errors import UsageError

    if args.fp32 and args.cpu_bf16:
        raise UsageError("--fp32 and --cpu-bf16 contradict each other: give one of them")


def console_main() -> int:
    """The ``autoseg`` command (and ``python -m autoseg``): glibc's huge pages first, see ``autoseg.allocator``."""
    from autoseg.allocator import relaunch_with_huge_pages

    relaunch_with_huge_pages()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
        return int(result or 0)
    except DatasetCheckFailed as exc:
        for problem in exc.problems:
            print(f"autoseg: error: {problem}", file=sys.stderr)
        print(f"autoseg: error: {exc.one_line()}; nothing was written", file=sys.stderr)
        return exc.exit_code
    except AutosegError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"autoseg: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("autoseg: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission denied while writing: the user's environment
        if getattr(args, "verbose", False):
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"autoseg: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"autoseg: internal error: {exc.__class__.__name__}: {exc} (run with --verbose for details "
              "and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
