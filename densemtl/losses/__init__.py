"""Training objectives beyond the per-task losses: balancing schemes and regularizers."""
