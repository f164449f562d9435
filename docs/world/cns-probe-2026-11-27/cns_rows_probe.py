"""Can CNS's rows carry a concept on the finished world model? One validation concept, learned
alone on the pretrained model with CNS's selection at a row budget, with or without L_reg and its
generic output prior; seed 0, 24 samples. Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python docs/world/cns-probe-2026-11-27/cns_rows_probe.py \
        plusdot --steps 1600 --lr 3e-3 --ratio 0.1 --variant no-reg --variant reg --variant generic=0.01

Variants: ``kv`` (every K/V row, no L_reg: the ceiling's learner), ``no-reg`` (the bench's cns_no_reg), ``reg`` (the library's L_reg as configured),
``no-reg-random`` (random free rows, same count per layer, no L_reg), ``generic=W`` (L_reg with the generic output prior's weight set to W). The pretrained model's
zero-shot strip comes from the committed tune cache (docs/world/tune-cache); with ``--model`` (another
world model, e.g. data/world/model-128) it is drawn once and cached in ``--work``.
"""

import argparse
import time
from dataclasses import replace
from pathlib import Path

import world.bench as wb
from world.bench import METHODS, BenchSettings, Hyper, context, load_images, run_method
from world.scene import load_concepts

parser = argparse.ArgumentParser()
parser.add_argument("concept", help="a concept, or several comma-separated (learned in that order)")
parser.add_argument("--steps", type=int, default=1600)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--token-lr", type=float, default=5e-2)
parser.add_argument("--ratio", type=float, default=0.06)
parser.add_argument("--variant", action="append", default=[])
parser.add_argument("--work", default="/tmp/cns-rows-probe")
parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a CNS setting for every variant, e.g. train.reg_generic_weight=0 or selection.exclude_owned=false")
parser.add_argument("--model", default=None, help="a world model folder other than data/world/model")
parser.add_argument("--combine", default="alone", choices=("alone", "sequential"),
                    help="sequential: the one concept in sequence, which also reads zero-shot drift")
args = parser.parse_args()
names = args.concept.split(",")
concepts = sorted((c for c in load_concepts() if c.name in names), key=lambda c: names.index(c.name))
overrides = []
for item in args.set:
    key, value = item.split("=", 1)
    section, field = key.split(".")
    overrides.append((section, field, {"true": True, "false": False}.get(value.lower(), value)))
settings = {"model_dir": args.model} if args.model else {}
if args.model:  # the pretrained model's own zero-shot strip (the drift's reference), drawn once
    wb.baseline(context(BenchSettings(cns={}, **settings), concepts, Path(args.work) / "baseline", "cpu"),
                Path(args.work) / "baseline")
    base_images = load_images(Path(args.work) / "baseline" / "pretrained-zero-shot.png")
else:
    base_images = load_images(Path("docs/world/tune-cache/pretrained-zero-shot.png"))
make_config = wb.cns_config
for variant in args.variant or ["reg"]:
    name = {"no-reg": "cns_no_reg", "kv": "naive_kv", "no-reg-random": "cns_no_reg"}.get(variant, "cns")
    method = replace(METHODS[name], combine=args.combine, rows="random" if variant.endswith("random") else "taylor")
    changes = list(overrides) + ([("train", "reg_generic_weight", variant.split("=")[1])]
                                 if variant.startswith("generic=") else [])

    def patched(*a, changes=changes, **k):
        config = make_config(*a, **k)
        for section, field, value in changes:
            part = getattr(config, section)
            kind = type(getattr(part, field))
            config = replace(config, **{section: replace(part, **{field: value if kind is bool else kind(value)})})
        return config
    wb.cns_config = patched
    tag = "".join(f"-{f}={v}" for _, f, v in overrides)
    work = Path(args.work) / f"{Path(args.model).name + '-' if args.model else ''}{'+'.join(names)}-{variant}-{args.ratio:g}-{args.steps}-lr{args.lr:g}-tok{args.token_lr:g}{tag}"
    # The library's CNS settings (as these probes ran), not the world defaults they led to; --set changes them.
    ctx = context(BenchSettings(base_ratio=args.ratio, cns={}, **settings), concepts, work, "cpu")
    start = time.time()
    # One concept "in sequence": the same learning as alone, plus the zero-shot readings of the
    # model afterwards (base captions: accuracy and mean pixel change against the pretrained model).
    run = run_method(method, 0, ctx, base_images, work / "samples.png",
                     hyper=Hyper(args.lr, args.token_lr, args.steps))
    for right_after, r in zip(run["just_learned"][:-1], run["final"][:-1]):  # earlier concepts: what was forgotten
        print(f"  {r['concept']}: identity {right_after['identity']:.2f} -> {r['identity']:.2f}, "
              f"bitmap {right_after['bitmap']:.2f} -> {r['bitmap']:.2f}")
    r = run["final"][-1]
    drift = (f" zero-shot all {run['zero_shot']['all']:.2f} pixel change {run['zero_shot_pixel_change']:.4f}"
             if "zero_shot" in run else "")
    closed = (f" protected directions {run['protected_directions']}" if run.get("protected_directions") else "")
    print(f"{args.concept} {variant}{tag} rows {args.ratio:g} ({run['rows']}){closed} {args.steps} steps lr {args.lr:g} token lr {args.token_lr:g}: "
          f"identity {r['identity']:.2f} bitmap {r['bitmap']:.2f} similarity {r['similarity']:.2f}{drift} "
          f"({time.time() - start:.0f} s)", flush=True)
    if run.get("pairs"):  # several concepts in sequence: each with the next in one image, left and right
        independent = sum(run["pairs_independent"]) / len(run["pairs_independent"])
        print(f"  two concepts in one image, both right: plain {run['pairs']['pair_both']:.2f}, regions "
              f"{run['pairs_regions']['pair_both']:.2f} (base {ctx.settings.region_base:g}), independent {independent:.2f} "
              f"({run['pairs']['samples']} samples each)", flush=True)
