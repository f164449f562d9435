"""Concept Neuron Selection (Liao et al., ICCV 2025): continual personalization of text-to-image
diffusion models by finetuning only each concept's cross-attention K/V neurons.

The library is pure: no orchestration, tracking or storage clients (see README.md, "Layout"; tests/test_model_io.py checks it)."""

__version__ = "0.1.0"
