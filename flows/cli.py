"""The ``cns`` command: the library's commands (learn, generate, export, info) from ``cns.cli``
and the pipeline's (stack, drop, ...) that need ``tasks``/``flows``. Heavy imports stay inside
the command functions so that ``cns --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import sys

from cns import cli as library_cli
from cns.errors import CNSError
from world import cli as world_cli


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that talk to the stack and the bucket (see tasks.stack, tasks.bucket)."""
    try:
        from tasks import stack_cli
    except ImportError:  # pipeline extras not installed: library commands still work
        return
    from flows import commands

    stack_cli.add_commands(sub)
    commands.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cns", description="Continual personalization with Concept Neuron Selection")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    library_cli.add_commands(sub)
    world_cli.add_commands(sub)
    add_pipeline_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args) or 0
    except CNSError as exc:
        print(f"cns: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cns: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
