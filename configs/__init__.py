"""Configuration: the paper's recipe as defaults (``defaults.py``), one YAML file per setting beside it."""

from pathlib import Path

from .defaults import (
    architecture_keys,
    get_cfg_defaults,
    get_config,
    is_resume_free,
    leaf_keys,
    override_pairs,
    parse_config,
    read_config_file,
)

# The built-in demo: what `python main.py` runs with no arguments.
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yaml"

__all__ = [
    "DEMO_CONFIG",
    "architecture_keys",
    "get_cfg_defaults",
    "get_config",
    "is_resume_free",
    "leaf_keys",
    "override_pairs",
    "parse_config",
    "read_config_file",
]
