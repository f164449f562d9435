"""Concept Neuron Selection (Liao et al., ICCV 2025): continual personalization of text-to-image
diffusion models by finetuning only each concept's cross-attention K/V neurons.

The library is pure: no orchestration, tracking or storage clients (see DESIGN.md)."""

__version__ = "0.1.0"
