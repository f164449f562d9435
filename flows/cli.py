"""The ``cns`` command, and its one parser: every subcommand's options are declared here, next
to each other, so one vocabulary holds (``--params`` for a params file, option names equal to the
config keys). The handlers live with their layer: ``cns/commands.py`` (the library: learn,
generate, ...), ``world/commands.py`` (the benchmark world), ``flows/commands.py`` (the pipeline's
flows) and ``flows/stack_commands.py`` (the stack and the bucket). Heavy imports stay inside the
handlers so that ``cns --help`` is quick; the pipeline's handlers need the pipeline extras and say
so in one line when they are missing."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cns import commands as library
from cns.errors import CNSError
from flows import commands as pipeline
from flows import stack_commands as stackcmd
from world import commands as world


# What `pip install 'cns-pipeline[pipeline]'` adds; the pipeline commands import them lazily.
PIPELINE_PACKAGES = frozenset({"boto3", "botocore", "mlflow", "prefect", "dvc"})
# Loggers whose INFO lines a user reads; everything else (httpx, botocore, mlflow's run links,
# Prefect's client and task-run states) shows only warnings and errors unless -v.
OWN_LOGGERS = ("cns", "tasks", "flows", "world", "prefect.flow_runs")


def _add_library_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="config file (default: params.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_train_steps=50")
    common.add_argument("--model-dir", help="cumulative model directory (default: model_dir in the config)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("learn", parents=[common], help="learn a concept directory into the model")
    p.add_argument("concept_dir", help="directory with images and concept.yaml")
    p.set_defaults(func=library.cmd_learn)

    p = sub.add_parser("forget", parents=[common], help="write a version without a learned concept (no training)")
    p.add_argument("name", help="the concept's name (cns info lists them)")
    p.set_defaults(func=library.cmd_forget)

    p = sub.add_parser("generate", parents=[common], help="generate PNG images from prompts")
    p.add_argument("prompts", nargs="+", help="prompts; may hold several learned tokens")
    p.add_argument("--out", default="outputs/generate", help="output directory")
    p.add_argument("--num-images-per-prompt", "--num-images", dest="num_images_per_prompt", type=int,
                   help="images per prompt (generate.num_images_per_prompt)")
    p.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int,
                   help="sampling steps (generate.num_inference_steps)")
    p.add_argument("--seed", type=int, help="generate.seed")
    p.add_argument("--region", action="append", default=[], metavar="BOX=PROMPT",
                   help="a regional prompt read only inside BOX (left, right, top, bottom, full or x0,y0,x1,y1 "
                        "in 0..1), e.g. --region 'left=a <dog1> dog on a sofa'; repeat per concept")
    p.add_argument("--region-base", dest="region_base", type=float, metavar="W",
                   help="the global prompt's share inside the regions, 0..1 (generate.region_base; "
                        "0: each region reads its own prompt alone)")
    p.set_defaults(func=library.cmd_generate)

    p = sub.add_parser("export", parents=[common], help="write a merged diffusers pipeline directory")
    p.add_argument("out", help="new directory to write")
    p.set_defaults(func=library.cmd_export)

    p = sub.add_parser("info", parents=[common], help="table of the learned concepts and their neurons")
    p.add_argument("--per-layer", action="store_true", help="a column per K/V layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=library.cmd_info)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate every concept; write metrics/ (DVC stage)")
    p.add_argument("--out", default="metrics", help="output directory (default: metrics)")
    p.add_argument("--datasets", help="learned datasets (default: <model dir>/../datasets)")
    p.set_defaults(func=library.cmd_evaluate)

    p = sub.add_parser("calibrate", parents=[common], help="compute (or check) the base model's general neurons")
    p.set_defaults(func=library.cmd_calibrate)


def _add_world_commands(sub: argparse._SubParsersAction) -> None:
    from world.judge import JUDGE_DIR
    from world.scene import CONCEPTS_FILE

    parser = sub.add_parser("world", help="build the benchmark world (judge, pretrained model, concept folders)")
    wsub = parser.add_subparsers(dest="world_command", required=True, metavar="STEP")
    p = wsub.add_parser("judge", help="train and validate the world's identity judge")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=str(JUDGE_DIR))
    p.set_defaults(func=world.cmd_judge)
    p = wsub.add_parser("pretrain", help="pretrain the world's text-to-image model (resumes from its checkpoint)")
    p.add_argument("--params", default=None, help="default: data/world/params.yaml (world.pretrain)")
    p.add_argument("--steps", type=int, default=None, help="default: world.pretrain.steps of --params")
    p.add_argument("--batch-size", type=int, default=None, help="default: world.pretrain.batch_size of --params")
    p.add_argument("--width", type=int, default=None,
                   help="K/V rows per cross-attention layer and text width (default: world.pretrain.width of --params, 64); "
                        "another width has its own folders: data/world/pretrain-W and model-W")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="stop (checkpoint saved) after this much wall clock; run again to resume")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.set_defaults(func=world.cmd_pretrain)
    e = wsub.add_parser("export", help="write the checkpoint's EMA weights as the model folder (even mid-run)")
    e.set_defaults(func=world.export)
    for q in (p, e):
        q.add_argument("--checkpoint", default=None,
                       help="default: data/world/pretrain (pretrain-W for another width W)")
        q.add_argument("--out", default=None, help="default: data/world/model (model-W for another width W)")
        q.add_argument("--judge", default=str(JUDGE_DIR))
        q.add_argument("--eval-per-pair", type=int, default=4)
        q.add_argument("--no-eval", action="store_true", help="skip the held-out caption evaluation")
    p = wsub.add_parser("concepts", help="render each concept's training photos as a cns concept folder")
    p.add_argument("--out", default="data/world/concepts")
    p.add_argument("--images", type=int, default=5)
    p.set_defaults(func=world.cmd_concepts)
    for p in wsub.choices.values():
        p.add_argument("--concepts", default=str(CONCEPTS_FILE), help="the concepts data file")
        p.add_argument("--device", default="auto")
        p.add_argument("-q", "--quiet", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    p = bsub.add_parser("world", help="CNS against the baselines in the benchmark world")
    p.add_argument("--smoke", action="store_true", help="2 concepts, few steps (the test's size)")
    p.add_argument("--params", default=None, help="default: data/world/params.yaml (world.bench)")
    p.add_argument("--sweep", choices=("gate", "tune", "budget"), default=None,
                   help="gate: the all-K/V ceiling on the validation concepts only, the quick check of a world "
                        "model (-> gate.json); tune: each method family's learning rates on the validation "
                        "concepts (-> tuned.json, with the gate); budget: scored vs random/bottom/gradient rows "
                        "at 6/15/25%% budgets (-> budget.md)")
    p.add_argument("--cell", action="append", default=None, metavar="LR,TOKEN_LR,STEPS",
                   help="gate/tune: only this cell of the grid (repeatable), e.g. 3e-3,5e-2,1600: a new world "
                        "model's gate on a CPU in minutes; cells are cached for the full sweep")
    p.add_argument("--concepts-count", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--cache", default=None, help="finished runs are kept here and not run again "
                                                  "(default OUT/cache); delete a file to rerun it")
    p.add_argument("--out", default="docs/world")
    p.add_argument("--device", default="auto")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only every N-th run from the K-th into the cache and write no report: N such "
                        "processes side by side (one GPU holds many), then once more without --shard")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=world.cmd_bench)


def _add_stack_commands(sub: argparse._SubParsersAction) -> None:
    from tasks.stack import SERVICES

    parser = sub.add_parser("stack", help="start, stop or check the local S3 + MLflow + Prefect servers and "
                            "the bucket-event relay")
    stack_sub = parser.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    for name, func, text in (("up", stackcmd.cmd_up, "start what is not running and wait until all are healthy"),
                             ("down", stackcmd.cmd_down, "stop the servers this stack started"),
                             ("status", stackcmd.cmd_status, "health of each server (exit 1 unless all are running)"),
                             ("env", stackcmd.cmd_env,
                              "print the export lines for this stack (eval \"$(cns stack env)\")")):
        p = stack_sub.add_parser(name, help=text, description=text)
        p.add_argument("--dir", help="stack directory (default: $CNS_STACK_DIR or .stack)")
        if name == "up":
            for service in SERVICES:
                p.add_argument(f"--{service}-port", type=int, help=f"port (default: $CNS_{service.upper()}_PORT, "
                               "the last one used, or the standard one)")
            p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health (default 60)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)

    for_workspace = argparse.ArgumentParser(add_help=False)
    for_workspace.add_argument("--workspace", help="the workspace whose params.yaml holds the limits and whose "
                               "model says what is learned (default: $CNS_WORKSPACE or the current directory, "
                               "if it is one)")
    for_workspace.add_argument("--params", "--config", dest="params",
                               help="take the limits from this params file instead of the workspace's")
    p = sub.add_parser("drop", parents=[for_workspace],
                       help="upload a concept directory to the bucket (images first, concept.yaml last)")
    p.add_argument("directory", help="local concept directory (images + concept.yaml)")
    p.set_defaults(func=stackcmd.cmd_drop)

    p = sub.add_parser("datasets", parents=[for_workspace], help="list the bucket's datasets with hash and state")
    p.add_argument("--state", choices=("pending", "learned", "rejected", "incomplete", "settling"),
                   help="only datasets in this state")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=stackcmd.cmd_datasets)


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", help="the DVC workspace (default: $CNS_WORKSPACE or the current directory)")
    results = argparse.ArgumentParser(add_help=False)
    results.add_argument("--json", action="store_true", help="print the flow's result as JSON")

    p = sub.add_parser("init", help="create a workspace: git + DVC with an S3 remote in the bucket")
    p.add_argument("directory")
    p.set_defaults(func=pipeline.cmd_init)

    p = sub.add_parser("run-once", parents=[common, results],
                       help="one watch pass in this process: learn every pending dataset")
    p.set_defaults(func=pipeline.cmd_run_once)

    p = sub.add_parser("personalize", parents=[common, results],
                       help="learn one dataset of the bucket (incoming/CONCEPT/)")
    p.add_argument("concept")
    p.set_defaults(func=pipeline.cmd_personalize)

    p = sub.add_parser("nightly", parents=[common, results],
                       help="run the nightly flow now: watch, then re-check every concept")
    p.set_defaults(func=pipeline.cmd_nightly)

    p = sub.add_parser("serve", parents=[common],
                       help="serve watch, nightly, personalize and forget to the Prefect server; learn within "
                            "seconds of a bucket event")
    p.set_defaults(func=pipeline.cmd_serve)

    p = sub.add_parser("forget-version", parents=[common, results],
                       help="remove a learned concept through the pipeline: a new version, MLflow run and "
                            "registry version (the library's `cns forget` only writes the model directory)")
    p.add_argument("concept")
    p.set_defaults(func=pipeline.cmd_forget_version)

    parser = sub.add_parser("lineage", help="lineages that live in S3 alone, learned by the workers of a work pool")
    lineage_sub = parser.add_subparsers(dest="lineage_command", required=True, metavar="ACTION")
    p = lineage_sub.add_parser("create", help="a new lineage in a bucket: its workspace published as "
                               "git/model-v0.bundle")
    p.add_argument("bucket")
    p.add_argument("--model-name", required=True, help="its MLflow experiment, registered model and Prefect lock")
    p.add_argument("--params", help="its params.yaml (default: the project's)")
    p.set_defaults(func=pipeline.cmd_lineage_create)
    p = lineage_sub.add_parser("pass", parents=[results], help="one watch pass of the lineage in this process")
    p.add_argument("bucket")
    p.set_defaults(func=pipeline.cmd_lineage_pass)
    p = lineage_sub.add_parser("deploy", help="deploy the lineage flow to a process work pool")
    p.add_argument("--pool", default="cns-lineages")
    p.set_defaults(func=pipeline.cmd_lineage_deploy)
    p = lineage_sub.add_parser("run", help="queue a lineage pass per bucket for the pool's workers")
    p.add_argument("buckets", nargs="+")
    p.set_defaults(func=pipeline.cmd_lineage_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cns", description="Continual personalization with Concept Neuron Selection")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the INFO logs of libraries (HTTP requests, Prefect task states)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_library_commands(sub)
    _add_world_commands(sub)
    # The pipeline's commands are always listed; without the pipeline extras they end in one line
    # that says what to install (main()).
    _add_stack_commands(sub)
    _add_pipeline_commands(sub)
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
