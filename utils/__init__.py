"""Infrastructure only: distributed helpers, logging, AMP, checkpoint I/O, metrics, losses, profiling (nothing
here imports models, data, configs, engine, tools or main)."""
