"""``cns world ...`` (build the benchmark world) and ``cns bench world`` (run the benchmark)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _device(name: str) -> str:
    from cns.device import pick_device

    return str(pick_device(name))


def cmd_judge(args: argparse.Namespace) -> int:
    from world.judge import train_judge
    from world.scene import load_concepts

    judge = train_judge(load_concepts(args.concepts), args.out, steps=args.steps, device=_device(args.device),
                        progress=not args.quiet)
    print(json.dumps(judge.record["validation"], indent=2))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from world.judge import load_judge
    from world.metrics import attribute_accuracy, base_prompts
    from world.model import PretrainConfig, pretrain

    config = PretrainConfig(**({"steps": args.steps} if args.steps else {}))

    def evaluate(model):
        judge = load_judge(args.judge)
        model.to(_device(args.device))
        out = {which: attribute_accuracy(model, judge, base_prompts(which, per_pair=args.eval_per_pair), seed=10_000)
               for which in ("heldout", "seen")}
        model.to("cpu")
        return out

    record = pretrain(args.out, config, device=_device(args.device), progress=not args.quiet, evaluate_fn=evaluate)
    print(json.dumps({k: record[k] for k in ("device", "train_seconds", "seconds_per_step", "final_loss",
                                             "evaluation")}, indent=2))
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    from world.concepts import write_concept_dirs
    from world.scene import load_concepts

    paths = write_concept_dirs(load_concepts(args.concepts), args.out, images=args.images)
    print(f"wrote {len(paths)} concept directories to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from world.bench import BenchSettings, run_benchmark

    settings = BenchSettings.smoke() if args.smoke else BenchSettings()
    if args.concepts_count:
        settings.concepts = args.concepts_count
    if args.methods:
        settings.methods = args.methods.split(",")
    out = run_benchmark(settings, Path(args.out), device=_device(args.device))
    print(f"wrote the results to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from world.judge import JUDGE_DIR
    from world.model import MODEL_DIR
    from world.scene import CONCEPTS_FILE

    world = sub.add_parser("world", help="build the benchmark world (judge, pretrained model, concept folders)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="STEP")
    p = wsub.add_parser("judge", help="train and validate the world's identity judge")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", default=str(JUDGE_DIR))
    p.set_defaults(func=cmd_judge)
    p = wsub.add_parser("pretrain", help="pretrain the world's text-to-image model from scratch")
    p.add_argument("--steps", type=int, default=None, help="default: world.model.PretrainConfig.steps")
    p.add_argument("--out", default=str(MODEL_DIR))
    p.add_argument("--judge", default=str(JUDGE_DIR))
    p.add_argument("--eval-per-pair", type=int, default=4)
    p.set_defaults(func=cmd_pretrain)
    p = wsub.add_parser("concepts", help="render each concept's training photos as a cns concept folder")
    p.add_argument("--out", default="data/world/concepts")
    p.add_argument("--images", type=int, default=5)
    p.set_defaults(func=cmd_concepts)
    for p in wsub.choices.values():
        p.add_argument("--concepts", default=str(CONCEPTS_FILE), help="the concepts data file")
        p.add_argument("--device", default="auto")
        p.add_argument("-q", "--quiet", action="store_true")

    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    p = bsub.add_parser("world", help="CNS against the baselines in the benchmark world")
    p.add_argument("--smoke", action="store_true", help="2 concepts, few steps (the test's size)")
    p.add_argument("--concepts-count", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--out", default="docs/world")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
