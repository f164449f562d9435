"""Per-concept files: the sparse delta (changed rows + token embedding) and the neuron masks.

Both are safetensors (never pickle). Applying a delta copies its rows into the weights with
``index_copy_``, so base + deltas reloaded from disk equals the in-memory model bit for bit.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cns.errors import CNSError
from cns.models import DiffusionModel
from cns.neurons import KVLayer, Mask
from cns.train import RowDelta

DELTA_FORMAT = "cns-delta/1"
MASK_KINDS = ("concept", "base", "general", "owned")


def save_delta(path, rows: dict[str, RowDelta], token: str, token_embedding: torch.Tensor,
               metadata: dict[str, str]) -> None:
    tensors = {"token_embedding": token_embedding.detach().cpu().contiguous()}
    for name, delta in rows.items():
        tensors[f"{name}.index"] = delta.index.cpu().to(torch.int64).contiguous()
        tensors[f"{name}.weight"] = delta.weight.cpu().contiguous()
        if delta.bias is not None:
            tensors[f"{name}.bias"] = delta.bias.cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": DELTA_FORMAT, "token": token, **metadata})


def load_delta(path) -> tuple[dict[str, RowDelta], str, torch.Tensor, dict[str, str]]:
    """Returns (rows per layer, token, token embedding, metadata)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CNSError(path, f"not a readable delta ({exc})", "delta_invalid") from None
    if metadata.get("format") != DELTA_FORMAT or "token" not in metadata:
        raise CNSError(path, f"not a {DELTA_FORMAT} file", "delta_invalid")
    rows = {}
    for key in tensors:
        if key.endswith(".index"):
            name = key[: -len(".index")]
            rows[name] = RowDelta(index=tensors[key], weight=tensors[f"{name}.weight"], bias=tensors.get(f"{name}.bias"))
    return rows, metadata["token"], tensors["token_embedding"], metadata


def add_token(model: DiffusionModel, token: str) -> int:
    """Add ``token`` to the tokenizer as one new token and grow the embedding table by one row."""
    added = model.tokenizer.add_tokens([token])
    token_id = model.tokenizer.convert_tokens_to_ids(token)
    if added != 1 or token_id != len(model.tokenizer) - 1:
        raise CNSError(token, "the tokenizer cannot hold it as one new token", "token_invalid")
    model.text_encoder.resize_token_embeddings(len(model.tokenizer), mean_resizing=False)
    model.text_encoder.requires_grad_(False)
    return token_id


@torch.no_grad()
def apply_delta(model: DiffusionModel, layers: list[KVLayer], rows: dict[str, RowDelta], token: str,
                token_embedding: torch.Tensor, source: object = "delta") -> int:
    """Write a concept into the model: its rows, then its token. Returns the token id."""
    by_name = {layer.name: layer for layer in layers}
    for name, delta in rows.items():
        if name not in by_name:
            raise CNSError(source, f"row delta for unknown layer {name}", "delta_invalid")
        linear = by_name[name].linear
        index = delta.index.to(linear.weight.device)
        linear.weight.index_copy_(0, index, delta.weight.to(linear.weight.device, linear.weight.dtype))
        if delta.bias is not None:
            linear.bias.index_copy_(0, index, delta.bias.to(linear.bias.device, linear.bias.dtype))
    token_id = add_token(model, token)
    emb = model.token_embedding.weight
    emb[token_id] = token_embedding.to(emb.device, emb.dtype)
    return token_id


def save_masks(path, masks: dict[str, Mask], scores: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {f"{kind}/{name}": rows.to(torch.uint8).contiguous() for kind, mask in masks.items()
               for name, rows in mask.items()}
    tensors.update({f"score/{name}": s.float().contiguous() for name, s in scores.items()})
    save_file(tensors, str(path), metadata=metadata)


def load_masks(path) -> tuple[dict[str, Mask], dict[str, torch.Tensor]]:
    """Returns ({kind: mask}, scores); kinds are concept, base, general, owned."""
    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise CNSError(path, f"not a readable mask file ({exc})", "mask_invalid") from None
    masks: dict[str, Mask] = {kind: {} for kind in MASK_KINDS}
    scores = {}
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        if kind == "score":
            scores[name] = value
        elif kind in masks:
            masks[kind][name] = value.bool()
    return masks, scores
