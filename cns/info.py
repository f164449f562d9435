"""Neuron accounting of a model directory, from its lineage and mask files (no model load)."""

from __future__ import annotations

from pathlib import Path

from cns.delta import load_masks
from cns.errors import CNSError
from cns.lineage import LINEAGE, read_lineage
from cns.neurons import Mask, intersection, union


def short_layer_name(name: str) -> str:
    """down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k -> down1.a0.t0.k"""
    parts = name.split(".")
    out = []
    for i, part in enumerate(parts):
        if part in ("down_blocks", "up_blocks"):
            out.append(part.split("_")[0] + parts[i + 1])
        elif part == "mid_block":
            out.append("mid")
        elif part == "attentions":
            out.append("a" + parts[i + 1])
        elif part == "transformer_blocks":
            out.append("t" + parts[i + 1])
        elif part in ("to_k", "to_v"):
            out.append(part[-1])
    return ".".join(out)


def account(concept: Mask, earlier: list[Mask], layer_meta: dict[str, list[int]], unet_parameters: int) -> dict:
    """Per-layer and total neurons of one concept, its overlap with earlier concepts and the share
    of UNet weights it changes. ``layer_meta``: layer name -> [rows, weights per row]."""
    per_layer = {name: int(rows.sum()) for name, rows in concept.items()}
    total = sum(per_layer.values())
    overlap = 0
    if earlier:
        layers_union = union(earlier, {name: meta[0] for name, meta in layer_meta.items()})
        overlap = int(sum(int(r.sum()) for r in intersection(concept, layers_union).values()))
    weights = sum(per_layer[name] * meta[1] for name, meta in layer_meta.items())
    total_rows = sum(meta[0] for meta in layer_meta.values())
    return {"neurons_per_layer": per_layer, "neurons_total": total, "overlap_with_earlier": overlap,
            "weights_changed": weights, "percent_kv_rows": 100.0 * total / total_rows,
            "percent_unet_weights": 100.0 * weights / unet_parameters}


def info(model_dir: str | Path) -> tuple[dict, list[dict]]:
    """(base record, one accounting dict per concept in order), recomputed from the mask files."""
    lineage = read_lineage(model_dir)
    if lineage is None:
        raise CNSError(Path(model_dir) / LINEAGE, "missing: no model has been learned here yet", "model_missing")
    rows, earlier = [], []
    for record in lineage.concepts:
        concept = load_masks(Path(model_dir) / record.mask)[0]["concept"]
        acc = account(concept, earlier, lineage.base["layers"], lineage.base["unet_parameters"])
        rows.append({"version": record.version, "name": record.name, "token": record.token,
                     "class_noun": record.class_noun, **acc})
        earlier.append(concept)
    return lineage.base, rows


def format_table(base: dict, rows: list[dict], per_layer: bool = False) -> str:
    header = ["v", "name", "token", "class", "neurons", "overlap", "weights", "% UNet"]
    lines = [[str(r["version"]), r["name"], r["token"], r["class_noun"], str(r["neurons_total"]),
              str(r["overlap_with_earlier"]), str(r["weights_changed"]), f"{r['percent_unet_weights']:.4f}"]
             for r in rows]
    if per_layer:
        names = list(base["layers"])
        header += [short_layer_name(n) for n in names]
        for line, r in zip(lines, rows):
            line += [str(r["neurons_per_layer"].get(n, 0)) for n in names]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"base: {base['pretrained_model_name_or_path']} (hash {base['hash'][:12]}, "
           f"{base['unet_parameters']:,} UNet weights, {sum(m[0] for m in base['layers'].values())} K/V rows "
           f"in {len(base['layers'])} layers)", fmt.format(*header)]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)
