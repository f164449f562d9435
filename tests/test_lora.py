"""The one LoRA baseline (world/lora.py): its merged delta is exactly what the adapter did, and
taking it out gives back the original modules and weights."""

import torch

from cns.models import build_tiny
from cns.neurons import kv_layers
from world.lora import add_lora, lora_deltas, remove_lora


def _unet_output(model, sample, states):
    with torch.no_grad():
        return model.unet(sample, torch.tensor([500]), states).sample


def test_merged_lora_delta_reproduces_the_adapter_and_removal_restores_the_unet():
    model = build_tiny()
    layers = kv_layers(model.unet)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sample, states = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 64, generator=g)

    params = add_lora(model.unet, [layer.name for layer in layers], rank=4)
    assert params and all(p.requires_grad for p in params)
    with torch.no_grad():  # B starts at zero: give it a value so the delta is not trivially 0
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    with_adapter = _unet_output(model, sample, states)
    deltas = lora_deltas(model.unet)
    assert set(deltas) == {layer.name for layer in layers}
    assert all(deltas[layer.name].shape == layer.linear.weight.shape for layer in layers)

    remove_lora(model.unet)
    assert {k: v.shape for k, v in model.unet.state_dict().items()} == {k: v.shape for k, v in before.items()}
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in before.items())
    plain = _unet_output(model, sample, states)
    with torch.no_grad():
        for layer in layers:
            layer.linear.weight.add_(deltas[layer.name])
    merged = _unet_output(model, sample, states)
    assert not torch.allclose(plain, with_adapter, atol=1e-4)
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-4)
