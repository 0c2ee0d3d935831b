"""Training utilities: distributed helpers, logging, metrics, checkpoints, AMP, losses, the engine."""
