"""``cns bench world``: Concept Neuron Selection against the methods people use instead, in the
benchmark world, side by side on the same concepts, step budget and seeds.

Methods (each learns the concepts in the same order, each concept with its own new token whose
embedding trains too, starting from its class noun):

- ``cns``            the library's CNS, unchanged (prepare, general, score, select, train, commit);
- ``cns_no_general`` CNS without general-neuron removal;
- ``cns_no_reg``     CNS without L_reg;
- ``cns_random``     random rows in place of the scored ones, the same count in every layer,
                     drawn from the rows CNS could have picked (not general, not owned);
- ``naive_kv``       every cross-attention K/V row, no regularization, one concept after the other
                     (Custom Diffusion's trainable set, trained sequentially);
- ``lora_seq``       a rank-r LoRA on every K/V projection per concept, merged into the weights
                     before the next concept;
- ``lora_fused``     one LoRA per concept on the pretrained model, fused at the end by adding the
                     weight deltas (the plain weight-sum fusion that Mix-of-Show compares its
                     gradient fusion against; gradient fusion itself is not implemented here);
- ``single_kv``      the fidelity ceiling: every K/V row, each concept alone on the pretrained model.

Metrics come from the world's truth (world.metrics, world.judge): concept fidelity, prompt
fidelity, the fidelity matrix (concept i after learning concept j) and forgetting, zero-shot
drift on base captions, and two concepts in one prompt.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from cns.config import Config, config_from_dict
from cns.cumulative import CumulativeModel, open_model
from cns.learn import commit, general, prepare, score, select
from cns.learn import train as cns_train
from cns.neurons import count, difference, empty_mask, row_counts, weights_in
from cns.selection import Selection
from cns.train import TrainableToken, finetune
from world.concepts import write_concept_dirs
from world.judge import load_judge
from world.metrics import attribute_accuracy, base_prompts, concept_prompts, pair_accuracy, sample
from world.model import MODEL_DIR
from world.scene import BACKGROUNDS, COLORS, HELDOUT_PAIRS, SHAPES, Obj, WorldConcept, caption, load_concepts

log = logging.getLogger(__name__)

METHODS = ("cns", "cns_no_general", "cns_no_reg", "cns_random", "naive_kv", "lora_seq", "lora_fused", "single_kv")
SEQUENTIAL = ("cns", "cns_no_general", "cns_no_reg", "cns_random", "naive_kv", "lora_seq")


@dataclass
class BenchSettings:
    concepts: int = 10
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-2
    token_learning_rate: float = 5e-2
    lora_rank: int = 4
    lora_learning_rate: float = 1e-2
    base_ratio: float = 0.06
    images_per_concept: int = 5
    seeds_per_prompt: int = 1
    seed: int = 0
    model_dir: str = str(MODEL_DIR)

    @classmethod
    def smoke(cls) -> "BenchSettings":
        return cls(concepts=2, steps=8, methods=["cns", "naive_kv", "lora_fused", "single_kv"])


# ---- configuration shared by every method ---------------------------------------------------

def world_calibration_prompts(path: Path) -> Path:
    """General neurons of the world's model come from the world's own captions."""
    lines = [caption([Obj(s, c)], bg) for s in SHAPES for c in COLORS
             for bg in BACKGROUNDS if (s, c) not in HELDOUT_PAIRS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cns_config(settings: BenchSettings, work: Path, device: str = "cpu", **train_overrides) -> Config:
    train = {"learning_rate": settings.learning_rate, "token_learning_rate": settings.token_learning_rate,
             "max_train_steps": settings.steps, "train_batch_size": settings.batch_size, "seed": settings.seed,
             "random_flip": False, "log_every": 0} | train_overrides
    return config_from_dict({
        "model": {"pretrained_model_name_or_path": settings.model_dir, "device": device, "mixed_precision": "no"},
        "model_dir": str(work / "model"), "cache_dir": str(work / "cache"),
        "scoring": {"base_ratio": settings.base_ratio},
        "calibration": {"prompts_file": str(world_calibration_prompts(work / "calibration.txt"))},
        "train": train,
        "evaluate": {"holdout_images": 1},
        "limits": {"min_images": 3},
    }, source="world bench")


# ---- LoRA on the K/V projections (baselines) --------------------------------------------------

class LoRA(nn.Module):
    """``W + B A`` on one frozen Linear through a forward hook (B starts at zero)."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        device = linear.weight.device
        self.A = nn.Parameter((torch.randn(rank, linear.in_features, generator=generator) / rank).to(device))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
        self.handle = linear.register_forward_hook(lambda m, args, out: out + args[0] @ self.A.T @ self.B.T)

    def delta(self) -> torch.Tensor:
        return (self.B @ self.A).detach()

    def remove(self) -> None:
        self.handle.remove()


def train_lora(cumulative: CumulativeModel, prepared, settings: BenchSettings) -> dict[str, torch.Tensor]:
    """Train one LoRA per K/V layer and the token row; returns {layer: delta W} (not applied)."""
    model = cumulative.model
    generator = torch.Generator().manual_seed(settings.seed)
    loras = {layer.name: LoRA(layer.linear, settings.lora_rank, generator) for layer in cumulative.layers}
    token = TrainableToken(model.token_embedding, prepared.token_id)
    optimizer = torch.optim.AdamW([
        {"params": [p for lora in loras.values() for p in lora.parameters()], "lr": settings.lora_learning_rate},
        {"params": [token.row], "lr": settings.token_learning_rate}], weight_decay=0.0)
    from cns.diffusion import diffusion_loss, encode_prompts

    try:
        for _ in range(settings.steps):
            latents, ids = prepared.source.sample(settings.batch_size)
            loss = diffusion_loss(model, latents, encode_prompts(model, ids), prepared.source.generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for lora in loras.values():
            lora.remove()
        token.release(model.token_embedding)
    return {name: lora.delta() for name, lora in loras.items()}


def add_deltas(cumulative: CumulativeModel, deltas: dict[str, torch.Tensor], sign: float = 1.0) -> None:
    with torch.no_grad():
        for layer in cumulative.layers:
            if layer.name in deltas:
                layer.linear.weight.add_(sign * deltas[layer.name])


# ---- one method -------------------------------------------------------------------------------

@dataclass
class MethodRun:
    name: str
    # matrix[j][i]: concept i's reading after learning concepts 0..j (None where i > j)
    matrix: list[list[dict | None]] = field(default_factory=list)
    train_seconds: float = 0.0
    neurons: list[int] = field(default_factory=list)
    weights_changed: int = 0
    final: dict = field(default_factory=dict)
    samples: list[np.ndarray] = field(default_factory=list)  # per concept, its final sample on gray


def gray_samples(model, concepts: list[WorldConcept], indices: list[int], seed: int) -> list[np.ndarray]:
    prompts = [caption([Obj(concept=c)], "gray") for c in concepts]
    return list(sample(model, prompts, [seed + 1000 * i for i in indices]))


def evaluate_concepts(model, judge, concepts: list[WorldConcept], indices: list[int],
                      settings: BenchSettings, references: dict[str, torch.Tensor]) -> list[dict]:
    """Concept and prompt fidelity of each concept: one sample per background (per seed). A
    sample's seed depends only on its concept's index and prompt, so a concept is drawn from the
    same noise after every later concept and in every method."""
    prompts, bgs, owners, seeds = [], [], [], []
    for k, (concept, index) in enumerate(zip(concepts, indices)):
        for j, (text, bg) in enumerate(concept_prompts(concept)):
            for s in range(settings.seeds_per_prompt):
                prompts.append(text)
                bgs.append(bg)
                owners.append(k)
                seeds.append(settings.seed + 1000 * index + 10 * j + s)
    images = sample(model, prompts, seeds)
    reads = judge.read(images)
    embeddings = judge.embeddings(images)
    out = []
    for k, concept in enumerate(concepts):
        mine = [i for i, o in enumerate(owners) if o == k]
        out.append({
            "concept_fidelity": float(np.mean([reads[i]["identity"] == concept.name for i in mine])),
            "concept_similarity": float((embeddings[mine] @ references[concept.name]).mean()),
            "prompt_fidelity": float(np.mean([reads[i]["background"] == bgs[i] for i in mine])),
        })
    return out


def reference_embeddings(judge, concepts: list[WorldConcept], dirs: list[Path]) -> tuple[dict, dict]:
    """Each concept's reference for concept similarity (the unit mean judge embedding of its
    photos), and the similarity's validation on fresh renders: same concept against others."""
    from world.scene import concept_training_scenes, render

    references = {}
    for concept, directory in zip(concepts, dirs):
        photos = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(directory.glob("*.png"))])
        references[concept.name] = torch.nn.functional.normalize(judge.embeddings(photos).mean(0), dim=0)
    same, other = [], []
    for concept in concepts:
        fresh = judge.embeddings(np.stack([render(s) for s in concept_training_scenes(concept, 6, seed=999)]))
        for name, ref in references.items():
            (same if name == concept.name else other).append(float((fresh @ ref).mean()))
    return references, {"same_concept": float(np.mean(same)), "other_concepts": float(np.mean(other))}


def zero_shot(model, judge, seed: int) -> tuple[dict, np.ndarray]:
    triples = base_prompts("heldout") + base_prompts("seen")
    prompts = [caption([Obj(s, c)], bg) for s, c, bg in triples]
    images = sample(model, prompts, [seed + i for i in range(len(prompts))])
    return attribute_accuracy(model, judge, triples, images=images), images


def two_concepts(model, judge, concepts: list[WorldConcept], seed: int) -> dict:
    if len(concepts) < 2:
        return {}
    pairs = [(concepts[i], concepts[(i + 1) % len(concepts)]) for i in range(len(concepts))]
    bgs = [list(BACKGROUNDS)[i % len(BACKGROUNDS)] for i in range(len(pairs))]
    prompts = [caption([Obj(concept=a), Obj(concept=b)], bg) for (a, b), bg in zip(pairs, bgs)]
    images = sample(model, prompts, [seed + i for i in range(len(prompts))])
    return pair_accuracy(judge.read_pair(images), pairs, bgs)


def run_method(name: str, settings: BenchSettings, concepts: list[WorldConcept], concept_dirs: list[Path],
               judge, references: dict[str, torch.Tensor], work: Path, base_zero_shot: tuple[dict, np.ndarray],
               device: str = "cpu") -> MethodRun:
    from cns.concept import load_concept, hash_concept_dir

    run = MethodRun(name)
    overrides = {"reg_previous_weight": 0.0, "reg_pretrained_weight": 0.0, "reg_output_weight": 0.0} \
        if name in ("cns_no_reg", "naive_kv", "lora_seq", "lora_fused", "single_kv") else {}
    config = cns_config(settings, work / name, device, **overrides)
    cumulative = open_model(config.model_dir, config)
    general_mask = general(cumulative, config)[0]
    layer_rows = row_counts(cumulative.layers)
    all_rows = {n: torch.ones(r, dtype=torch.bool) for n, r in layer_rows.items()}
    rng = torch.Generator().manual_seed(settings.seed)
    fused: list[dict[str, torch.Tensor]] = []
    learned: list[WorldConcept] = []
    for k, (concept, directory) in enumerate(zip(concepts, concept_dirs)):
        log.info("%s: concept %d/%d (%s)", name, k + 1, len(concepts), concept.name)
        if name == "single_kv":  # every concept alone on the pretrained model
            cumulative = open_model(work / name / f"model-{k}", config)
        concept_files = load_concept(directory)
        prepared = prepare(cumulative, concept_files, config)
        start = time.perf_counter()
        if name.startswith("cns"):
            scores = score(cumulative, prepared, config, progress=False)
            selection = select(cumulative, scores, empty_mask(layer_rows) if name == "cns_no_general" else general_mask,
                               config)
            if name == "cns_random":
                selection = random_selection(selection, cumulative, general_mask, rng)
            result = cns_train(cumulative, prepared, selection, config, progress=False)
            commit(cumulative, prepared, selection, scores, result, hash_concept_dir(directory), config)
            run.neurons.append(count(selection.concept))
        elif name in ("naive_kv", "single_kv"):
            finetune(cumulative.model, cumulative.layers, all_rows, prepared.token_id, prepared.source, config.train,
                     pretrained=cumulative.pretrained, progress=False)
            run.neurons.append(count(all_rows))
        else:  # LoRA
            deltas = train_lora(cumulative, prepared, settings)
            add_deltas(cumulative, deltas)
            if name == "lora_fused":
                fused.append(deltas)
            run.neurons.append(count(all_rows))
        run.train_seconds += time.perf_counter() - start
        learned.append(concept)
        if name == "single_kv":
            row = [None] * len(concepts)
            row[k] = evaluate_concepts(cumulative.model, judge, [concept], [k], settings, references)[0]
            run.matrix.append(row)
            print(f"[bench world] {name} {concept.name}: fidelity {row[k]['concept_fidelity']:.2f}", flush=True)
            run.samples += gray_samples(cumulative.model, [concept], [k], 90_000)
            continue
        if name == "lora_fused":
            # "right after learning" = the concept's own LoRA alone; then back to the pretrained weights.
            reading = evaluate_concepts(cumulative.model, judge, [concept], [k], settings, references)[0]
            add_deltas(cumulative, deltas, -1.0)
            row = [None] * len(concepts)
            row[k] = reading
            run.matrix.append(row)
            continue
        readings = evaluate_concepts(cumulative.model, judge, learned, list(range(len(learned))), settings,
                                     references)
        run.matrix.append(readings + [None] * (len(concepts) - len(learned)))
        print(f"[bench world] {name} after {concept.name}: fidelity {readings[-1]['concept_fidelity']:.2f}, "
              f"mean so far {np.mean([r['concept_fidelity'] for r in readings]):.2f}, "
              f"prompt {readings[-1]['prompt_fidelity']:.2f}", flush=True)
    if name == "lora_fused":
        for deltas in fused:
            add_deltas(cumulative, deltas)
        run.matrix.append(evaluate_concepts(cumulative.model, judge, learned, list(range(len(learned))), settings,
                                            references))
    if name == "single_kv":
        run.final = {"concepts": [run.matrix[k][k] for k in range(len(concepts))]}
        run.weights_changed = weights_in(all_rows, cumulative.layers)
        return run
    run.final = {"concepts": run.matrix[-1][:len(concepts)]}
    run.samples = gray_samples(cumulative.model, learned, list(range(len(learned))), 90_000)
    accuracy, images = zero_shot(cumulative.model, judge, 50_000)
    run.final["zero_shot"] = accuracy
    run.final["zero_shot_pixel_change"] = float(np.abs(images.astype(np.float32)
                                                        - base_zero_shot[1].astype(np.float32)).mean() / 255)
    run.final["pairs"] = two_concepts(cumulative.model, judge, learned, 60_000)
    changed = {layer.name: (layer.linear.weight.detach().cpu() != cumulative.pretrained[layer.name]).any(1)
               for layer in cumulative.layers}
    run.weights_changed = weights_in(changed, cumulative.layers)
    return run


def random_selection(selection: Selection, cumulative: CumulativeModel, general_mask, rng: torch.Generator) -> Selection:
    """As many rows per layer as CNS selected, drawn at random from the rows CNS could pick."""
    allowed = difference(difference({n: torch.ones_like(m) for n, m in selection.concept.items()}, general_mask),
                         cumulative.owned())
    concept = {}
    for name, mask in selection.concept.items():
        pool = allowed[name].nonzero().flatten()
        k = min(int(mask.sum()), len(pool))
        rows = torch.zeros_like(mask)
        rows[pool[torch.randperm(len(pool), generator=rng)[:k]]] = True
        concept[name] = rows
    return replace(selection, concept=concept)


# ---- the whole benchmark ----------------------------------------------------------------------

def summarize(run: MethodRun, ceiling: MethodRun | None, base_accuracy: dict) -> dict:
    n = len(run.final["concepts"])
    diag = [run.matrix[k][k]["concept_fidelity"] for k in range(n)]
    final = [c["concept_fidelity"] for c in run.final["concepts"]]
    diag_sim = [run.matrix[k][k]["concept_similarity"] for k in range(n)]
    final_sim = [c["concept_similarity"] for c in run.final["concepts"]]
    row = {"method": run.name,
           "fidelity_just_learned": float(np.mean(diag)),
           "fidelity_final": float(np.mean(final)),
           "similarity_just_learned": float(np.mean(diag_sim)),
           "similarity_final": float(np.mean(final_sim)),
           "forgetting_similarity": float(np.mean([d - f for d, f in zip(diag_sim[:-1], final_sim[:-1])]))
           if n > 1 else 0.0,
           "prompt_fidelity_final": float(np.mean([c["prompt_fidelity"] for c in run.final["concepts"]])),
           "forgetting": float(np.mean([d - f for d, f in zip(diag[:-1], final[:-1])])) if n > 1 else 0.0,
           "neurons_per_concept": float(np.mean(run.neurons)),
           "weights_changed": run.weights_changed,
           "train_seconds": round(run.train_seconds, 1)}
    if ceiling is not None:
        ceil = float(np.mean([c["concept_fidelity"] for c in ceiling.final["concepts"]]))
        row["fidelity_vs_ceiling"] = row["fidelity_final"] / ceil if ceil else float("nan")
        ceil_sim = float(np.mean([c["concept_similarity"] for c in ceiling.final["concepts"]]))
        row["similarity_vs_ceiling"] = row["similarity_final"] / ceil_sim if ceil_sim else float("nan")
    if "zero_shot" in run.final:
        row["zero_shot_accuracy"] = run.final["zero_shot"]["all"]
        row["zero_shot_drift"] = base_accuracy["all"] - run.final["zero_shot"]["all"]
        row["zero_shot_pixel_change"] = run.final["zero_shot_pixel_change"]
        row.update({f"two_concepts_{k.removeprefix('pair_')}": v for k, v in run.final["pairs"].items()})
    return row


def run_benchmark(settings: BenchSettings, out: Path, device: str = "cpu") -> Path:
    started = time.perf_counter()
    concepts = load_concepts()[:settings.concepts]
    if len(concepts) < settings.concepts:
        raise ValueError(f"data/world/concepts.yaml holds {len(concepts)} concepts, {settings.concepts} asked for")
    judge = load_judge()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cns-world-") as tmp:
        work = Path(tmp)
        dirs = write_concept_dirs(concepts, work / "concepts", images=settings.images_per_concept)
        dirs_images = [np.asarray(Image.open(d / "00.png").convert("RGB")) for d in dirs]
        base = open_model(work / "pretrained", cns_config(settings, work / "pretrained", device))
        base_zero_shot = zero_shot(base.model, judge, 50_000)
        references, similarity_validation = reference_embeddings(judge, concepts, dirs)
        base_readings = evaluate_concepts(base.model, judge, concepts, list(range(len(concepts))), settings,
                                          references)
        runs: dict[str, MethodRun] = {}
        for name in settings.methods:
            t = time.perf_counter()
            runs[name] = run_method(name, settings, concepts, dirs, judge, references, work, base_zero_shot,
                                    device)
            log.info("%s done in %.0fs", name, time.perf_counter() - t)
            print(f"[bench world] {name}: {time.perf_counter() - t:.0f}s", flush=True)
    ceiling = runs.get("single_kv")
    rows = [summarize(run, ceiling if name != "single_kv" else None, base_zero_shot[0]) for name, run in runs.items()]
    pictures(runs, concepts, dirs_images, base_zero_shot[1], out)
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {device}",
              "seconds": round(time.perf_counter() - started, 1), "settings": asdict(settings),
              "pretrained_zero_shot": base_zero_shot[0], "judge": judge.record.get("validation"),
              "similarity_validation": similarity_validation,
              "pretrained_concept_similarity": float(np.mean([r["concept_similarity"] for r in base_readings])),
              "concepts": [c.name for c in concepts], "results": rows,
              "matrices": {name: run.matrix for name, run in runs.items()}}
    write_results(record, out)
    return out


def pictures(runs: dict[str, MethodRun], concepts: list[WorldConcept], photos: list[np.ndarray],
             zero_shot_images: np.ndarray, out: Path) -> None:
    """samples.png: a training photo of each concept, then each method's final sample of it on
    gray; pretrained_heldout.png: the pretrained model on held-out (shape, colour) pairs (rows)
    and every background (columns)."""
    from cns.generate import grid

    rows = [[Image.fromarray(p) for p in photos]]
    rows += [[Image.fromarray(a) for a in run.samples] for run in runs.values()]
    canvas = grid(rows, cell=64)
    labelled = Image.new("RGB", (canvas.width + 110, canvas.height), "white")
    labelled.paste(canvas, (110, 0))
    draw = ImageDraw.Draw(labelled)
    for k, label in enumerate(["training photo", *runs]):
        draw.text((4, 64 * k + 26), label, fill="black")
    labelled.save(out / "samples.png")
    n_bg = len(BACKGROUNDS)
    heldout = [[Image.fromarray(a) for a in zero_shot_images[i * n_bg:(i + 1) * n_bg]]
               for i in range(len(HELDOUT_PAIRS))]
    grid(heldout, cell=64).save(out / "pretrained_heldout.png")


def write_results(record: dict, out: Path) -> None:
    from world.plots import plot_curves, plot_matrices

    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = record["results"]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "after", "concept", "concept_fidelity", "prompt_fidelity"])
        for name, matrix in record["matrices"].items():
            for j, row in enumerate(matrix):
                for i, cell in enumerate(row):
                    if cell is not None:
                        writer.writerow([name, j + 1, record["concepts"][i], cell["concept_fidelity"],
                                         cell["prompt_fidelity"]])
    (out / "results.md").write_text(markdown(record))
    plot_matrices(record, out / "fidelity_matrices.png")
    plot_curves(record, out / "forgetting_curves.png")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def markdown(record: dict) -> str:
    rows = record["results"]
    columns = [("method", "method"), ("fidelity_final", "concept fidelity (final)"),
               ("fidelity_just_learned", "fidelity right after learning"), ("forgetting", "forgetting"),
               ("fidelity_vs_ceiling", "final fidelity / ceiling"),
               ("similarity_final", "concept similarity (final)"),
               ("similarity_just_learned", "similarity right after learning"),
               ("forgetting_similarity", "forgetting (similarity)"), ("similarity_vs_ceiling", "similarity / ceiling"),
               ("prompt_fidelity_final", "prompt fidelity"),
               ("zero_shot_accuracy", "zero-shot accuracy"), ("zero_shot_drift", "zero-shot drift"),
               ("zero_shot_pixel_change", "zero-shot pixel change"), ("two_concepts_both", "two concepts: both right"),
               ("neurons_per_concept", "rows per concept"), ("train_seconds", "train s")]
    lines = [f"# Benchmark world results ({record['date']})", "",
             f"Machine: {record['machine']}; whole run {record['seconds'] / 60:.1f} min. Concepts: "
             f"{', '.join(record['concepts'])}. Settings: `{json.dumps(record['settings'])}`.", "",
             f"Pretrained model, zero-shot attribute accuracy on base captions: "
             f"{_fmt(record['pretrained_zero_shot']['all'])} (all three right), shape "
             f"{_fmt(record['pretrained_zero_shot']['shape'])}, colour {_fmt(record['pretrained_zero_shot']['color'])}, "
             f"background {_fmt(record['pretrained_zero_shot']['background'])}.", "",
             "| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |")
    by = {row["method"]: row for row in rows}
    if "cns" in by and "naive_kv" in by:
        cns, naive = by["cns"], by["naive_kv"]
        lines += ["", "Ratios (CNS against naive sequential all-K/V finetuning):", ""]
        lines.append(f"- forgetting: {_ratio(cns['forgetting'], naive['forgetting'])} (target at most 0.333); "
                     f"on concept similarity: {_ratio(cns['forgetting_similarity'], naive['forgetting_similarity'])}")
        if "zero_shot_drift" in cns:
            lines.append(f"- zero-shot drift: {_ratio(cns['zero_shot_drift'], naive['zero_shot_drift'])} "
                         "(target at most 0.333); pixel change: "
                         f"{_ratio(cns['zero_shot_pixel_change'], naive['zero_shot_pixel_change'])}")
        if "fidelity_vs_ceiling" in cns:
            lines.append(f"- final fidelity / single-concept ceiling: {_fmt(cns['fidelity_vs_ceiling'])} "
                         f"(target at least 0.9); on concept similarity: {_fmt(cns['similarity_vs_ceiling'])}")
    if "cns" in by and "cns_random" in by:
        lines.append(f"- random rows at the same count: final fidelity {_fmt(by['cns_random']['fidelity_final'])} "
                     f"against {_fmt(by['cns']['fidelity_final'])} for scored rows; similarity "
                     f"{_fmt(by['cns_random']['similarity_final'])} against {_fmt(by['cns']['similarity_final'])}")
    lines += ["", "Forgetting = mean over concepts 1..N-1 of (fidelity right after learning it - fidelity after "
              "all N); the same on concept similarity (cosine of judge embeddings to the concept's own photos, "
              "the DINO analogue; validation on fresh renders: "
              f"{json.dumps(record['similarity_validation'])}; the pretrained model's samples for the concept "
              f"prompts score {_fmt(record['pretrained_concept_similarity'])}). Zero-shot drift = the pretrained model's base-caption accuracy minus the method's "
              "after all concepts. Judge validation on fresh renders: "
              f"`{json.dumps(record['judge'])}`.", ""]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    if b <= 0:
        return f"undefined ({_fmt(a)} against {_fmt(b)})"
    return f"{a / b:.3f} ({_fmt(a)} / {_fmt(b)})"
