"""``cns world ...`` (build the benchmark world) and ``cns bench world`` (run the benchmark): the
handlers; their options are declared in ``flows/cli.py``, the one parser."""

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

    from world.model import pretrain, world_dirs
    from world.params import check_width, pretrain_config

    config = pretrain_config(args.params)
    if args.steps:
        config = replace(config, steps=args.steps)
    if args.batch_size:  # e.g. 256 on a GPU, with fewer steps and its own --checkpoint folder
        config = replace(config, batch_size=args.batch_size)
    if args.width:  # e.g. 128: CNS at SD-like row budgets (world.model.PretrainConfig.width)
        check_width(args.width, "cns world pretrain", "--width")
        config = replace(config, width=args.width)
    checkpoint, out = world_dirs(config.width)
    args.checkpoint, args.out = args.checkpoint or str(checkpoint), args.out or str(out)
    state = pretrain(args.checkpoint, config, device=_device(args.device), budget_minutes=args.budget_minutes,
                     checkpoint_minutes=args.checkpoint_minutes, progress=not args.quiet)
    print(f"pretraining: step {state['step']} of {config.steps}, {state['train_seconds'] / 60:.1f} min in all; "
          f"checkpoint in {args.checkpoint}")
    if state["step"] < config.steps:
        print("not finished: run the same command again to resume")
        return 0
    return export(args)


def export(args: argparse.Namespace) -> int:
    from world.model import CHECKPOINT_DIR, export_model, model_dir_for

    args.checkpoint = args.checkpoint or str(CHECKPOINT_DIR)
    args.out = args.out or str(model_dir_for(args.checkpoint))

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

    if args.quiet:  # the per-concept and per-run lines; warnings and the final line stay
        logging.getLogger("world").setLevel(logging.WARNING)
    settings = BenchSettings.smoke() if args.smoke else bench_settings(args.params)
    if args.concepts_count:
        settings.concepts = args.concepts_count
    if args.methods:
        settings.methods = args.methods.split(",")
    if args.seeds:
        settings.seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else None
    shard = _shard(args.shard) if args.shard else None
    from cns.errors import CNSError

    if args.cell and args.sweep not in ("gate", "tune"):
        raise CNSError("--cell", "only --sweep gate or --sweep tune runs single cells", "bad_argument")
    only = None
    if args.cell:
        from world.sweeps import parse_cell

        only = [parse_cell(text) for text in args.cell]
    if args.sweep:
        from world.sweeps import budget_curve, tune

        cache = cache or out / f"{'tune' if args.sweep == 'gate' else args.sweep}-cache"  # gate runs are tune runs
        if args.sweep == "budget":
            budget_curve(settings, out, cache, device=_device(args.device), shard=shard)
        else:
            tune(settings, out, cache, device=_device(args.device), gate_only=args.sweep == "gate", shard=shard,
                 only=only)
    else:
        run_benchmark(settings, out, cache=cache, device=_device(args.device), shard=shard)
    print(f"shard {args.shard}: its runs are in the cache; run again without --shard for the report" if shard
          else f"wrote the results to {out}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N."""
    from cns.errors import CNSError

    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k = n = -1
    if not 0 <= k < n:
        raise CNSError("--shard", f"'{text}' is not K/N with 0 <= K < N (e.g. 0/4)", "bad_argument")
    return k, n
