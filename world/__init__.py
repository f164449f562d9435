"""The benchmark world: a procedural image world small enough to pretrain a text-to-image
diffusion model on 2 CPU cores, and to measure continual personalization against the truth.

scene   what exists: shapes, colours, backgrounds, novel concepts (data/world/concepts.yaml), captions, rendering
model   the world's pixel-space model (diffusers UNet + CLIP text encoder) and its pretraining
judge   reading attributes back from generated images (exact colour rules + a small validated CNN)
bench   CNS against the baselines, side by side (``cns bench world``)
"""
