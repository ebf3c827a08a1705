"""Command line: the same pipeline as the napari panels, without a screen.

``plate-concepts <command> --help`` documents each command. Each module of this package adds its
commands to the parser (``add_commands``) and runs them; commands never import Qt or napari,
except ``view`` and ``demo-run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from plate_concepts.cli import demo, dictionary, embeddings, plates

#: The modules that add commands, in the order their commands are listed by ``--help``.
COMMAND_MODULES = (plates, embeddings, dictionary, demo)


def build_parser() -> argparse.ArgumentParser:
    from plate_concepts import __version__

    parser = argparse.ArgumentParser(
        prog="plate-concepts",
        description="Find biological concepts in microscopy foundation-model embeddings of plates.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"plate-concepts {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"plate-concepts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
