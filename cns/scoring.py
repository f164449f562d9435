"""Base-neuron scorers: how much each K/V row matters for one concept.

Scorers share one signature and are looked up by name (``scoring.scorer`` in params.yaml), so a
new one is a function plus an entry in :data:`SCORERS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from cns.config import ScoringConfig
from cns.device import autocast
from cns.diffusion import ConceptBatchSource, diffusion_loss, encode_prompts
from cns.models import DiffusionModel
from cns.neurons import KVLayer

log = logging.getLogger(__name__)

Scores = dict[str, torch.Tensor]


@contextmanager
def _grads_on(layers: list[KVLayer]):
    params = [p for layer in layers for p in layer.linear.parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def _gradient_scores(model: DiffusionModel, layers: list[KVLayer], source: ConceptBatchSource, config: ScoringConfig,
                     row_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], desc: str,
                     mixed_precision: str = "no", progress: bool = True) -> Scores:
    """``row_score(W, dL/dW)`` per row (bias as one more column), per batch of draws, averaged
    over batches."""
    scores = {layer.name: torch.zeros(layer.rows) for layer in layers}
    batches = -(-config.num_score_samples // config.score_batch_size)
    with _grads_on(layers):
        for _ in tqdm(range(batches), desc=desc, disable=not progress, leave=False):
            latents, input_ids = source.sample(config.score_batch_size)
            with autocast(model.device, mixed_precision):
                with torch.no_grad():
                    states = encode_prompts(model, input_ids)
                loss = diffusion_loss(model, latents, states, source.generator)
            loss.backward()
            for layer in layers:
                w, g = layer.linear.weight.detach().float(), layer.linear.weight.grad.float()
                if layer.linear.bias is not None:
                    b = layer.linear.bias
                    w = torch.cat([w, b.detach().float()[:, None]], dim=1)
                    g = torch.cat([g, b.grad.float()[:, None]], dim=1)
                scores[layer.name] += row_score(w, g).cpu()
                for p in layer.linear.parameters():
                    p.grad = None
    return {name: s / batches for name, s in scores.items()}


def taylor_scores(model: DiffusionModel, layers: list[KVLayer], source: ConceptBatchSource,
                  config: ScoringConfig, mixed_precision: str = "no", progress: bool = True,
                  concept_token_ids: list[int] | None = None) -> Scores:
    """First-order Taylor importance of each row: |sum_j W_ij dL/dW_ij| (Molchanov et al. 2019).

    It estimates how much the concept's diffusion loss changes if the row is zeroed. Computed per
    batch of (image, prompt, timestep, noise) draws and averaged over batches, so that rows whose
    gradient sign flips between timesteps still count as important.
    """
    return _gradient_scores(model, layers, source, config, lambda w, g: (w * g).sum(dim=1).abs(),
                            "scoring neurons", mixed_precision, progress)


def gradient_scores(model: DiffusionModel, layers: list[KVLayer], source: ConceptBatchSource,
                    config: ScoringConfig, mixed_precision: str = "no", progress: bool = True,
                    concept_token_ids: list[int] | None = None) -> Scores:
    """||dL/dW_i|| per row: how fast the concept's loss falls when the row starts to move, the
    benefit of *training* a row (Taylor estimates the effect of zeroing it)."""
    return _gradient_scores(model, layers, source, config, lambda w, g: g.norm(dim=1), "scoring neurons",
                            mixed_precision, progress)


def _token_positions(input_ids: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    return torch.isin(input_ids, torch.tensor(token_ids))


def row_activations(layers: list[KVLayer], token_states: torch.Tensor,
                    weights: dict[str, torch.Tensor] | None = None) -> Scores:
    """Mean |K/V output| of each row over ``token_states`` (tokens, d).

    ``weights`` optionally replaces the layers' current weights (e.g. the pretrained ones).
    """
    out = {}
    x = token_states.float()
    for layer in layers:
        w = (weights[layer.name] if weights is not None else layer.linear.weight).to(x.device).float()
        b = layer.linear.bias
        y = torch.nn.functional.linear(x, w, None if b is None else b.float())
        out[layer.name] = y.abs().mean(dim=0).cpu()
    return out


@torch.no_grad()
def kv_activations(model: DiffusionModel, layers: list[KVLayer], input_ids: torch.Tensor,
                   positions: torch.Tensor) -> Scores:
    """Mean |K/V output| of each row over the chosen token positions of the prompts.

    K and V see only the text encoder's output, so this needs no UNet pass at all.
    """
    states = encode_prompts(model, input_ids)
    return row_activations(layers, states[positions.to(states.device)])


def activation_scores(model: DiffusionModel, layers: list[KVLayer], source: ConceptBatchSource,
                      config: ScoringConfig, mixed_precision: str = "no", progress: bool = True,
                      concept_token_ids: list[int] | None = None) -> Scores:
    """Activation magnitude of each row on the concept's own tokens (special token and class noun).

    Cheaper than Taylor (no UNet pass, no gradients) but blind to what the images look like.
    """
    ids = source.input_ids
    positions = _token_positions(ids, concept_token_ids) if concept_token_ids else torch.ones_like(ids, dtype=torch.bool)
    return kv_activations(model, layers, ids, positions)


# One signature: (model, layers, source, config, mixed_precision, progress, concept_token_ids); the
# gradient scorers read the concept from the images and prompts, so they ignore the token ids.
SCORERS: dict[str, Callable[..., Scores]] = {"taylor": taylor_scores, "gradient": gradient_scores,
                                             "activation": activation_scores}


def score_neurons(model: DiffusionModel, layers: list[KVLayer], source: ConceptBatchSource, config: ScoringConfig,
                  mixed_precision: str = "no", progress: bool = True, concept_token_ids: list[int] | None = None) -> Scores:
    return SCORERS[config.scorer](model, layers, source, config, mixed_precision=mixed_precision, progress=progress,
                                  concept_token_ids=concept_token_ids)
