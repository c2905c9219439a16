"""Stage 2: multi-task fine-tuning of a distilled student."""
