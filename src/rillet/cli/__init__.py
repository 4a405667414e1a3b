"""`rillet` command line: serve | chat | generate | bench.

Each subcommand lives in its own module exposing `add_parser(subparsers)`, which
registers the subcommand and sets `func` on the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("serve", "chat", "generate", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rillet",
        description="rillet: a streaming LLM inference server with continuous batching.",
    )
    from rillet import __version__

    parser.add_argument("--version", action="version", version=f"rillet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"rillet.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rillet.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # bad configuration: say so plainly, no traceback
        print(f"rillet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
