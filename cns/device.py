"""Where to run: cuda, then mps, then cpu; mixed precision on GPU only."""

from __future__ import annotations

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on cuda; a no-op elsewhere (CPU autocast slows conv nets down)."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated accelerator memory since the last reset; None on CPU (use the process RSS)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
