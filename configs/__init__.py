from .defaults import get_cfg_defaults, get_config

__all__ = ["get_cfg_defaults", "get_config"]
