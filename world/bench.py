"""``cns bench world``: Concept Neuron Selection against the methods people use instead, in the
benchmark world, side by side on the same concepts, seeds and samples.

Every method is one entry of :data:`METHODS` (how it learns one concept, and how concepts are
combined: one after another in one model, each alone on the pretrained model, or each alone and
fused at the end), so the loop has one shape and a new baseline is one entry.

The protocol (docs/world.md):
- ten benchmark concepts learned in the order of data/world/concepts.yaml; settings are chosen
  on the two *validation* concepts (bowtie, plusdot) by ``cns bench world tune``, never on these;
- every method is trained with each of ``seeds`` training seeds; concepts are drawn 24 times
  each (6 backgrounds x 4 noise seeds, the same noise for every method and training seed, so
  comparisons are paired);
- a concept is read right after it was learned and after the last concept (19 readings per
  sequential run), by the judge (identity, with a reject class), by the truth (the object read
  back to its 8x8 bitmap: the continuous primary metric) and by judge-embedding similarity,
  normalised between the pretrained model (0) and fresh renders (1);
- results are cached per method and training seed (``<cache>/<method>/seed<k>.json``;
  single-concept methods per concept too), so the benchmark runs in parts and resumes;
- :mod:`world.report` turns the cache into the table with 95% bootstrap intervals over
  concepts x seeds, paired differences, ratios and pictures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cns.config import Config, config_from_dict
from cns.cumulative import CumulativeModel, open_model
from cns.learn import commit, general, prepare, score, select
from cns.learn import train as cns_train
from cns.neurons import count, empty_mask, row_counts, weights_in
from cns.train import TrainableToken, finetune
from world.concepts import write_concept_dirs
from world.judge import cells as cut_cells
from world.judge import load_judge
from world.lora import add_lora, lora_deltas, remove_lora
from world.metrics import attribute_accuracy, base_prompts, concept_agreement, concept_captions, pair_accuracy, sample
from world.model import MODEL_DIR
from world.scene import (BACKGROUNDS, COLORS, CORNER_BOXES, HELDOUT_PAIRS, SHAPES, Obj, WorldConcept, caption,
                         concept_training_scenes, load_concepts, random_glyph, render)

log = logging.getLogger(__name__)

VALIDATION = ("bowtie", "plusdot")  # settings are tuned on these, never on the benchmark's concepts


@dataclass(frozen=True)
class Method:
    name: str
    learner: str  # "cns" (selected rows + token), "kv" (every K/V row + token), "lora", "token"
    combine: str = "sequential"  # "sequential" | "alone" (each on the pretrained model) | "fused"
    regularized: bool = False  # CNS's L_reg
    rows: str = "taylor"  # CNS variants: how rows are ranked (taylor | gradient | random | bottom)
    remove_general: bool = True
    family: str = ""  # methods of one family share tuned settings (so row choices are compared fairly)
    about: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("cns", "cns", regularized=True, family="cns", about="the library's CNS with the world's settings (BenchSettings.cns)"),
    Method("cns_no_general", "cns", regularized=True, remove_general=False, family="cns",
           about="CNS without general-neuron removal"),
    Method("cns_no_reg", "cns", family="cns", about="CNS without L_reg or null-space protection"),
    Method("cns_random", "cns", regularized=True, rows="random", family="cns",
           about="random rows from the same free pool, the same count per layer"),
    Method("cns_bottom", "cns", regularized=True, rows="bottom", family="cns", about="the lowest-scored free rows"),
    Method("cns_gradient", "cns", regularized=True, rows="gradient", family="cns",
           about="rows ranked by gradient norm instead of Taylor importance"),
    Method("token_only", "token", family="token", about="only the token's embedding (Textual Inversion)"),
    Method("naive_kv", "kv", family="kv", about="every K/V row, no L_reg, one concept after the other"),
    Method("lora_seq", "lora", family="lora", about="a rank-4 LoRA per concept on every K/V projection, merged"),
    Method("lora_fused", "lora", combine="fused", family="lora",
           about="one LoRA per concept, fused at the end by adding the deltas (Mix-of-Show's weight-sum baseline)"),
    Method("single_kv", "kv", combine="alone", family="kv", about="the ceiling: every K/V row, each concept alone"),
)}
MAIN = ("cns", "cns_no_general", "cns_no_reg", "cns_random", "token_only", "naive_kv", "lora_seq", "lora_fused",
        "single_kv")


@dataclass
class Hyper:
    learning_rate: float
    token_learning_rate: float
    steps: int


# Untuned starting points; `cns bench world tune` replaces them by the pre-declared rule.
DEFAULT_HYPER = {"cns": Hyper(1e-2, 5e-3, 200), "token": Hyper(0.0, 5e-2, 200), "kv": Hyper(1e-2, 5e-3, 200),
                 "lora": Hyper(1e-2, 5e-3, 200)}
# Steps are tuned too: on the finished world model the all-K/V ceiling was still rising at 800 steps
# (bowtie identity 0.08 / 0.38 / 0.50 at 200 / 400 / 800; docs/world/gate-step-24000).
TUNE_GRID = {"learning_rate": (3e-3, 1e-2, 3e-2), "token_learning_rate": (5e-3, 5e-2), "steps": (200, 400, 800, 1600)}


# CNS's library settings in this world (data/world/params.yaml bench.cns says why).
WORLD_CNS = {"selection": {"exclude_owned": False},
             "train": {"protect_generic": 0.99, "protect_earlier": 0.99, "reg_previous_weight": 0.0,
                       "reg_pretrained_weight": 0.0, "reg_output_weight": 0.0, "reg_generic_weight": 0.0}}


@dataclass
class BenchSettings:
    concepts: int = 10
    methods: list[str] = field(default_factory=lambda: list(MAIN))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 4
    lora_rank: int = 4
    base_ratio: float = 0.25
    images_per_concept: int = 5
    noise_per_background: int = 4  # x 6 backgrounds = 24 samples per concept
    # Region control's global-prompt share inside the halves (generate.region_base), chosen on base
    # shapes, not concepts: both of two shapes right 50% at 0.6, 0% at 0, 6% without regions
    # (docs/world/regions-base-2026-11-28)
    region_base: float = 0.6
    steps: int | None = None  # overrides every method's tuned steps (the smoke run)
    model_dir: str = str(MODEL_DIR)
    tuned: str | None = "docs/world/tuned.json"
    # Refuse a full run until `--sweep tune` found the ceiling learning (tuned.json's gate).
    require_gate: bool = True
    # The library settings (cns/config.py sections) every CNS run of this world uses, over the
    # library's defaults: data/world/params.yaml says which and why. Rates and steps come from the
    # tune sweep; a non-regularized method (cns_no_reg) still drops L_reg and the null-space protection.
    cns: dict[str, dict] = field(default_factory=lambda: {k: dict(v) for k, v in WORLD_CNS.items()})

    @classmethod
    def smoke(cls) -> "BenchSettings":
        return cls(concepts=2, steps=8, seeds=[0], noise_per_background=1,
                   methods=["cns", "token_only", "lora_fused", "single_kv"], tuned=None, require_gate=False)


def hyper_for(method: Method, settings: BenchSettings) -> Hyper:
    tuned = {}
    if settings.tuned and Path(settings.tuned).is_file():
        tuned = json.loads(Path(settings.tuned).read_text()).get("chosen", {})
    hyper = Hyper(**tuned[method.family]) if method.family in tuned else DEFAULT_HYPER[method.family]
    return replace(hyper, steps=settings.steps) if settings.steps else hyper


# ---- configuration shared by every method ---------------------------------------------------

def world_calibration_prompts(path: Path, count: int = 300, seed: int = 0) -> Path:
    """General neurons of the world's model come from the world's own captions: every seen
    (shape, colour) pair on every background, and family glyphs."""
    lines = [caption([Obj(s, c)], bg) for s in SHAPES for c in COLORS
             for bg in BACKGROUNDS if (s, c) not in HELDOUT_PAIRS]
    rng, holdout = np.random.default_rng(seed), load_concepts()
    lines += [caption([Obj(glyph=random_glyph(rng, holdout))], list(BACKGROUNDS)[i % len(BACKGROUNDS)])
              for i in range(count - len(lines))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cns_config(settings: BenchSettings, work: Path, hyper: Hyper, seed: int, device: str = "cpu",
               method: Method | None = None) -> Config:
    train = {"learning_rate": hyper.learning_rate, "token_learning_rate": hyper.token_learning_rate,
             "max_train_steps": hyper.steps, "train_batch_size": settings.batch_size, "seed": seed,
             "random_flip": False, "log_every": 0}
    if method is not None and not method.regularized:
        train |= {"reg_previous_weight": 0.0, "reg_pretrained_weight": 0.0, "reg_output_weight": 0.0,
                  "reg_generic_weight": 0.0, "protect_generic": 0.0, "protect_earlier": 0.0}
    scorer = "gradient" if method is not None and method.rows == "gradient" else "taylor"
    data = {section: dict(values) for section, values in settings.cns.items()}
    data.setdefault("scoring", {}).update(base_ratio=settings.base_ratio, scorer=scorer)
    data.setdefault("train", {}).update(train)
    data.update({
        "model": {"pretrained_model_name_or_path": settings.model_dir, "device": device, "mixed_precision": "no"},
        "model_dir": str(work / "model"), "cache_dir": str(work.parent / "cache"),
        "calibration": data.get("calibration", {}) | {
            "prompts_file": str(world_calibration_prompts(work.parent / "calibration.txt"))},
        "evaluate": {"holdout_images": 1},
        "limits": {"min_images": 3},
    })
    return config_from_dict(data, source="world bench")


# ---- LoRA on the K/V projections (baselines) --------------------------------------------------

def train_lora(cumulative: CumulativeModel, prepared, hyper: Hyper, rank: int, batch_size: int,
               seed: int) -> dict[str, torch.Tensor]:
    """Train one LoRA (world.lora) on every K/V layer, and the token row; returns {layer: delta W}
    (not applied; the UNet is left as it was)."""
    from cns.diffusion import diffusion_loss, encode_prompts

    model = cumulative.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws A from torch's global generator
        params = add_lora(model.unet, [layer.name for layer in cumulative.layers], rank)
    token = TrainableToken(model.token_embedding, prepared.token_id)
    optimizer = torch.optim.AdamW([{"params": params, "lr": hyper.learning_rate},
                                   {"params": [token.row], "lr": hyper.token_learning_rate}], weight_decay=0.0)
    try:
        for _ in range(hyper.steps):
            latents, ids = prepared.source.sample(batch_size)
            loss = diffusion_loss(model, latents, encode_prompts(model, ids), prepared.source.generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        deltas = lora_deltas(model.unet)
    finally:
        remove_lora(model.unet)
        token.release(model.token_embedding)
    return deltas


def add_deltas(cumulative: CumulativeModel, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    with torch.no_grad():
        for layer in cumulative.layers:
            if layer.name in deltas:
                layer.linear.weight.add_(sign * deltas[layer.name])


# ---- learning one concept ---------------------------------------------------------------------

def learn_one(method: Method, cumulative: CumulativeModel, directory: Path, config: Config, hyper: Hyper,
              settings: BenchSettings, seed: int) -> dict:
    """Learn one concept into ``cumulative`` the method's way; returns what it trained (and, for
    LoRA, the delta, so a fused run can take it out and put it back)."""
    from cns.concept import hash_concept_dir, load_concept

    prepared = prepare(cumulative, load_concept(directory), config)
    rows = row_counts(cumulative.layers)
    if method.learner == "cns":
        general_mask = general(cumulative, config)[0] if method.remove_general else empty_mask(rows)
        if method.rows == "random":
            g = torch.Generator().manual_seed(seed * 7919 + len(cumulative.lineage.concepts))
            scores = {name: torch.rand(n, generator=g) for name, n in rows.items()}
        else:
            scores = score(cumulative, prepared, config, progress=False)
            if method.rows == "bottom":
                scores = {name: -s for name, s in scores.items()}
        selection = select(cumulative, scores, general_mask, config)
        result = cns_train(cumulative, prepared, selection, config, progress=False)
        commit(cumulative, prepared, selection, scores, result, hash_concept_dir(directory), config)
        info = {"rows": count(selection.concept),
                "rows_per_layer": {n: int(m.sum()) for n, m in selection.concept.items()},
                "protected_directions": [result.protected_directions, result.text_dim]}
    elif method.learner in ("kv", "token"):
        mask = {n: torch.full((r,), method.learner == "kv", dtype=torch.bool) for n, r in rows.items()}
        finetune(cumulative.model, cumulative.layers, mask, prepared.token_id, prepared.source, config.train,
                 pretrained=cumulative.pretrained, progress=False)
        info = {"rows": count(mask)}
    else:
        deltas = train_lora(cumulative, prepared, hyper, settings.lora_rank, settings.batch_size, seed)
        add_deltas(cumulative, deltas)
        info = {"rows": sum(rows.values()), "deltas": deltas}
    info["token"] = cumulative.model.token_embedding.weight[prepared.token_id].detach().clone()
    return info


# ---- reading concepts back --------------------------------------------------------------------

@dataclass
class Context:
    """What every run shares: the judge, the concepts, their folders and references."""

    judge: object
    concepts: list[WorldConcept]
    dirs: list[Path]
    references: dict[str, torch.Tensor]
    settings: BenchSettings
    work: Path
    device: str = "cpu"
    model_digest: str = ""  # of the model's weight files: a cached run of another model is not reused
    draws_three: bool = False  # pretrained with three-object scenes: combined runs read three concepts too


def concept_readings(model, ctx: Context, indices: list[int]) -> list[dict]:
    """Per concept: 24 samples (6 backgrounds x 4 noise seeds); a sample's noise depends only
    on the concept and the prompt, so every method and training seed draws from the same noise."""
    prompts, owners, seeds, bgs = [], [], [], []
    for index in indices:
        for j, (text, bg) in enumerate(concept_captions(ctx.concepts[index])):
            for s in range(ctx.settings.noise_per_background):
                prompts.append(text)
                owners.append(index)
                seeds.append(1000 * index + 10 * j + s)
                bgs.append(bg)
    images = sample(model, prompts, seeds)
    reads = ctx.judge.read(images)
    embeddings = ctx.judge.embeddings(images)
    out = []
    for index in indices:
        concept = ctx.concepts[index]
        mine = [i for i, o in enumerate(owners) if o == index]
        out.append({
            "concept": concept.name,
            "identity": float(np.mean([reads[i]["identity"] == concept.name for i in mine])),
            "bitmap": float(np.mean(concept_agreement(images[mine], concept))),
            "similarity": float((embeddings[mine] @ ctx.references[concept.name]).mean()),
            "prompt_fidelity": float(np.mean([reads[i]["background"] == bgs[i] for i in mine])),
            "samples": len(mine),
        })
    return out


def reference_embeddings(judge, concepts: list[WorldConcept], dirs: list[Path]) -> tuple[dict, dict]:
    """Each concept's reference for similarity (the unit mean judge embedding of its photos), and
    fresh renders' similarity to it (the top of the normalised scale)."""
    references, fresh = {}, {}
    for concept, directory in zip(concepts, dirs):
        photos = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(directory.glob("*.png"))])
        references[concept.name] = torch.nn.functional.normalize(judge.embeddings(photos).mean(0), dim=0)
        renders = judge.embeddings(np.stack([render(s) for s in concept_training_scenes(concept, 6, seed=999)]))
        fresh[concept.name] = float((renders @ references[concept.name]).mean())
    return references, fresh


def zero_shot(model, judge, seed: int = 50_000) -> tuple[dict, np.ndarray]:
    triples = base_prompts("heldout") + base_prompts("seen")
    prompts = [caption([Obj(s, c)], bg) for s, c, bg in triples]
    images = sample(model, prompts, [seed + i for i in range(len(prompts))])
    return attribute_accuracy(model, judge, triples, images=images), images


def two_concepts(model, ctx: Context, indices: list[int], seed: int = 60_000, regions: bool = False) -> dict:
    """Each concept with the next one in one prompt, left and right ("a <a> glyph and a <b> glyph on
    a .. background"), ``noise_per_background`` samples per pair; with ``regions``, each concept's
    own caption is read in its half beside the global prompt's ``region_base`` share (cns.regions,
    the same as ``cns generate --region --region-base``).
    ``both_per_pair``: the share of each pair's samples with both halves right."""
    return concepts_together(model, ctx, indices, 2, seed, regions)


def concepts_together(model, ctx: Context, indices: list[int], count: int, seed: int = 60_000,
                      regions: bool = False) -> dict:
    """Each concept with the ``count - 1`` next ones in one prompt: two in the left and right
    halves, three in the quarters and the bottom centre (world.scene.CORNERS, as a world
    pretrained with three-object scenes draws them), each cell read by the judge. With
    ``regions``, each concept's own caption is read in its cell beside the global prompt's
    ``region_base`` share. ``both_per_pair``: per group, the share of its samples with every
    object right (the name kept from the pairs, whose records already use it)."""
    from cns.regions import NAMED

    if len(indices) < count:
        return {}
    boxes = [NAMED["left"], NAMED["right"]] if count == 2 else list(CORNER_BOXES)
    groups = [[ctx.concepts[indices[(i + k) % len(indices)]] for k in range(count)] for i in range(len(indices))]
    per = ctx.settings.noise_per_background
    images, all_groups, bgs = [], [], []
    for i, group in enumerate(groups):
        bg = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        prompt = caption([Obj(concept=c) for c in group], bg)
        cells = [(box, caption([Obj(concept=c)], bg)) for box, c in zip(boxes, group)]
        images.append(sample(model, [prompt] * per, [seed + 100 * i + j for j in range(per)],
                             regions=cells if regions else None, region_base=ctx.settings.region_base))
        all_groups += [group] * per
        bgs += [bg] * per
    images = np.concatenate(images)
    if count == 2:
        reads = ctx.judge.read_pair(images)
    else:
        flat = ctx.judge.read(np.stack([c for image in images for c in cut_cells(image, boxes)]))
        reads = [flat[count * i:count * (i + 1)] for i in range(len(images))]
    right = [[r["identity"] == c.name for r, c in zip(read, group)] for read, group in zip(reads, all_groups)]
    every = [all(r) for r in right]
    out = pair_accuracy(reads, all_groups, bgs) if count == 2 else {
        "all_right": float(np.mean(every)), "objects": float(np.mean([np.mean(r) for r in right]))}
    return out | {"samples": len(all_groups),
                  "both_per_pair": [float(np.mean(every[i * per:(i + 1) * per])) for i in range(len(groups))]}


def independent_groups(final: list[dict], count: int = 2) -> list[float]:
    """Per group concepts_together draws: all right if each object were drawn at its concept's
    single-concept identity, independently (the product of the identities; for pairs
    identity(a) x identity(b))."""
    n = len(final)
    if n < count:
        return []
    return [float(np.prod([final[(i + k) % n]["identity"] for k in range(count)])) for i in range(n)]


def draws_three(model_dir: str | Path) -> bool:
    """Whether a world model was pretrained with three-object scenes (its pretrain.json), so that
    three concepts in one image can be read on it (docs/world/regions-three-2026-12-08)."""
    record = Path(model_dir) / "pretrain.json"
    if not record.is_file():
        return False
    return float(json.loads(record.read_text()).get("config", {}).get("three_object_rate", 0.0)) > 0


def forget_middle(cumulative: CumulativeModel, config: Config, ctx: Context, indices: list[int]) -> dict:
    """``cns forget`` the middle concept of a sequential CNS model: its seconds (no training), every
    concept read again, zero-shot accuracy, whether the rows no other concept holds are back at
    their pretrained values bit for bit, and whether its token is gone."""
    from cns.forget import forget
    from cns.neurons import union

    k = indices[len(indices) // 2]
    name = ctx.concepts[k].name
    mine = cumulative.concept_masks([cumulative.lineage.find(name)])[0]
    others = union(cumulative.concept_masks([r for r in cumulative.lineage.concepts if r.name != name]),
                   row_counts(cumulative.layers))
    start = time.perf_counter()
    forget(config.model_dir, name)
    after = open_model(config.model_dir, config)
    seconds = time.perf_counter() - start
    only_mine = {layer: mine[layer] & ~others[layer] for layer in mine}
    restored = sum(int((layer.linear.weight.detach().cpu()[only_mine[layer.name]]
                        == after.pretrained[layer.name][only_mine[layer.name]]).all(1).sum())
                   for layer in after.layers)
    return {"concept": name, "index": k, "seconds": round(seconds, 2), "rows_only_its_own": count(only_mine),
            "rows_restored_bitwise": restored,
            "token_removed": ctx.concepts[k].token not in after.model.tokenizer.get_vocab(),
            "readings": concept_readings(after.model, ctx, indices),
            "zero_shot": zero_shot(after.model, ctx.judge)[0]}


def gray_samples(model, ctx: Context, indices: list[int]) -> np.ndarray:
    prompts = [caption([Obj(concept=ctx.concepts[i])], "gray") for i in indices]
    return sample(model, prompts, [90_000 + 1000 * i for i in indices])


# ---- a run saved after each concept ----------------------------------------------------------

class Progress:
    """A run's state after each concept, so that a run stopped part-way (a session's end, a time
    budget, a lent GPU given back) resumes from its last concept instead of from the first.

    ``<folder>/k<n>/`` holds the run after ``n`` concepts: ``record.json`` (the readings so far),
    ``state.safetensors`` (other sequential runs: every K/V weight and each learned token's
    embedding; fused runs: each concept's LoRA delta and token; single-concept runs: the gray
    samples so far), ``model/`` (sequential CNS: the cumulative model folder, whose lineage and
    concept files hold its rows and tokens) and ``done``,
    written last: a folder without it is ignored. The newest complete one is kept. Every concept
    trains from seeds of its own (config seed, concept order), so a resumed run learns what an
    uninterrupted one would."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def latest(self) -> Path | None:
        done = [p for p in self.folder.glob("k*") if (p / "done").is_file() and p.name[1:].isdigit()]
        return max(done, key=lambda p: int(p.name[1:]), default=None)

    def save(self, record: dict, method: Method, cumulative: CumulativeModel, fused: list, samples: list,
             config: Config) -> None:
        from safetensors.torch import save_file

        n = len(record["just_learned"])
        final = self.folder / f"k{n}"
        for stale in self.folder.glob(".k*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.folder / f".k{n}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True)
        tensors: dict[str, torch.Tensor] = {}
        if method.combine == "sequential" and method.learner == "cns":  # its model folder holds it all
            shutil.copytree(config.model_dir, tmp / "model")
        elif method.combine == "sequential":
            tensors |= {f"kv.{layer.name}": layer.linear.weight.detach().cpu() for layer in cumulative.layers}
            embedding = cumulative.model.token_embedding.weight
            for i, token in enumerate(self._tokens(cumulative, n)):
                tensors[f"token.{i}"] = embedding[cumulative.model.tokenizer.convert_tokens_to_ids(token)].detach().cpu()
        elif method.combine == "fused":
            for i, (deltas, token) in enumerate(fused):
                tensors |= {f"delta.{i}.{name}": d.detach().cpu() for name, d in deltas.items()}
                tensors[f"token.{i}"] = token.detach().cpu()
        else:
            tensors["samples"] = torch.from_numpy(np.stack(samples))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "record.json").write_text(json.dumps(record) + "\n")
        (tmp / "done").write_text("")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for older in self.folder.glob("k*"):
            if older != final:
                shutil.rmtree(older, ignore_errors=True)

    @staticmethod
    def _tokens(cumulative: CumulativeModel, n: int) -> list[str]:
        """The ``n`` concept tokens added to the tokenizer, in order (the last ``n`` ids)."""
        tokenizer = cumulative.model.tokenizer
        return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer) - n, len(tokenizer))))

    def load(self, method: Method, ctx: "Context", config: Config, hyper: Hyper, seed: int):
        """(record, cumulative model or None, fused, samples) from the newest saved concept, or
        None: also when it was saved by another run (method, seed, settings or concept order), which
        then starts over rather than continue someone else's."""
        from safetensors.torch import load_file

        from cns.delta import add_token

        latest = self.latest()
        if latest is None:
            return None
        record = json.loads((latest / "record.json").read_text())
        learned = [r["concept"] for r in record["just_learned"]]
        if (record.get("method"), record.get("seed"), record.get("key")) != (method.name, seed, run_key(ctx, method, seed, hyper)) \
                or learned != [c.name for c in ctx.concepts[:len(learned)]] or len(learned) >= len(ctx.concepts):
            log.warning("%s: saved by another run (method, seed, settings or concepts differ); starting over",
                        latest)
            return None
        tensors = load_file(str(latest / "state.safetensors"))
        n = len(record["just_learned"])
        cumulative, fused, samples = None, [], []
        if method.combine == "sequential" and method.learner == "cns":  # rows and tokens from its lineage
            shutil.copytree(latest / "model", config.model_dir)
            cumulative = open_model(config.model_dir, config)
        elif method.combine == "sequential":
            cumulative = open_model(config.model_dir, config)
            model = cumulative.model
            with torch.no_grad():
                for i in range(n):
                    token_id = add_token(model, ctx.concepts[i].token)
                    model.token_embedding.weight[token_id] = tensors[f"token.{i}"].to(model.token_embedding.weight)
                for layer in cumulative.layers:
                    layer.linear.weight.copy_(tensors[f"kv.{layer.name}"])
        elif method.combine == "fused":
            for i in range(n):
                prefix = f"delta.{i}."
                fused.append(({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                              tensors[f"token.{i}"]))
        else:
            samples = list(tensors["samples"].numpy())
        return record, cumulative, fused, samples

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---- one method, one training seed ------------------------------------------------------------

def run_method(method: Method, seed: int, ctx: Context, base_images: np.ndarray, samples_file: Path,
               hyper: Hyper | None = None, progress: Path | None = None) -> dict:
    """Learn every concept the method's way; read each right after learning it and after the
    last one. Returns the cache record; each concept's final sample on gray goes to
    ``samples_file``. With ``progress`` (a folder), the run is saved after every concept and a
    run stopped part-way resumes from its last saved concept (:class:`Progress`)."""
    settings = ctx.settings
    hyper = hyper or hyper_for(method, settings)
    work = ctx.work / f"{method.name}-seed{seed}"
    shutil.rmtree(work, ignore_errors=True)  # scratch: what a stopped run needs is in ``progress``
    config = cns_config(settings, work, hyper, seed, ctx.device, method)
    indices = list(range(len(ctx.concepts)))
    saved = Progress(progress) if progress else None
    resumed = saved.load(method, ctx, config, hyper, seed) if saved else None
    if resumed:
        record, cumulative, fused, samples = resumed
        record.setdefault("resumed_after", []).append(len(record["just_learned"]))
        log.info("%s seed %d: resumed after %d of %d concepts", method.name, seed, len(record["just_learned"]),
                 len(indices))
    else:
        record = {"method": method.name, "seed": seed, "hyper": asdict(hyper), "key": run_key(ctx, method, seed, hyper),
                  "just_learned": [], "rows": [],
                  "rows_per_layer": [], "train_seconds": 0.0, "device": _device_name(ctx.device)}
        cumulative = open_model(config.model_dir, config)
        fused, samples = [], []
    for k in indices[len(record["just_learned"]):]:
        if method.combine != "sequential":
            cumulative = open_model(work / f"model-{k}", replace(config, model_dir=str(work / f"model-{k}")))
        start = time.perf_counter()
        info = learn_one(method, cumulative, ctx.dirs[k], config, hyper, settings, seed)
        record["train_seconds"] += time.perf_counter() - start
        record["rows"].append(info["rows"])
        record["rows_per_layer"].append(info.get("rows_per_layer"))
        if "protected_directions" in info:  # CNS: text-state directions closed to its rows, of the width
            record.setdefault("protected_directions", []).append(info["protected_directions"])
        reading = concept_readings(cumulative.model, ctx, [k])[0]
        record["just_learned"].append(reading)
        log.info("%s seed %d %s: bitmap %.2f identity %.2f", method.name, seed, ctx.concepts[k].name,
                 reading["bitmap"], reading["identity"])
        if method.combine == "alone":
            samples.append(gray_samples(cumulative.model, ctx, [k])[0])
        if method.combine == "fused":
            fused.append((info["deltas"], info["token"]))
        if saved and k + 1 < len(indices):
            saved.save(record, method, cumulative, fused, samples, config)
    if method.combine == "alone":
        record["final"] = record["just_learned"]
        save_images(np.stack(samples), samples_file)
        return record
    if method.combine == "fused":  # every token and every LoRA delta into one pretrained model
        from cns.delta import add_token

        cumulative = open_model(work / "fused", replace(config, model_dir=str(work / "fused")))
        for k, (deltas, token) in zip(indices, fused):
            token_id = add_token(cumulative.model, ctx.concepts[k].token)
            with torch.no_grad():
                cumulative.model.token_embedding.weight[token_id] = token
            add_deltas(cumulative, deltas)
    record["final"] = concept_readings(cumulative.model, ctx, indices)
    accuracy, images = zero_shot(cumulative.model, ctx.judge)
    record["zero_shot"] = accuracy
    record["zero_shot_pixel_change"] = float(np.abs(images.astype(np.float32) - base_images.astype(np.float32)).mean()
                                             / 255)
    record["pairs"] = two_concepts(cumulative.model, ctx, indices)
    record["pairs_regions"] = two_concepts(cumulative.model, ctx, indices, regions=True)
    record["pairs_independent"] = independent_groups(record["final"], 2)
    if ctx.draws_three and len(indices) >= 3:
        record["triples"] = concepts_together(cumulative.model, ctx, indices, 3, seed=70_000)
        record["triples_regions"] = concepts_together(cumulative.model, ctx, indices, 3, seed=70_000, regions=True)
        record["triples_independent"] = independent_groups(record["final"], 3)
    save_images(gray_samples(cumulative.model, ctx, indices), samples_file)
    changed = {layer.name: (layer.linear.weight.detach().cpu() != cumulative.pretrained[layer.name]).any(1)
               for layer in cumulative.layers}
    record["weights_changed"] = weights_in(changed, cumulative.layers)
    if method.learner == "cns" and method.combine == "sequential" and len(indices) > 1:
        record["forget"] = forget_middle(cumulative, config, ctx, indices)
    return record


# ---- the whole benchmark ----------------------------------------------------------------------

def save_images(images: np.ndarray, path: Path) -> None:
    """uint8 (n, h, w, 3) as one lossless PNG strip (written whole: shards may read it meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(np.concatenate(list(images), axis=1)).save(tmp, format="PNG")
    tmp.replace(path)


def load_images(path: Path) -> np.ndarray:
    strip = np.asarray(Image.open(path).convert("RGB"))
    size = strip.shape[0]
    return np.stack([strip[:, i:i + size] for i in range(0, strip.shape[1], size)])


def cached_run(path: Path, compute, key: str, progress: Path | None = None) -> dict:
    """``path``'s record when it was computed under ``key`` (:func:`run_key`), else ``compute()``'s,
    written whole to ``path``; the run's saved progress (``progress``, see :class:`Progress`) is
    removed once its record is in."""
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("key") == key:
            return record
        log.warning("%s was computed under other settings (model, method or training settings differ); "
                    "computing it again", path)
    record = compute() | {"key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # shards of one sweep share the cache
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    if progress is not None:
        Progress(progress).clear()
    return record


def method_run(path: Path, method: Method, seed: int, ctx: Context, base_images: np.ndarray,
               hyper: Hyper | None = None) -> dict:
    """:func:`run_method`'s record, cached at ``path``, its samples beside it
    (``<stem>-samples.png``), saved after every concept in ``<stem>.progress`` until the record is in."""
    progress = path.with_suffix(".progress")
    samples = path.with_name(f"{path.stem}-samples.png")
    return cached_run(path, lambda: run_method(method, seed, ctx, base_images, samples, hyper=hyper, progress=progress),
                      run_key(ctx, method, seed, hyper), progress=progress)


def shard_work(shard: tuple[int, int] | None) -> str:
    """The scratch folder (in the cache) of one process: shards side by side never share one."""
    return f".work-shard{shard[0]}of{shard[1]}" if shard else ".work"


def in_shard(shard: tuple[int, int] | None, index: int) -> bool:
    """Whether run ``index`` of a sweep is this process's: every n-th from the k-th (all without a shard)."""
    return shard is None or index % shard[1] == shard[0]


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def benchmark_concepts(settings: BenchSettings) -> list[WorldConcept]:
    concepts = [c for c in load_concepts() if c.name not in VALIDATION][:settings.concepts]
    if len(concepts) < settings.concepts:
        raise ValueError(f"data/world/concepts.yaml holds {len(concepts)} benchmark concepts, "
                         f"{settings.concepts} asked for")
    return concepts


def context(settings: BenchSettings, concepts: list[WorldConcept], work: Path, device: str) -> Context:
    dirs = write_concept_dirs(concepts, work / "concepts", images=settings.images_per_concept)
    judge = load_judge()
    references, _ = reference_embeddings(judge, concepts, dirs)
    return Context(judge=judge, concepts=concepts, dirs=dirs, references=references, settings=settings, work=work,
                   device=device, model_digest=model_digest(Path(settings.model_dir)),
                   draws_three=draws_three(settings.model_dir))


def model_digest(folder: Path) -> str:
    """sha256 over a model folder's weight files (names and bytes): which model a run learned on."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# Settings added after cells were cached, and the value at which they change nothing.
ADDED_OFF = {"train.protect_generic": 0.0, "train.protect_earlier": 0.0}


def run_key(ctx: Context, method: Method | None = None, seed: int = 0, hyper: Hyper | None = None) -> str:
    """A digest of everything that decides a cached run's numbers: the model, the concepts, the
    samples read, and for a method run the method, seed, steps and rates and every training,
    scoring, selection and calibration setting (L_reg's weights, the row budget, ...). A cached
    record with another key was computed under other settings and is computed again, so changing
    a default can never mix old and new numbers in one record. The device is not part of it, nor a
    setting added later at the value that reproduces the earlier code exactly (``ADDED_OFF``), so
    adding a feature keeps the cells computed before it."""
    settings = ctx.settings
    what: dict = {"model": ctx.model_digest, "concepts": [c.name for c in ctx.concepts],
                  "images_per_concept": settings.images_per_concept,
                  "noise_per_background": settings.noise_per_background}
    if method is not None:
        hyper = hyper or hyper_for(method, settings)
        config = cns_config(settings, ctx.work / "key", hyper, seed, "cpu", method)  # (writes the calibration captions, as a run does)
        calibration = asdict(config.calibration)
        calibration.pop("prompts_file")  # a scratch path; its captions come from the code
        what |= {"method": {k: v for k, v in asdict(method).items() if k not in ("name", "about")},
                 "seed": seed, "hyper": asdict(hyper), "lora_rank": settings.lora_rank,
                 "train": {k: v for k, v in asdict(config.train).items()
                           if k != "log_every" and ADDED_OFF.get(f"train.{k}", object()) != v}}
        if method.combine != "alone" and settings.region_base:  # the two-concept readings with regions
            what["region_base"] = settings.region_base
        if method.combine != "alone" and ctx.draws_three:  # a record with three-concept readings
            what["triples"] = 1
        if method.learner == "cns":  # only CNS scores, selects and reads general neurons
            what |= {"scoring": asdict(config.scoring), "selection": asdict(config.selection),
                     "calibration": calibration}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def baseline(ctx: Context, cache: Path) -> dict:
    """The pretrained model's readings of every concept prompt (the floor) and of base captions,
    and fresh renders' similarity (the top of the scale)."""
    def compute() -> dict:
        config = cns_config(ctx.settings, ctx.work / "pretrained", DEFAULT_HYPER["cns"], 0, ctx.device)
        base = open_model(config.model_dir, config)
        accuracy, images = zero_shot(base.model, ctx.judge)
        _, fresh = reference_embeddings(ctx.judge, ctx.concepts, ctx.dirs)
        save_images(images, cache / "pretrained-zero-shot.png")
        save_images(gray_samples(base.model, ctx, list(range(len(ctx.concepts)))), cache / "pretrained-samples.png")
        return {"zero_shot": accuracy, "fresh_similarity": fresh,
                "concepts": concept_readings(base.model, ctx, list(range(len(ctx.concepts))))}
    return cached_run(cache / "pretrained.json", compute, run_key(ctx))


def run_benchmark(settings: BenchSettings, out: Path, cache: Path | None = None, device: str = "cpu",
                  shard: tuple[int, int] | None = None) -> Path:
    """Run (or resume) every method x seed not in ``cache`` yet, then write the report to ``out``.
    ``shard=(k, n)``: only every n-th (method, seed) from the k-th, and no report (n processes side
    by side, e.g. on one GPU, which a 1.7 M-parameter model leaves mostly idle)."""
    from world.report import write_report

    started = time.perf_counter()
    if settings.require_gate:
        tuned = Path(settings.tuned or "")
        gate = json.loads(tuned.read_text()).get("gate", {}) if tuned.is_file() else {}
        if not gate.get("passed"):
            from cns.errors import CNSError

            raise CNSError(tuned, "the world model has not passed the gate (all-K/V ceiling >= 0.8 on the "
                                  "validation concepts): run `cns bench world --sweep tune` first"
                                  + (f"; it measured {gate['kv_identity']:.2f}" if gate else ""), "world_gate")
    cache = cache or out / "cache"
    concepts = benchmark_concepts(settings)
    ctx = context(settings, concepts, cache / shard_work(shard), device)  # .work* is git-ignored scratch
    base = baseline(ctx, cache)
    base_images = load_images(cache / "pretrained-zero-shot.png")
    runs = {}
    for i, (name, seed) in enumerate((n, s) for n in settings.methods for s in settings.seeds):
        method = METHODS[name]
        if not in_shard(shard, i):
            continue
        t = time.perf_counter()
        runs[(name, seed)] = method_run(cache / name / f"seed{seed}.json", method, seed, ctx, base_images)
        log.info("%s seed %d: %.0fs", name, seed, time.perf_counter() - t)
    if shard:
        return out
    write_report(settings, concepts, base, runs, cache, ctx.dirs, out, seconds=time.perf_counter() - started,
                 device=device)
    return out
