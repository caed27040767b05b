"""One run: its folder (checkpoints, best/latest, signature), training, evaluation, inputs and weights."""
