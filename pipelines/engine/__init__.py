"""The training and evaluation system: optimisation, schedule, trainer, checkpoints, inference, metrics."""
