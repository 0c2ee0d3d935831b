"""LAVT model package: ``build_model(cfg)``, ``load_weights(model, path)`` and the modules they assemble."""
from .architecture import Architecture, infer_architecture
from .build import build_model, build_param_groups
from .lavt import LAVT
from .official import to_official
from .weights import (
    CheckpointError,
    checkpoint_filter_fn,
    checkpoint_format,
    load_pretrained_swin,
    load_weights,
    read_checkpoint,
)

__all__ = [
    "LAVT",
    "Architecture",
    "CheckpointError",
    "build_model",
    "build_param_groups",
    "checkpoint_filter_fn",
    "checkpoint_format",
    "infer_architecture",
    "load_pretrained_swin",
    "load_weights",
    "read_checkpoint",
    "to_official",
]
