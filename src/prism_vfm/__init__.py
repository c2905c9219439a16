"""prism-vfm: PRISM multi-teacher distillation into a dual-stream conditioned-MoE ViT."""

__version__ = "0.1.0"
