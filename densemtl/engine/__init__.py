"""Training, evaluation, prediction, checkpoints and distributed set-up."""
