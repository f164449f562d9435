"""Learning one concept into the cumulative model, one function per step of the method:

    prepare -> general -> score -> select -> train -> commit

:func:`learn` runs them all (the ``cns learn`` command); the pipeline calls the steps as separate
tasks on one in-memory model. Nothing touches the model directory until :func:`commit`, which
writes the concept's files to a temporary folder, renames it into place and then replaces
``lineage.json`` atomically: a crash at any point leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from cns.calibration import cached_general_neurons, load_calibration_prompts
from cns.concept import MANIFEST, Concept, hash_concept_dir, load_concept
from cns.config import Config
from cns.cumulative import CumulativeModel, file_digest, open_model
from cns.delta import add_token, save_delta, save_masks
from cns.diffusion import ConceptBatchSource, encode_prompts, image_latents, tokenize
from cns.errors import CNSError
from cns.evaluate import concept_prompts, sample_outputs, sampling_settings, save_reference
from cns.info import account
from cns.lineage import (
    DELTA, MASK, REFERENCE, ConceptRecord, Lineage, check_against_lineage, concept_dir, relative_file,
    write_lineage,
)
from cns.neurons import Mask
from cns.scoring import score_neurons
from cns.selection import Selection, select_concept_neurons
from cns.train import TrainResult, finetune

log = logging.getLogger(__name__)

@dataclass
class PreparedConcept:
    concept: Concept
    token_id: int
    source: ConceptBatchSource
    concept_token_ids: list[int]
    resolution: int
    holdout_paths: tuple[Path, ...] = ()
    # Each step's wall-clock seconds under its own name (``timed``), and the process's peak RSS
    # after a step (the pipeline's tasks measure it): lineage stats ``timings`` / ``peak_rss_mb``.
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def timed(prepared: "PreparedConcept", step: str):
    """Record the block's seconds as ``prepared.seconds[step]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        prepared.seconds[step] = time.perf_counter() - start


def check_token(cumulative: CumulativeModel, concept: Concept, source: str | Path) -> None:
    """The token must be new to the tokenizer and come out as exactly one token in a prompt."""
    tokenizer = cumulative.model.tokenizer
    if concept.token in tokenizer.get_vocab():
        raise CNSError(source, f"token {concept.token} is already in the tokenizer's vocabulary; pick a new one "
                               "such as <name1>", "token_invalid")
    trial = copy.deepcopy(tokenizer)
    trial.add_tokens([concept.token])
    new_id = trial.convert_tokens_to_ids(concept.token)
    ids = trial(f"a photo of a {concept.token} {concept.class_noun}", add_special_tokens=False).input_ids
    plain = trial(f"a photo of a {concept.class_noun}", add_special_tokens=False).input_ids
    if ids.count(new_id) != 1 or len(ids) != len(plain) + 1:
        raise CNSError(source, f"token {concept.token} is not kept as one new token by the tokenizer "
                               "(use lower case, e.g. <name1>)", "token_invalid")


def prepare(cumulative: CumulativeModel, concept: Concept, config: Config) -> PreparedConcept:
    """Validate the concept against the model, add its token (initialised from the class noun),
    encode its images once and build the seeded sampler of training pairs."""
    start = time.perf_counter()
    model = cumulative.model
    manifest = (concept.directory / MANIFEST) if concept.directory else concept.name
    check_against_lineage(concept, cumulative.lineage, manifest)
    check_token(cumulative, concept, manifest)
    class_ids = model.tokenizer(concept.class_noun, add_special_tokens=False).input_ids
    token_id = add_token(model, concept.token)
    with torch.no_grad():
        emb = model.token_embedding.weight
        # Start from the class noun (mean of its pieces): the model already draws a dog for "dog".
        emb[token_id] = emb[class_ids].mean(dim=0)
    resolution = config.train.resolution or model.native_resolution
    train_paths, holdout_paths = concept.split(config.evaluate.holdout_images, config.limits.min_images - 1)
    latents = image_latents(model, concept.load_images(train_paths), resolution, with_flips=config.train.random_flip)
    captions = concept.captions_for(train_paths)
    if captions is not None:  # each image with its own caption (flipped copies too)
        input_ids = tokenize(model, captions * (2 if config.train.random_flip else 1))
    else:
        input_ids = tokenize(model, concept.training_prompts(config.train.prompt_template))
    generator = torch.Generator().manual_seed(config.train.seed)
    prepared = PreparedConcept(concept=concept, token_id=token_id,
                               source=ConceptBatchSource(latents.cpu(), input_ids, generator,
                                                         paired=captions is not None),
                               concept_token_ids=[token_id, *class_ids], resolution=resolution,
                               holdout_paths=holdout_paths)
    prepared.seconds["prepare"] = time.perf_counter() - start
    return prepared


def general(cumulative: CumulativeModel, config: Config) -> tuple[Mask, Path]:
    """The base model's general neurons (cached per base model and calibration settings)."""
    return cached_general_neurons(cumulative.model, cumulative.layers, config.calibration, cumulative.base_hash,
                                  config.cache_dir, weights=cumulative.pretrained)


def score(cumulative: CumulativeModel, prepared: PreparedConcept, config: Config, progress: bool = True):
    with timed(prepared, "score"):
        return score_neurons(cumulative.model, cumulative.layers, prepared.source, config.scoring,
                             mixed_precision=config.model.mixed_precision, progress=progress,
                             concept_token_ids=prepared.concept_token_ids)


def select(cumulative: CumulativeModel, scores, general_mask: Mask, config: Config) -> Selection:
    return select_concept_neurons(scores, config.scoring.base_ratio, general_mask, cumulative.owned(),
                                  exclude_owned=config.selection.exclude_owned,
                                  rank_among_free=config.selection.rank_among_free)


def earlier_prompt_states(cumulative: CumulativeModel, config: Config) -> torch.Tensor | None:
    """Text states of earlier concepts' prompts (their real tokens), for L_reg's output term."""
    if not cumulative.lineage.concepts or not config.train.reg_output_weight:
        return None
    return prompt_states(cumulative, earlier_prompts(cumulative, config))


def earlier_prompts(cumulative: CumulativeModel, config: Config) -> list[str]:
    """Every earlier concept's training text: its per-image captions (what it trained on, when the
    manifest has them) and its manifest prompts, or else the template with its token."""
    prompts = []
    for record in cumulative.lineage.concepts:
        prompts += record.captions + (record.prompts or ([] if record.captions else [
            config.train.prompt_template.format(token=record.token, class_noun=record.class_noun)]))
    return prompts


def generic_prompts(config: Config) -> list[str]:
    """Up to ``train.reg_generic_prompts`` calibration captions, an even spread of the set."""
    prompts = load_calibration_prompts(config.calibration.prompts_file)
    step = max(1, len(prompts) // max(1, config.train.reg_generic_prompts))
    return prompts[::step][:config.train.reg_generic_prompts]


def generic_prompt_states(cumulative: CumulativeModel, config: Config) -> torch.Tensor | None:
    """Text states of up to ``train.reg_generic_prompts`` calibration captions (an even spread of
    the set), for L_reg's generic output prior: what K/V rows return for ordinary prompts."""
    if not config.train.reg_generic_weight or not config.train.reg_generic_prompts:
        return None
    return prompt_states(cumulative, generic_prompts(config))


def prompt_states(cumulative: CumulativeModel, prompts: list[str], padding: bool = False) -> torch.Tensor:
    """The text encoder's states of ``prompts``, start to end token (``padding``: every position,
    the padding the UNet attends to included), stacked."""
    ids = tokenize(cumulative.model, prompts)
    eos = cumulative.model.tokenizer.eos_token_id
    keep = torch.arange(ids.shape[1]).unsqueeze(0) <= (ids == eos).int().argmax(dim=1, keepdim=True)
    if padding:
        keep = torch.ones_like(keep)
    with torch.no_grad():
        states = encode_prompts(cumulative.model, ids)
    return states[keep.to(states.device)].detach()


def protected_states(cumulative: CumulativeModel, config: Config) -> list[tuple[torch.Tensor | None, float]]:
    """Null-space rows' groups (cns.train.protected_projector): the generic captions, then the
    earlier concepts' prompts, each with the empty prompt (classifier-free guidance's other
    half) and at every position the UNet attends to, padding included: a row change that left
    the padding's or the empty prompt's K/V free would still redraw an earlier concept's images
    (measured on the world: protecting only start-to-end tokens kept bowtie's bitmap no better
    than no protection, 0.79 -> 0.61 against 0.79 -> 0.60, when plusdot shared its rows)."""
    train = config.train
    groups: list[tuple[torch.Tensor | None, float]] = []
    if train.protect_generic:
        groups.append((prompt_states(cumulative, [""] + generic_prompts(config), padding=True), train.protect_generic))
    if train.protect_earlier and cumulative.lineage.concepts:
        # their training captions and the prompts their forgetting is read on
        prompts = [""] + earlier_prompts(cumulative, config) + [
            p.format(token=r.token, class_noun=r.class_noun) for r in cumulative.lineage.concepts
            for p in config.evaluate.prompts]
        groups.append((prompt_states(cumulative, prompts, padding=True), train.protect_earlier))
    return groups


def train(cumulative: CumulativeModel, prepared: PreparedConcept, selection: Selection, config: Config,
          progress: bool = True) -> TrainResult:
    result = finetune(cumulative.model, cumulative.layers, selection.concept, prepared.token_id, prepared.source,
                      config.train, pretrained=cumulative.pretrained,
                      earlier_prompt_states=earlier_prompt_states(cumulative, config),
                      generic_prompt_states=generic_prompt_states(cumulative, config),
                      protected=protected_states(cumulative, config),
                      mixed_precision=config.model.mixed_precision, progress=progress)
    prepared.seconds["train"] = result.seconds
    return result


def reference_samples(cumulative: CumulativeModel, prepared: PreparedConcept, config: Config,
                      progress: bool = False):
    """The concept's fixed-seed samples right after learning: the forgetting measure's reference."""
    concept = prepared.concept
    prompts = concept_prompts(concept.token, concept.class_noun, config.evaluate)
    with timed(prepared, "reference"):
        images = sample_outputs(cumulative.model, prompts, config.evaluate, resolution=prepared.resolution,
                                progress=progress)
    return images, prompts


def commit(cumulative: CumulativeModel, prepared: PreparedConcept, selection: Selection, scores,
           result: TrainResult, dataset_hash: str, config: Config, reference=None) -> ConceptRecord:
    """Write the concept's mask, delta and reference samples, then the new lineage (the version
    exists from here on)."""
    concept = prepared.concept
    model_dir = cumulative.model_dir
    lineage = cumulative.lineage
    version = lineage.version + 1
    final = concept_dir(model_dir, concept.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{concept.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        meta = {"concept": concept.name, "version": str(version), "base_hash": cumulative.base_hash}
        save_masks(tmp / MASK, {"concept": selection.concept, "base": selection.base,
                                "general": selection.general, "owned": selection.owned}, scores, meta)
        save_delta(tmp / DELTA, result.rows, concept.token, result.token_embedding, meta)
        if reference is not None:
            images, prompts = reference
            save_reference(tmp / REFERENCE, images, prompts, sampling_settings(config.evaluate, prepared.resolution))
        if final.exists():  # left by a crash between rename and lineage write: not part of any version
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    earlier = cumulative.concept_masks()
    stats = account(selection.concept, earlier, lineage.base["layers"], lineage.base["unet_parameters"])
    stats.update({
        "selection": selection.summary(),
        "delta_sha256": file_digest(final / DELTA),
        "mask_sha256": file_digest(final / MASK),
        "delta_bytes": (final / DELTA).stat().st_size,
        "final_loss": result.losses[-1] if result.losses else None,
        "train_steps": len(result.losses),
        "protected_directions": result.protected_directions,
        "text_dim": result.text_dim,
        "timings": dict(prepared.seconds),
        **({"peak_rss_mb": dict(prepared.peak_rss_mb)} if prepared.peak_rss_mb else {}),
    })
    record = ConceptRecord(version=version, name=concept.name, token=concept.token, class_noun=concept.class_noun,
                           dataset_hash=dataset_hash, mask=relative_file(concept.name, MASK),
                           delta=relative_file(concept.name, DELTA), prompts=list(concept.prompts),
                           captions=list(dict.fromkeys(concept.captions_for(concept.image_paths) or [])),
                           stats=stats, learned_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    new_lineage = Lineage(base=lineage.base, concepts=[*lineage.concepts, record], removals=lineage.removals)
    write_lineage(model_dir, new_lineage)
    cumulative.lineage = new_lineage
    cumulative.token_ids[concept.name] = prepared.token_id
    return record


def learn_into(cumulative: CumulativeModel, concept: Concept, config: Config, dataset_hash: str,
               progress: bool = True) -> tuple[ConceptRecord, TrainResult]:
    """All steps on an open cumulative model."""
    prepared = prepare(cumulative, concept, config)
    general_mask, _ = general(cumulative, config)
    scores = score(cumulative, prepared, config, progress)
    with timed(prepared, "select"):
        selection = select(cumulative, scores, general_mask, config)
    log.info("%s: %d base neurons minus general (%d in the base model) and owned (%d) -> %d concept neurons",
             concept.name, *selection.summary().values())
    result = train(cumulative, prepared, selection, config, progress)
    reference = reference_samples(cumulative, prepared, config)
    return commit(cumulative, prepared, selection, scores, result, dataset_hash, config, reference), result


def learn(model_dir: str | Path, concept_dir: str | Path, config: Config,
          progress: bool = True) -> tuple[CumulativeModel, ConceptRecord, TrainResult]:
    """``cns learn``: validate the concept directory, open the model, learn, write the new version."""
    concept = load_concept(concept_dir, config.limits)
    cumulative = open_model(model_dir, config)
    record, result = learn_into(cumulative, concept, config, hash_concept_dir(concept_dir), progress)
    return cumulative, record, result
