"""The type coercion of ``get_config`` (an integer where a float is expected, "nan", "1e-4") and ``ConfigError``.

Every error is a ``ConfigError`` (a ValueError) of one line naming the key, the value and what is allowed. The
value checks (ranges, choices) are ``engine.config_check.validate_config``: the choices are defined by the modules
above ``configs`` that act on them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

__all__ = ["ConfigError", "coerce_value", "coerce_pairs", "coerce_tree", "known_default"]

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


def known_default(cfg: Any, key: str, value: Any, where: str, group: bool = False) -> Any:
    """The default of the config key ``key``, which is being given ``value`` (a group of keys itself if ``group``).
    A key ``cfg`` does not have, or a group's name given a value, is a ConfigError naming the keys of the nearest
    group and the closest of them (yacs' own errors: a traceback for a config file, the whole group for a group)."""
    known, default = lookup(cfg, key)
    if known and isinstance(default, dict) and not group:
        keys = ", ".join(sorted(default))
        raise ConfigError(f"{key} is a group of keys ({keys}), not a value: got {value!r} {where}")
    if known:
        return default
    parts, parent, group = key.split("."), "", cfg
    for n in range(1, len(parts)):  # the deepest group on the key's path
        known, node = lookup(cfg, ".".join(parts[:n]))
        if not (known and isinstance(node, dict)):
            break
        parent, group = ".".join(parts[:n]), node
    names = sorted(map(str, group))
    prefix = parent + "." if parent else ""
    close = difflib.get_close_matches(key[len(prefix):].split(".")[0], names, n=1)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    raise ConfigError(
        f"unknown config key {key} {where} ({hint}{parent or 'the top level'} has {', '.join(names)})"
    )


def coerce_pairs(cfg: Any, pairs: Sequence[Any], where: str = "in the overrides") -> list[Any]:
    """``[KEY, VALUE, ...]`` as ``cfg.merge_from_list`` takes them, each value coerced to its key's type
    (``coerce_value``); an unknown key, or a group's name, is a ConfigError (``known_default``)."""
    from yacs.config import CfgNode

    out: list[Any] = []
    for key, raw in zip(pairs[0::2], pairs[1::2]):
        value = CfgNode._decode_cfg_value(raw)  # as merge_from_list reads it: literal_eval of strings
        coerced = coerce_value(key, value, known_default(cfg, key, value, where), where)
        # a string goes back as given: merge_from_list decodes strings again ("'12'" -> "12" -> 12)
        out += [key, raw if coerced is value else coerced]
    return out


def coerce_tree(cfg: Any, tree: dict, where: str, prefix: str = "") -> dict:
    """``tree`` (a config read from YAML) with its leaves coerced to the types of ``cfg``'s (in place); an unknown
    key, or a group given a value, is a ConfigError (``known_default``)."""
    for name, value in tree.items():
        key = prefix + str(name)
        default = known_default(cfg, key, value, where, group=isinstance(value, dict))
        if isinstance(default, dict):
            coerce_tree(cfg, value, where, key + ".")
        else:
            tree[name] = coerce_value(key, value, default, where)  # a mapping for a value is refused here
    return tree

