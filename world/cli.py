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
    from dataclasses import replace

    from world.model import pretrain
    from world.params import pretrain_config

    config = pretrain_config(args.params)
    if args.steps:
        config = replace(config, steps=args.steps)
    if args.batch_size:  # e.g. 256 on a GPU, with fewer steps and its own --checkpoint folder
        config = replace(config, batch_size=args.batch_size)
    state = pretrain(args.checkpoint, config, device=_device(args.device), budget_minutes=args.budget_minutes,
                     checkpoint_minutes=args.checkpoint_minutes, progress=not args.quiet)
    print(f"pretraining: step {state['step']} of {config.steps}, {state['train_seconds'] / 60:.1f} min in all; "
          f"checkpoint in {args.checkpoint}")
    if state["step"] < config.steps:
        print("not finished: run the same command again to resume")
        return 0
    return export(args)


def export(args: argparse.Namespace) -> int:
    from world.model import export_model

    def evaluate(model):
        from world.judge import load_judge
        from world.metrics import attribute_accuracy, base_prompts

        judge = load_judge(args.judge)
        model.to(_device(args.device))
        out = {which: attribute_accuracy(model, judge, base_prompts(which, per_pair=args.eval_per_pair), seed=10_000)
               for which in ("heldout", "seen")}
        model.to("cpu")
        return out

    record = export_model(args.checkpoint, args.out, evaluate_fn=None if args.no_eval else evaluate)
    print(json.dumps({k: record.get(k) for k in ("steps_done", "complete", "train_seconds", "final_loss",
                                                 "evaluation")}, indent=2))
    print(f"wrote the model to {args.out}")
    return 0


def cmd_concepts(args: argparse.Namespace) -> int:
    from world.concepts import write_concept_dirs
    from world.scene import load_concepts

    paths = write_concept_dirs(load_concepts(args.concepts), args.out, images=args.images)
    print(f"wrote {len(paths)} concept directories to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from world.bench import BenchSettings, run_benchmark
    from world.params import bench_settings

    settings = BenchSettings.smoke() if args.smoke else bench_settings(args.params)
    if args.concepts_count:
        settings.concepts = args.concepts_count
    if args.methods:
        settings.methods = args.methods.split(",")
    if args.seeds:
        settings.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else None
    if args.sweep:
        from world.sweeps import budget_curve, tune

        sweep = tune if args.sweep == "tune" else budget_curve
        sweep(settings, out, cache or out / f"{args.sweep}-cache", device=_device(args.device))
    else:
        run_benchmark(settings, out, cache=cache, device=_device(args.device))
    print(f"wrote the results to {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    from world.judge import JUDGE_DIR
    from world.model import CHECKPOINT_DIR, MODEL_DIR
    from world.scene import CONCEPTS_FILE

    world = sub.add_parser("world", help="build the benchmark world (judge, pretrained model, concept folders)")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="STEP")
    p = wsub.add_parser("judge", help="train and validate the world's identity judge")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=str(JUDGE_DIR))
    p.set_defaults(func=cmd_judge)
    p = wsub.add_parser("pretrain", help="pretrain the world's text-to-image model (resumes from its checkpoint)")
    p.add_argument("--params", default=None, help="default: data/world/params.yaml (world.pretrain)")
    p.add_argument("--steps", type=int, default=None, help="default: world.pretrain.steps of --params")
    p.add_argument("--batch-size", type=int, default=None, help="default: world.pretrain.batch_size of --params")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="stop (checkpoint saved) after this much wall clock; run again to resume")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.set_defaults(func=cmd_pretrain)
    e = wsub.add_parser("export", help="write the checkpoint's EMA weights as the model folder (even mid-run)")
    e.set_defaults(func=export)
    for q in (p, e):
        q.add_argument("--checkpoint", default=str(CHECKPOINT_DIR))
        q.add_argument("--out", default=str(MODEL_DIR))
        q.add_argument("--judge", default=str(JUDGE_DIR))
        q.add_argument("--eval-per-pair", type=int, default=4)
        q.add_argument("--no-eval", action="store_true", help="skip the held-out caption evaluation")
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
    p.add_argument("--params", default=None, help="default: data/world/params.yaml (world.bench)")
    p.add_argument("--sweep", choices=("tune", "budget"), default=None,
                   help="tune: each method family's learning rates on the validation concepts (-> tuned.json); "
                        "budget: scored vs random/bottom/gradient rows at 2/6/15%% budgets (-> budget.md)")
    p.add_argument("--concepts-count", type=int, default=None)
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--cache", default=None, help="finished runs are kept here and not run again "
                                                  "(default OUT/cache); delete a file to rerun it")
    p.add_argument("--out", default="docs/world")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
