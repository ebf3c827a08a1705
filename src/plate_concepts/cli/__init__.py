"""Command line: the same pipeline as the napari panels, without a screen.

``plate-concepts <command> --help`` documents each command. Each module of this package adds its
commands to the parser (``add_commands``) and runs them; commands never import Qt or napari,
except ``view`` and ``demo-run``.
"""

from __future__ import annotations

import argparse
import errno
import re
import sys
import warnings
from collections.abc import Sequence

from tqdm import tqdm

from plate_concepts.cli import compare, demo, dictionary, embeddings, passes, plates, reports
from plate_concepts.cli._common import CommandError, CommandParser, HelpFormatter

#: The modules that add commands, in the order their commands are listed by ``--help``.
COMMAND_MODULES = (plates, embeddings, dictionary, compare, passes, reports, demo)


def build_parser() -> argparse.ArgumentParser:
    from plate_concepts import __version__

    parser = argparse.ArgumentParser(
        prog="plate-concepts",
        description="Find biological concepts in microscopy foundation-model embeddings of plates.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CommandParser)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    for command in sub.choices.values():
        command.formatter_class = HelpFormatter
        # SUPPRESS: a command's own default must not hide `plate-concepts --debug COMMAND`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=DEBUG_HELP)
    return parser


DEBUG_HELP = "on an error, show the full traceback (for a bug report) instead of one line"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Every failure ends with one line ``plate-concepts COMMAND: error: ...``
    on stderr and exit status 2 (1 for an unexpected error, which may be a bug: ``--debug``
    shows its traceback); Ctrl-C ends with status 130. Warnings are one line each too."""
    args = build_parser().parse_args(argv)
    # A command started from the shell may run itself again (under a virtual display); one
    # called from Python (argv given) never replaces its caller's process.
    args.rerunnable = argv is None
    prefix = f"plate-concepts {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: tqdm.write(
            f"{prefix}: warning: {_one_line(str(message))}", file=sys.stderr
        )
        try:
            refuse_urls(args)
            return args.run(args)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except InterruptedError as cancelled:  # a Ctrl-C that the work turned into a clean stop
            print(f"{prefix}: interrupted: {_one_line(str(cancelled))}", file=sys.stderr)
            return 130
        except Exception as error:
            if args.debug:
                raise
            print(f"{prefix}: error: {describe_error(error)}", file=sys.stderr)
            return 2 if is_expected(error) else 1


#: Options whose value is a network address, not a file.
ADDRESS_OPTIONS = frozenset({"scheduler"})
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def refuse_urls(args: argparse.Namespace) -> None:
    """Refuse a URL where a path is expected (``s3://...`` would otherwise be read as the local
    path ``s3:/...``), saying why and what to give instead."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list | tuple) else [value]:
            if name not in ADDRESS_OPTIONS and isinstance(item, str) and URL.match(item):
                raise CommandError(
                    f"{item} is a URL, but plates, stores, dictionaries and passes are read and "
                    "written on a file system (local, or one every Dask worker mounts, such as "
                    "NFS): outputs are committed by an atomic rename, which object stores do not "
                    "offer. Copy it or mount it (s3fs, rclone mount, gcsfuse) and give its path"
                )


EXPECTED_ERRORS = (
    CommandError, ValueError, KeyError, OSError, ImportError, ArithmeticError, MemoryError,
)  # fmt: skip
"""Failures of the input, the disk or the numbers, not of this program."""


def is_expected(error: BaseException) -> bool:
    """Whether an error is a failure of the input, disk or numbers (else perhaps a bug). A
    KeyError is expected when it says something (our messages are sentences); a bare key
    (``KeyError: 'n_wells'``) is a lookup the program did not guard."""
    if isinstance(error, KeyError):
        return bool(error.args) and " " in str(error.args[0])
    return isinstance(error, EXPECTED_ERRORS)


def describe_error(error: BaseException) -> str:
    """One line saying what went wrong, naming the file where the error knows it."""
    if isinstance(error, KeyError) and is_expected(error):
        text = str(error.args[0])
    elif isinstance(error, OSError) and error.errno is not None and error.strerror:
        files = " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None)
        text = f"{error.strerror}{': ' + files if files else ''}"
        if error.errno == errno.ENOSPC:
            text += " (the disk is full: free some space or write the output elsewhere)"
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            text += " (you cannot write or read there: choose another path or fix its permissions)"
    elif isinstance(error, (FloatingPointError, OverflowError)):
        text = str(error)
        if not re.search(r"diverg|overflow|\binf\b|\bnan\b", text, re.IGNORECASE):
            text = f"the numbers overflowed ({text or type(error).__name__}): the computation diverged"
    elif isinstance(error, MemoryError):
        text = f"not enough memory ({error or 'MemoryError'}): try a smaller --batch-size"
    elif isinstance(error, ImportError) and error.name and error.name not in str(error):
        text = f"cannot import {error.name}: {error}"
    elif is_expected(error):
        text = str(error) or type(error).__name__
    else:
        text = (
            f"{type(error).__name__}: {error} (unexpected: run again with --debug to see where it "
            "happened, and report it if it looks like a bug)"
        )
    return _one_line(text)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
