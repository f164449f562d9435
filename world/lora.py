"""The project's one LoRA baseline: peft's LoRA added through diffusers' ``unet.add_adapter``, as
diffusers' examples/dreambooth/train_dreambooth_lora.py does (rank r, alpha r, gaussian init, B at
zero). The benchmark world puts it on every cross-attention K/V projection and merges the deltas;
bench/train_bench.py puts it on q/k/v/out of every attention for the step timings."""

from __future__ import annotations

import torch
from torch import nn

ADAPTER = "default"


def add_lora(unet: nn.Module, target_modules: list[str], rank: int = 4) -> list[nn.Parameter]:
    """Wrap ``target_modules`` (names or name suffixes) in rank-``rank`` LoRA; returns the trainable
    LoRA parameters (the UNet's own weights stay as they were, frozen or not)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=target_modules), adapter_name=ADAPTER)
    return [p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad]


def lora_deltas(unet: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: the weight change its LoRA makes (scale included)}, detached."""
    from peft.tuners.lora import LoraLayer

    return {name: module.get_delta_weight(ADAPTER).detach().clone()
            for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def remove_lora(unet: nn.Module) -> None:
    """Put the original modules back (their weights untouched)."""
    unet.unload_lora()
