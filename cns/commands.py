"""The library's commands: learn, forget, generate, export, info, calibrate, evaluate.

Their options are declared with every other command's in ``flows/cli.py``, the one parser. Each command
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
    from cns.regions import check_base, parse_region

    config = _config(args)
    # The options are the generate section's keys; the config itself is not changed.
    gen = dataclasses.replace(config.generate, **{key: getattr(args, key) for key in
                                                   ("num_images_per_prompt", "num_inference_steps", "seed",
                                                    "region_base") if getattr(args, key) is not None})
    check_base(gen.region_base, "--region-base")
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
    from cns.lineage import datasets_dir

    config = _config(args)
    model_dir = _model_dir(args, config)
    cumulative = open_model(model_dir, config)
    datasets = Path(args.datasets) if args.datasets else datasets_dir(model_dir.parent)
    evaluation = evaluate_model(cumulative, config, load_judges(config.evaluate, cumulative.model.device),
                                datasets, progress=not args.quiet)
    paths = write_metrics(evaluation, args.out)
    for row in evaluation.rows():
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
