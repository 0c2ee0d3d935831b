"""The type coercion of ``get_config`` (an integer where a float is expected, "nan", "1e-4") and ``ConfigError``.

Every error is a ``ConfigError`` (a ValueError) of one line naming the key, the value and what is allowed. The
value checks (ranges, choices) are ``engine.config_check.validate_config``: the choices are defined by the modules
above ``configs`` that act on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "coerce_value", "coerce_pairs", "coerce_tree"]

# the datasets this reproduction trains and evaluates on (refer.DATASETS also reads refclef)
DATASETS = ("refcoco", "refcoco+", "refcocog", "synthetic")
SPLIT_BYS = ("unc", "google", "umd")


class ConfigError(ValueError):
    """A configuration value of the wrong type or outside what its key allows (one line: key, value, rule)."""


# ---------------------------------------------------------------------------------------------------- coercion
def _type_name(value: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(type(value), "a list")


def _as_float(value: Any) -> float | None:
    """``value`` as a float if it is an int (not a bool), a float, or a string float() reads ("nan", "1e-4")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def coerce_value(key: str, value: Any, default: Any, where: str = "") -> Any:
    """``value`` for the config key ``key`` whose default is ``default``: an int (or a string such as "nan" or
    "1e-4", as YAML reads it) where a float is expected becomes that float, also inside lists of floats; lists and
    tuples stand for each other (as yacs allows). Any other type mismatch is a ConfigError naming ``where``."""
    if isinstance(default, float):
        number = _as_float(value)
        if number is not None:
            return number
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default and all(isinstance(d, float) for d in default):
            numbers = [_as_float(v) if not isinstance(v, str) else None for v in value]
            if all(n is not None for n in numbers):
                return type(value)(numbers)
        return value
    elif type(value) is type(default):
        return value
    raise ConfigError(
        f"{key} must be {_type_name(default)} (default {default!r}), got {value!r} ({type(value).__name__})"
        + (f" {where}" if where else "")
    )


def lookup(cfg: Any, key: str) -> tuple[bool, Any]:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def coerce_pairs(cfg: Any, pairs: Sequence[Any], where: str = "in the overrides") -> list[Any]:
    """``[KEY, VALUE, ...]`` as ``cfg.merge_from_list`` takes them, each value coerced to its key's type
    (``coerce_value``). Unknown keys pass unchanged: yacs refuses them, naming the key."""
    from yacs.config import CfgNode

    out: list[Any] = []
    for key, raw in zip(pairs[0::2], pairs[1::2]):
        known, default = lookup(cfg, key)
        if known and not isinstance(default, dict):
            value = CfgNode._decode_cfg_value(raw)  # as merge_from_list reads it: literal_eval of strings
            coerced = coerce_value(key, value, default, where)
            # a string goes back as given: merge_from_list decodes strings again ("'12'" -> "12" -> 12)
            raw = raw if coerced is value else coerced
        out += [key, raw]
    return out


def coerce_tree(cfg: Any, tree: dict, where: str, prefix: str = "") -> dict:
    """``tree`` (a config read from YAML) with its leaves coerced to the types of ``cfg``'s (in place)."""
    for name, value in tree.items():
        key = prefix + name
        known, default = lookup(cfg, key)
        if not known:
            continue  # yacs refuses it, naming the key
        if isinstance(value, dict) and isinstance(default, dict):
            coerce_tree(cfg, value, where, key + ".")
        elif not isinstance(default, dict):
            tree[name] = coerce_value(key, value, default, where)
    return tree


# ---------------------------------------------------------------------------------------------------- rules
