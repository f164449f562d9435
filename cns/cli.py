"""The library's commands: learn, forget, generate, export, info, calibrate, evaluate.

``flows/cli.py`` adds them to the ``cns`` command next to the pipeline's commands. Each command
loads the one config (``--params``, default params.yaml, plus ``--set key=value``), validates its
inputs before it changes anything, and reports problems as CNSError (one line, exit 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _config(args: argparse.Namespace):
    from cns.config import load_config

    return load_config(args.params, args.set)


def _model_dir(args: argparse.Namespace, config) -> Path:
    return Path(args.model_dir or config.model_dir)


def _model_lock(args: argparse.Namespace, config):
    """The model's lock, the one every pipeline pass takes too (``cns.lock``)."""
    from cns.lock import model_lock

    what = f"cns {getattr(args, 'command', 'learn')}"
    return model_lock(_model_dir(args, config), config.pipeline.lock_timeout_seconds, what=what)


def cmd_learn(args: argparse.Namespace) -> int:
    from cns.learn import learn

    config = _config(args)
    with _model_lock(args, config):
        cumulative, record, result = learn(_model_dir(args, config), args.concept_dir, config,
                                           progress=not args.quiet)
    s = record.stats
    print(f"learned '{record.name}' ({record.token}) as model v{record.version} in {_model_dir(args, config)}: "
          f"{s['neurons_total']} neurons, {s['weights_changed']:,} weights ({s['percent_unet_weights']:.4f}% of the "
          f"UNet), loss {result.losses[0] if result.losses else float('nan'):.4f} -> "
          f"{result.losses[-1] if result.losses else float('nan'):.4f} in {result.seconds:.1f}s")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from cns.forget import forget

    config = _config(args)
    with _model_lock(args, config):
        removal = forget(_model_dir(args, config), args.name)
    rows = removal["record"]["stats"].get("neurons_total", "?")
    print(f"removed '{removal['name']}' ({removal['token']}) as model v{removal['version']} in "
          f"{_model_dir(args, config)}: its {rows} rows are back at their values before it, its token is gone"
          + (f"; {removal['rows_kept_by_later_concepts']} of its rows keep a later concept's values"
             if removal["rows_kept_by_later_concepts"] else ""))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cns.cumulative import open_model
    from cns.generate import generate, grid, save_images
    from cns.regions import parse_region

    config = _config(args)
    # The options are the generate section's keys; the config itself is not changed.
    gen = dataclasses.replace(config.generate, **{key: getattr(args, key) for key in
                                                   ("num_images_per_prompt", "num_inference_steps", "seed")
                                                   if getattr(args, key) is not None})
    regions = [parse_region(text) for text in args.region]
    cumulative = open_model(_model_dir(args, config), config)
    images = generate(cumulative.model, args.prompts, gen, progress=not args.quiet, regions=regions)
    paths = save_images(images, args.prompts, args.out)
    grid(images).save(Path(args.out) / "grid.png")
    print(f"wrote {len(paths)} images and grid.png to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cns.cumulative import open_model
    from cns.generate import export

    config = _config(args)
    cumulative = open_model(_model_dir(args, config), config, device="cpu")
    out = export(cumulative.model, args.out)
    print(f"exported model v{cumulative.lineage.version} ({len(cumulative.lineage.concepts)} concepts) to {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from cns.info import format_table, info

    config = _config(args)
    base, rows = info(_model_dir(args, config))
    if args.json:
        print(json.dumps({"base": base, "concepts": rows}, indent=2))
    else:
        print(format_table(base, rows, per_layer=args.per_layer))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cns.cumulative import open_model
    from cns.learn import general
    from cns.neurons import count

    config = _config(args)
    cumulative = open_model(_model_dir(args, config), config, device="cpu")
    mask, path = general(cumulative, config)
    print(f"{count(mask)} general neurons of {sum(l.rows for l in cumulative.layers)} K/V rows -> {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cns.cumulative import open_model
    from cns.evaluate import load_judges
    from cns.report import evaluate_model, write_metrics

    config = _config(args)
    model_dir = _model_dir(args, config)
    cumulative = open_model(model_dir, config)
    datasets = Path(args.datasets) if args.datasets else model_dir.parent / "concepts"
    evaluation = evaluate_model(cumulative, config, load_judges(config.evaluate, cumulative.model.device),
                                datasets, progress=not args.quiet)
    paths = write_metrics(evaluation, args.out)
    for row in evaluation.rows():
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="config file (default: params.yaml)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_train_steps=50")
    common.add_argument("--model-dir", help="cumulative model directory (default: model_dir in the config)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("learn", parents=[common], help="learn a concept directory into the model")
    p.add_argument("concept_dir", help="directory with images and concept.yaml")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("forget", parents=[common], help="write a version without a learned concept (no training)")
    p.add_argument("name", help="the concept's name (cns info lists them)")
    p.set_defaults(func=cmd_forget)

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
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", parents=[common], help="write a merged diffusers pipeline directory")
    p.add_argument("out", help="new directory to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", parents=[common], help="table of the learned concepts and their neurons")
    p.add_argument("--per-layer", action="store_true", help="a column per K/V layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate every concept; write metrics/ (DVC stage)")
    p.add_argument("--out", default="metrics", help="output directory (default: metrics)")
    p.add_argument("--datasets", help="learned datasets (default: <model dir>/../concepts)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", parents=[common], help="compute (or check) the base model's general neurons")
    p.set_defaults(func=cmd_calibrate)
