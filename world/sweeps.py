"""Two sweeps beside the main benchmark, each cached per cell and resumable like it:

- ``cns bench world --sweep tune``: every method family's learning rates, chosen on the two
  validation concepts by the pre-declared rule ``RULE``, written to ``docs/world/tuned.json``,
  which the benchmark reads (with the gate).
- ``cns bench world --sweep budget``: does *which* rows CNS trains matter? Row budgets of 6%, 15% and 25% (the default)
  of each layer, for Taylor-scored, gradient-norm, random and lowest-scored rows (the same count
  per layer from the same free pool), each concept alone on the pretrained model, paired over
  concepts x seeds on the continuous bitmap gain. Reported whichever way it goes.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from world.bench import (METHODS, TUNE_GRID, VALIDATION, BenchSettings, Hyper, baseline, context, in_shard,
                         load_images, method_run, shard_work)
from world.report import _cells, fmt, interval, paired, save_figure
from world.scene import load_concepts

FAMILY_METHOD = {"kv": "single_kv", "cns": "cns", "token": "token_only", "lora": "lora_seq"}  # the gate's first
RULE = ("the highest mean bitmap gain over the validation concepts, each learned alone on the pretrained model "
        "with training seed 0; within 0.01 of the best, fewer steps win, then the smaller learning rates (less "
        "compute and less drift for the same fidelity)")
BUDGETS = (0.06, 0.15, 0.25)  # 0.25: the world's default (data/world/params.yaml); 2% is one row a layer here
GATE = 0.8  # the world model must let the ceiling learn before any full benchmark run
ROWS = ("taylor", "gradient", "random", "bottom")


def _alone(name: str, **changes):
    return replace(METHODS[name], combine="alone", **changes)


def parse_cell(text: str) -> tuple[float, float, int]:
    """``LR,TOKEN_LR,STEPS`` (``--cell 3e-3,5e-2,1600``) -> (learning rate, token learning rate, steps)."""
    from cns.errors import CNSError

    try:
        lr, token_lr, steps = text.split(",")
        return float(lr), float(token_lr), int(steps)
    except ValueError:
        raise CNSError("--cell", f"'{text}' is not LR,TOKEN_LR,STEPS (e.g. 3e-3,5e-2,1600)", "bad_argument") from None


def tune(settings: BenchSettings, out: Path, cache: Path, device: str = "cpu", gate_only: bool = False,
         shard: tuple[int, int] | None = None, only: list[tuple[float, float, int]] | None = None) -> dict | None:
    """The tune sweep (-> ``tuned.json``); ``gate_only``: only the all-K/V ceiling, the gate's
    family (-> ``gate.json``): the quick check of a world model before the whole sweep.
    ``shard=(k, n)``: compute only every n-th cell from the k-th into ``cache`` and write no
    record (n such processes side by side fill the cache; a last run without a shard writes it).
    ``only``: just these (learning rate, token learning rate, steps) cells of the grid, the way to
    check a new world model's gate on a CPU in minutes instead of hours (each cell is cached as in
    the full sweep, which later reuses it); the record names them, a gate not passed on them is
    not a gate failed (the full grid may pass it), and a tune record over them is written as
    ``tuned-cells.json``, which the benchmark does not read."""
    steps = (settings.steps,) if settings.steps else TUNE_GRID["steps"]
    for cell in only or ():
        if cell[0] not in TUNE_GRID["learning_rate"] or cell[1] not in TUNE_GRID["token_learning_rate"] or \
                cell[2] not in steps:
            from cns.errors import CNSError

            grid = {**TUNE_GRID, "steps": steps}
            raise CNSError("--cell", f"{cell[0]:g},{cell[1]:g},{cell[2]} is not a cell of the tune grid {grid}", "bad_argument")
    concepts = [c for c in load_concepts() if c.name in VALIDATION]
    ctx = context(settings, concepts, cache / shard_work(shard), device)
    base = baseline(ctx, cache)
    base_images = load_images(cache / "pretrained-zero-shot.png")
    cells = [(family, lr, token_lr, n)
             for family in FAMILY_METHOD if not gate_only or family == "kv"  # the gate's family first
             for lr in ((0.0,) if family == "token" else TUNE_GRID["learning_rate"])
             for token_lr in TUNE_GRID["token_learning_rate"] for n in steps
             if only is None or (lr, token_lr, n) in only or family == "token" and (token_lr, n) in [c[1:] for c in only]]
    results, candidates = [], {}
    for i, (family, lr, token_lr, n) in enumerate(cells):
        if not in_shard(shard, i):
            continue
        hyper, name = Hyper(lr, token_lr, n), FAMILY_METHOD[family]
        run = method_run(cache / f"{family}-lr{lr:g}-tok{token_lr:g}-steps{n}.json", _alone(name), 0, ctx,
                         base_images, hyper=hyper)
        gain = float(np.mean(_cells({(name, 0): run}, name, "final", "bitmap_gain", base)))
        results.append({"family": family, **asdict(hyper), "bitmap_gain": gain,
                        "identity": float(np.mean([r["identity"] for r in run["final"]])),
                        "train_seconds": round(run["train_seconds"], 1), "device": run.get("device", "cpu")})
        candidates.setdefault(family, []).append((gain, hyper))
    if shard:
        return None
    chosen = {}
    for family, found in candidates.items():
        best = max(g for g, _ in found)
        near = [h for g, h in found if g >= best - 0.01]
        chosen[family] = asdict(min(near, key=lambda h: (h.steps, h.learning_rate, h.token_learning_rate)))
    ceiling = max((r["identity"] for r in results if r["family"] == "kv"), default=0.0)
    record = {"rule": RULE, "validation_concepts": list(VALIDATION),
              "grid": {k: list(v) for k, v in TUNE_GRID.items()} | {"steps": list(steps)},
              "results": results, "chosen": chosen,
              "gate": {"rule": f"all-K/V single-concept identity on the validation concepts >= {GATE}",
                       "kv_identity": ceiling, "passed": ceiling >= GATE}}
    if only is not None:
        record["only_cells"] = [list(c) for c in only]
        if ceiling < GATE:
            record["gate"]["passed"] = None  # not on these cells: the full grid decides
    if gate_only:
        record["model"] = _model_record(ctx)
    out.mkdir(parents=True, exist_ok=True)
    # a choice over some cells is not the rule's choice: the benchmark reads only tuned.json
    name = "gate.json" if gate_only else "tuned-cells.json" if only is not None else "tuned.json"
    (out / name).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _model_record(ctx) -> dict:
    """Which pretrained world model the gate was checked on (its export record)."""
    path = Path(ctx.settings.model_dir) / "pretrain.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"path": str(path.parent)}
    return {"path": str(path.parent), **{k: record.get(k) for k in ("steps_done", "complete", "final_loss",
                                                                     "evaluation")}}


def budget_curve(settings: BenchSettings, out: Path, cache: Path, device: str = "cpu",
                 shard: tuple[int, int] | None = None) -> dict | None:
    """The budget sweep (-> ``budget.json``, ``budget.md``, ``budget.png``); ``shard`` as in :func:`tune`."""
    from world.bench import benchmark_concepts

    concepts = benchmark_concepts(settings)
    ctx = context(settings, concepts, cache / shard_work(shard), device)
    base = baseline(ctx, cache)
    base_images = load_images(cache / "pretrained-zero-shot.png")
    runs: dict[tuple[str, int], dict] = {}
    for i, (ratio, rows, seed) in enumerate(itertools.product(BUDGETS, ROWS, settings.seeds)):
        if not in_shard(shard, i):
            continue
        name = f"rows-{rows}-{ratio:g}"
        ctx.settings = replace(settings, base_ratio=ratio)
        runs[(name, seed)] = method_run(cache / name / f"seed{seed}.json", replace(_alone("cns", rows=rows), name=name),
                                        seed, ctx, base_images)
    if shard:
        return None
    cells = {(b, r): _cells(runs, f"rows-{r}-{b:g}", "final", "bitmap_gain", base)
             for b, r in itertools.product(BUDGETS, ROWS)}
    record = {"budgets": list(BUDGETS), "rows": list(ROWS), "concepts": [c.name for c in concepts],
              "seeds": settings.seeds,
              "bitmap_gain": {f"{r}@{b:g}": interval(v) for (b, r), v in cells.items()},
              "taylor_minus": {f"{r}@{b:g}": paired(cells[(b, "taylor")], cells[(b, r)])
                               for (b, r) in cells if r != "taylor"}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Does selection matter? Row budget curve", "",
             "Each concept alone on the pretrained model; final bitmap gain, mean [95% bootstrap interval] over "
             f"concepts x seeds ({len(concepts)} x {len(settings.seeds)}).", "",
             "| budget | " + " | ".join(ROWS) + " | taylor - random |", "|---" * (len(ROWS) + 2) + "|"]
    for b in BUDGETS:
        lines.append(f"| {b:.0%} | " + " | ".join(fmt(record["bitmap_gain"][f"{r}@{b:g}"]) for r in ROWS)
                     + f" | {fmt(record['taylor_minus'][f'random@{b:g}'])} |")
    (out / "budget.md").write_text("\n".join(lines) + "\n")
    _plot(record, out / "budget.png")
    return record


def _plot(record: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    budgets = record["budgets"]
    for rows in record["rows"]:
        values = [record["bitmap_gain"][f"{rows}@{b:g}"] for b in budgets]
        mid = [v[0] for v in values]
        ax.errorbar([100 * b for b in budgets], mid, yerr=[[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]],
                    marker="o", capsize=3, label=rows)
    ax.set(xlabel="rows per layer (% of the layer)", ylabel="final bitmap gain", xscale="log")
    ax.legend()
    save_figure(fig, path)
