"""The benchmark world's report: every number with a 95% bootstrap interval, paired comparisons
on shared seeds, the issue's targets with verdicts, and pictures.

Statistics (docs/world.md):
- a *cell* is one (concept, training seed); a method's number is the mean over its cells, and its
  interval resamples cells with replacement (2,000 resamples, percentile interval);
- a paired difference (A - B) is taken cell by cell on the same concept and seed, then resampled;
  a ratio resamples the cells of both methods together;
- ``bitmap`` (share of the concept's 64 cells its samples read back to) is the primary metric;
  ``bitmap_gain`` and ``similarity_gain`` rescale it so the pretrained model's own samples of the
  prompt are 0 and the concept's fresh renders are 1; ``identity`` is the judge's strict reading.
"""

from __future__ import annotations

import csv
import json
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

RESAMPLES = 2000
METRICS = ("bitmap", "bitmap_gain", "identity", "similarity_gain")


def _cells(runs: dict, method: str, key: str, metric: str, base: dict) -> np.ndarray:
    """(seeds, concepts) values of one metric, right after learning (``just_learned``) or final."""
    rows = []
    for (name, _), record in sorted(runs.items()):
        if name != method:
            continue
        values = []
        for k, reading in enumerate(record[key]):
            floor = base["concepts"][k]
            if metric == "bitmap_gain":
                values.append((reading["bitmap"] - floor["bitmap"]) / max(1e-6, 1 - floor["bitmap"]))
            elif metric == "similarity_gain":
                top = base["fresh_similarity"][reading["concept"]]
                values.append((reading["similarity"] - floor["similarity"]) / max(1e-6, top - floor["similarity"]))
            else:
                values.append(reading[metric])
        rows.append(values)
    return np.asarray(rows, dtype=float)


def interval(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the cells and its 95% bootstrap interval."""
    values = np.asarray(values, dtype=float).reshape(-1)
    values = values[~np.isnan(values)]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = values[rng.integers(n, size=(RESAMPLES, n))].mean(axis=1)
    return float(values.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over shared cells, with its interval."""
    return interval(a - b, seed=seed)


def ratio(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b), resampling the shared cells of both together."""
    a, b = a.reshape(-1), b.reshape(-1)
    n = len(a)
    if n == 0 or b.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(RESAMPLES):
        idx = rng.integers(n, size=n)
        if b[idx].mean() != 0:
            boots.append(a[idx].mean() / b[idx].mean())
    return float(a.mean() / b.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def fmt(triple) -> str:
    value, low, high = triple
    if np.isnan(value):
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def summarize(runs: dict, methods: list[str], base: dict) -> dict:
    """Per method: each metric right after learning and final, forgetting, zero-shot drift."""
    out = {}
    for method in methods:
        records = [r for (name, _), r in sorted(runs.items()) if name == method]
        if not records:
            continue
        row = {"seeds": len(records), "rows_per_concept": float(np.mean([np.mean(r["rows"]) for r in records])),
               "train_seconds": float(np.mean([r["train_seconds"] for r in records]))}
        for metric in METRICS:
            just, final = _cells(runs, method, "just_learned", metric, base), _cells(runs, method, "final", metric, base)
            row[f"{metric}_just_learned"] = interval(just)
            row[f"{metric}_final"] = interval(final)
            if just.shape[1] > 1 and "zero_shot" in records[0]:  # combined models only; the last concept
                # cannot be forgotten yet
                row[f"forgetting_{metric}"] = interval(just[:, :-1] - final[:, :-1])
        if "zero_shot" in records[0]:
            accuracy = np.array([r["zero_shot"]["all"] for r in records])
            row["zero_shot_accuracy"] = interval(accuracy)
            row["zero_shot_drift"] = interval(base["zero_shot"]["all"] - accuracy)
            row["zero_shot_pixel_change"] = interval(np.array([r["zero_shot_pixel_change"] for r in records]))
            row["two_concepts_both"] = interval(np.array([r["pairs"].get("pair_both", np.nan) for r in records]))
            row["weights_changed"] = int(np.mean([r["weights_changed"] for r in records]))
        if all("pairs_regions" in r for r in records):
            row |= {"two_concepts_regions_both": interval(_pair_cells(records, "regions")),
                    "two_concepts_independent": interval(_pair_cells(records, "independent"))}
        if records and all("triples_regions" in r for r in records):  # models pretrained with three-object scenes
            row |= {"three_concepts_all": interval(_pair_cells(records, "plain", "triples")),
                    "three_concepts_regions_all": interval(_pair_cells(records, "regions", "triples")),
                    "three_concepts_independent": interval(_pair_cells(records, "independent", "triples"))}
        if all("forget" in r for r in records):
            row["forget"] = forget_summary(records, base)
        out[method] = row
    return out


def _pair_cells(records: list[dict], which: str, group: str = "pairs") -> np.ndarray:
    """(pair, seed) cells of two-concept prompts (``group`` "triples": three-concept ones): all
    right ``plain`` or with ``regions``, or the ``independent`` product of the single-concept
    identities."""
    if which == "independent":
        return np.concatenate([np.asarray(r[f"{group}_independent"], dtype=float) for r in records])
    key = f"{group}_regions" if which == "regions" else group
    return np.concatenate([np.asarray(r[key].get("both_per_pair", []), dtype=float) for r in records])


def forget_summary(records: list[dict], base: dict) -> dict:
    """After ``cns forget`` of the middle concept: it against the pretrained model's floor, the other
    concepts' change against the spread between training seeds, zero-shot change, seconds, and the
    bitwise restoration of the rows only it held."""
    gone, moved_bitmap, moved_identity, zero_shot = [], [], [], []
    for r in records:
        f = r["forget"]
        k = f["index"]
        gone.append((f["readings"][k]["bitmap"] - base["concepts"][k]["bitmap"],
                     f["readings"][k]["identity"] - base["concepts"][k]["identity"]))
        for j, (after, before) in enumerate(zip(f["readings"], r["final"])):
            if j != k:
                moved_bitmap.append(after["bitmap"] - before["bitmap"])
                moved_identity.append(after["identity"] - before["identity"])
        zero_shot.append(f["zero_shot"]["all"] - r["zero_shot"]["all"])
    finals = np.array([[reading["bitmap"] for reading in r["final"]] for r in records])
    seed_spread = float(finals.std(axis=0, ddof=1).mean()) if len(records) > 1 else float("nan")
    gone = np.array(gone)
    return {"concept": records[0]["forget"]["concept"],
            "seconds": float(np.mean([r["forget"]["seconds"] for r in records])),
            "forgotten_bitmap_over_pretrained": interval(gone[:, 0]),
            "forgotten_identity_over_pretrained": interval(gone[:, 1]),
            "others_bitmap_change": interval(np.array(moved_bitmap)),
            "others_identity_change": interval(np.array(moved_identity)),
            "seed_spread_bitmap": seed_spread,
            "zero_shot_change": interval(np.array(zero_shot)),
            "rows_restored_bitwise": sum(r["forget"]["rows_restored_bitwise"] for r in records),
            "rows_only_its_own": sum(r["forget"]["rows_only_its_own"] for r in records),
            "token_removed": all(r["forget"]["token_removed"] for r in records)}


def comparisons(runs: dict, summary: dict, base: dict) -> dict:
    """The issue's targets and the paired tests, each with its interval."""
    out = {}
    have = set(summary)
    if {"cns", "single_kv"} <= have:
        out["cns_final_over_ceiling_bitmap_gain"] = ratio(_cells(runs, "cns", "final", "bitmap_gain", base),
                                                          _cells(runs, "single_kv", "final", "bitmap_gain", base))
        out["cns_final_over_ceiling_identity"] = ratio(_cells(runs, "cns", "final", "identity", base),
                                                       _cells(runs, "single_kv", "final", "identity", base))
    if {"cns", "naive_kv"} <= have and "forgetting_bitmap_gain" in summary["cns"]:
        forget = {m: _cells(runs, m, "just_learned", "bitmap_gain", base)[:, :-1]
                  - _cells(runs, m, "final", "bitmap_gain", base)[:, :-1] for m in ("cns", "naive_kv")}
        out["forgetting_cns_over_naive"] = ratio(forget["cns"], forget["naive_kv"])
        drift = {m: np.array([base["zero_shot"]["all"] - r["zero_shot"]["all"]
                              for (name, _), r in sorted(runs.items()) if name == m]) for m in ("cns", "naive_kv")}
        out["drift_cns_over_naive"] = ratio(drift["cns"], drift["naive_kv"])
    for method in have:
        records = [r for (name, _), r in sorted(runs.items()) if name == method]
        if all("pairs_regions" in r for r in records):
            regions = _pair_cells(records, "regions")
            out[f"{method}_regions_over_independent"] = ratio(regions, _pair_cells(records, "independent"))
            out[f"{method}_regions_over_plain"] = ratio(regions, _pair_cells(records, "plain"))
        if records and all("triples_regions" in r for r in records):
            regions = _pair_cells(records, "regions", "triples")
            out[f"{method}_three_regions_over_independent"] = ratio(regions, _pair_cells(records, "independent", "triples"))
            out[f"{method}_three_regions_over_plain"] = ratio(regions, _pair_cells(records, "plain", "triples"))
    for control in ("cns_random", "cns_bottom", "cns_gradient", "cns_no_general", "cns_no_reg", "token_only"):
        if {"cns", control} <= have:
            for metric in ("bitmap", "identity"):
                a, b = _cells(runs, "cns", "final", metric, base), _cells(runs, control, "final", metric, base)
                if a.shape == b.shape:
                    out[f"cns_minus_{control}_{metric}"] = paired(a, b)
    return out


def write_report(settings, concepts, base: dict, runs: dict, cache: Path, dirs: list[Path], out: Path,
                 seconds: float, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in settings.methods if any(name == m for name, _ in runs)]
    summary = summarize(runs, methods, base)
    tests = comparisons(runs, summary, base)
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"{device}",
              "seconds": round(seconds, 1), "settings": asdict(settings), "concepts": [c.name for c in concepts],
              "pretrained": {"zero_shot": base["zero_shot"], "concepts": base["concepts"]},
              "hyper": {m: runs[(m, s)]["hyper"] for m, s in runs if s == settings.seeds[0]},
              "summary": summary, "comparisons": tests}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "concept", "when", "bitmap", "identity", "similarity", "prompt_fidelity"])
        for (name, seed), run in sorted(runs.items()):
            for when in ("just_learned", "final"):
                for reading in run[when]:
                    writer.writerow([name, seed, reading["concept"], when, reading["bitmap"], reading["identity"],
                                     reading["similarity"], reading["prompt_fidelity"]])
    (out / "results.md").write_text(markdown(record))
    samples_picture(methods, concepts, dirs, cache, settings.seeds[0], out / "samples.png")
    plot_summary(record, out / "summary.png")


def markdown(record: dict) -> str:
    summary = record["summary"]
    lines = [f"# Benchmark world results ({record['date']})", "",
             f"Machine: {record['machine']}; this report {record['seconds'] / 60:.1f} min (cached runs not counted). "
             f"Concepts: {', '.join(record['concepts'])}. Every number: mean [95% bootstrap interval] over "
             "concepts x training seeds.", "",
             "| method | seeds | bitmap final | bitmap gain final | identity final | similarity gain final | "
             "bitmap gain just learned | forgetting (bitmap gain) | zero-shot drift | pixel change | rows/concept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in summary.items():
        lines.append("| " + " | ".join([
            method, str(row["seeds"]), fmt(row["bitmap_final"]), fmt(row["bitmap_gain_final"]),
            fmt(row["identity_final"]), fmt(row["similarity_gain_final"]), fmt(row["bitmap_gain_just_learned"]),
            fmt(row["forgetting_bitmap_gain"]) if "forgetting_bitmap_gain" in row else "",
            fmt(row["zero_shot_drift"]) if "zero_shot_drift" in row else "",
            fmt(row["zero_shot_pixel_change"]) if "zero_shot_pixel_change" in row else "",
            f"{row['rows_per_concept']:.1f}"]) + " |")
    together = (  # (row keys: plain, regions, independent; the table's lead-in)
        (("two_concepts_both", "two_concepts_regions_both", "two_concepts_independent"),
         "Two learned concepts in one prompt (left and right), both read right: without and with region control "
         "(each concept's caption read only in its half), and the rate if each half were drawn at its concept's "
         "single-concept identity independently:"),
        (("three_concepts_all", "three_concepts_regions_all", "three_concepts_independent"),
         "Three learned concepts in one prompt (top left, top right, bottom centre), all three read right: without "
         "and with region control, and the rate if each were drawn at its concept's single-concept identity "
         "independently:"))
    for keys, lead in together:
        rows = {m: row for m, row in summary.items() if keys[1] in row}
        if rows:
            lines += ["", lead, "", "| method | plain | regions | independent |", "|---|---|---|---|"]
            lines += [f"| {m} | " + " | ".join(fmt(row[k]) for k in keys) + " |" for m, row in rows.items()]
    for method, row in summary.items():
        if "forget" in row:
            f = row["forget"]
            lines += ["", f"`cns forget {f['concept']}` on {method}'s final model ({f['seconds']:.1f} s, no training): "
                      f"its bitmap agreement minus the pretrained model's {fmt(f['forgotten_bitmap_over_pretrained'])}, "
                      f"identity minus pretrained {fmt(f['forgotten_identity_over_pretrained'])}; the other concepts' "
                      f"bitmap change {fmt(f['others_bitmap_change'])} (spread between training seeds "
                      f"{f['seed_spread_bitmap']:.3f}), identity change {fmt(f['others_identity_change'])}; zero-shot "
                      f"accuracy change {fmt(f['zero_shot_change'])}; rows only it held back at their pretrained "
                      f"values bit for bit: {f['rows_restored_bitwise']} of {f['rows_only_its_own']}; token removed: "
                      f"{f['token_removed']}."]
    lines += ["", "Comparisons (paired on the same concepts and seeds):", ""]
    lines += [f"- `{key}`: {fmt(value)}" for key, value in record["comparisons"].items()]
    pre = record["pretrained"]["zero_shot"]
    lines += ["", f"Pretrained model: base-caption accuracy {pre['all']:.3f} (shape {pre['shape']:.3f}, colour "
              f"{pre['color']:.3f}, background {pre['background']:.3f}); its bitmap agreement on the concept "
              f"prompts {np.mean([c['bitmap'] for c in record['pretrained']['concepts']]):.3f} (the floor of "
              "bitmap gain).", "", f"Settings per method: `{json.dumps(record['hyper'])}`.", ""]
    return "\n".join(lines)


def samples_picture(methods: list[str], concepts, dirs: list[Path], cache: Path, seed: int, path: Path) -> None:
    """Columns: concepts. Rows: a training photo, the pretrained model's sample of the prompt,
    then each method's final sample (training seed ``seed``, the same noise in every row)."""
    from cns.generate import grid
    from world.bench import load_images

    rows = [("training photo", [Image.open(d / "00.png").convert("RGB") for d in dirs]),
            ("pretrained", [Image.fromarray(a) for a in load_images(cache / "pretrained-samples.png")])]
    for method in methods:
        file = cache / method / f"seed{seed}-samples.png"
        if file.is_file():
            rows.append((method, [Image.fromarray(a) for a in load_images(file)]))
    canvas = grid([images for _, images in rows], cell=64)
    labelled = Image.new("RGB", (canvas.width + 110, canvas.height), "white")
    labelled.paste(canvas, (110, 0))
    draw = ImageDraw.Draw(labelled)
    for k, (label, _) in enumerate(rows):
        draw.text((4, 64 * k + 26), label, fill="black")
    labelled.save(path)


def plot_summary(record: dict, path: Path) -> None:
    """Final bitmap gain and forgetting per method, with their intervals."""
    from matplotlib.figure import Figure

    summary = record["summary"]
    names = list(summary)
    fig = Figure(figsize=(11, 4))
    for k, (key, title) in enumerate((("bitmap_gain_final", "final bitmap gain (0 = pretrained, 1 = renders)"),
                                      ("forgetting_bitmap_gain", "forgetting (bitmap gain, just learned - final)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        values = [summary[n].get(key, (np.nan, np.nan, np.nan)) for n in names]
        mid = np.array([v[0] for v in values])
        err = np.array([[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]])
        ax.bar(range(len(names)), mid, yerr=err, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Benchmark world ({record['date']}), 95% bootstrap intervals over concepts x seeds")
    save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """The world's figures: tasks.plots' saver, trimmed to the drawing."""
    from tasks.plots import save_figure as save

    return save(fig, path, dpi=100, bbox_inches="tight")
