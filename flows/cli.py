"""The ``cns`` command: the library's commands (learn, generate, export, info) from ``cns.cli``
and the pipeline's (stack, drop, ...) that need ``tasks``/``flows``. Heavy imports stay inside
the command functions so that ``cns --help`` is instant."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cns import cli as library_cli
from cns.errors import CNSError
from world import cli as world_cli


# What `pip install 'cns-pipeline[pipeline]'` adds; the pipeline commands import them lazily.
PIPELINE_PACKAGES = frozenset({"boto3", "botocore", "mlflow", "prefect", "dvc"})
# Loggers whose INFO lines a user reads; everything else (httpx, botocore, mlflow's run links,
# Prefect's client and task-run states) shows only warnings and errors unless -v.
OWN_LOGGERS = ("cns", "tasks", "flows", "world", "prefect.flow_runs")


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Commands that talk to the stack and the bucket (see tasks.stack, tasks.bucket). They are
    always listed; without the pipeline extras they end in one line that says what to install."""
    from tasks import stack_cli
    from flows import commands

    stack_cli.add_commands(sub)
    commands.add_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cns", description="Continual personalization with Concept Neuron Selection")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the INFO logs of libraries (HTTP requests, Prefect task states)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    library_cli.add_commands(sub)
    world_cli.add_commands(sub)
    add_pipeline_commands(sub)
    return parser


def _own(name: str) -> bool:
    return any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def setup_logging(verbose: bool) -> None:
    """INFO from this project; from libraries only warnings (with ``verbose``: their INFO too, and
    this project's DEBUG). A filter on the handler, not logger levels, because Prefect sets its
    loggers' levels when it is imported; what Prefect sends to its server is unaffected."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or _own(record.name))
        # MLflow logs through a handler of its own (set up when it is imported, from this
        # variable) and prints its "View run" links straight to stdout.
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it is imported already
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if verbose:
        for name in OWN_LOGGERS[:-1]:
            logging.getLogger(name).setLevel(logging.DEBUG)


def missing_extras(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").split(".")[0] in PIPELINE_PACKAGES


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args) or 0
    except CNSError as exc:
        print(f"cns: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if not missing_extras(exc):
            raise
        print(f"cns: error: `cns {args.command}` needs the pipeline extras ({exc.name} is not installed): "
              "pip install 'cns-pipeline[pipeline]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cns: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
