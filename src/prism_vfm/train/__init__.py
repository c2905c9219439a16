"""Training machinery shared by both stages: distributed setup, schedules, checkpoints, logging."""
