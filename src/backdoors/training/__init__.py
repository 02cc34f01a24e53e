"""Training loop, optimizers and schedules."""
