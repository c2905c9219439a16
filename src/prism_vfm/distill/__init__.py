"""Stage 1: multi-teacher distillation."""
