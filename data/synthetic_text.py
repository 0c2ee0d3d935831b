"""Referring expressions for the synthetic dataset: which descriptions single out an object, and their wording.

A description is a dict (stored in ``attributes.json``)::

    {"size": "big", "colour": "red", "kind": "circle",     # any subset of the three attributes
     "position": "left" | "right" | "top" | "bottom",      # optional: extreme among the objects matching the rest
     "relation": {"direction": "left" | "right" | "above" | "below", "landmark": {<attributes>}}}  # optional

Positions use the centre of the object's visible box (x right, y down). A description is used only when it holds
for its object with a margin (8% of the image side) and for no other object of the image even without margin:
a position holds for at most one object; a relation holds for the object and for no other object matching the
attributes (``landmark`` names exactly one object).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "KIND_WORDS",
    "SIZE_WORDS",
    "NOUNS",
    "POSITION_WORDS",
    "RELATION_WORDS",
    "describe_object",
    "render",
]

ATTRIBUTES = ("size", "colour", "kind")
KIND_WORDS = {
    "circle": ("circle", "disc"),
    "heart": ("heart",),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
SIZE_WORDS = {"small": ("small", "little"), "big": ("big", "large")}
NOUNS = ("shape", "object", "one")  # when the kind is not said
# position -> (adjectives before the noun, phrases after it); "pair" when two objects compete, "many" for more
POSITION_WORDS = {
    "pair": {
        "left": (("left",), ("on the left",)),
        "right": (("right",), ("on the right",)),
        "top": (("top", "upper"), ("at the top",)),
        "bottom": (("bottom", "lower"), ("at the bottom",)),
    },
    "many": {
        "left": (("leftmost",), ("furthest to the left", "on the far left")),
        "right": (("rightmost",), ("furthest to the right", "on the far right")),
        "top": (("topmost", "highest"), ("nearest the top",)),
        "bottom": (("bottommost", "lowest"), ("nearest the bottom",)),
    },
}
RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# direction -> (centre key, sign): sign * (a - b) > 0 means a lies further that way than b
_AXIS = {
    "left": ("cx", -1),
    "right": ("cx", 1),
    "top": ("cy", -1),
    "bottom": ("cy", 1),
    "above": ("cy", -1),
    "below": ("cy", 1),
}
_LANDMARK_PREFERENCE = (("colour", "kind"), ("kind",), ("size", "kind"), ("size", "colour", "kind"), ("colour",))
MARGIN = 0.08  # fraction of the image side along the compared axis


def _matches(obj: dict[str, Any], desc: dict[str, Any]) -> bool:
    return all(obj[a] == desc[a] for a in ATTRIBUTES if a in desc)


def _beyond(a: dict[str, Any], b: dict[str, Any], direction: str) -> float:
    """How far ``a`` lies beyond ``b`` in ``direction`` (negative: the other way)."""
    key, sign = _AXIS[direction]
    return sign * (a[key] - b[key])


def _candidates(objects: list[dict[str, Any]], t: int, width: int, height: int) -> tuple[list, list, list]:
    """All valid descriptions of object ``t``: attribute-only, positional (desc, n competitors), relational."""
    target = objects[t]
    margin = {"cx": MARGIN * width, "cy": MARGIN * height}
    landmarks = []
    for j, obj in enumerate(objects):
        if j == t:
            continue
        for subset in _LANDMARK_PREFERENCE:
            desc = {a: obj[a] for a in subset}
            if sum(_matches(o, desc) for o in objects) == 1:
                landmarks.append((j, desc))
                break
    attr, pos, rel = [], [], []
    for k in range(len(ATTRIBUTES) + 1):
        for subset in combinations(ATTRIBUTES, k):
            desc = {a: target[a] for a in subset}
            group = [i for i, o in enumerate(objects) if _matches(o, desc)]
            if len(group) == 1:
                if subset:
                    attr.append(desc)
                continue
            others = [objects[i] for i in group if i != t]
            for direction in ("left", "right", "top", "bottom"):
                need = margin[_AXIS[direction][0]]
                if all(_beyond(target, o, direction) >= need for o in others):
                    pos.append(({**desc, "position": direction}, len(group)))
            for j, landmark_desc in landmarks:
                landmark = objects[j]
                for direction in ("left", "right", "above", "below"):
                    need = margin[_AXIS[direction][0]]
                    if _beyond(target, landmark, direction) >= need and all(
                        _beyond(o, landmark, direction) <= 0 for o in others
                    ):
                        rel.append({**desc, "relation": {"direction": direction, "landmark": landmark_desc}})
    return attr, pos, rel


def _noun_phrase(desc: dict[str, Any], rng: np.random.Generator, article: bool = True) -> list[str]:
    words = []
    if "size" in desc:
        words.append(str(rng.choice(SIZE_WORDS[desc["size"]])))
    if "colour" in desc:
        words.append(desc["colour"])
    words.append(str(rng.choice(KIND_WORDS[desc["kind"]])) if "kind" in desc else str(rng.choice(NOUNS)))
    if "colour" in desc and "kind" in desc and rng.random() < 0.2:  # "the star in red"
        words = [w for w in words if w != desc["colour"]] + ["in", desc["colour"]]
    return (["the"] if article else []) + words


def render(desc: dict[str, Any], n_competitors: int, rng: np.random.Generator) -> str:
    """One wording of ``desc`` (lower case, words separated by single spaces)."""
    article = rng.random() < 0.75
    if "position" in desc:
        before, after = POSITION_WORDS["pair" if n_competitors == 2 else "many"][desc["position"]]
        np_words = _noun_phrase(desc, rng, article=False)
        if rng.random() < 0.5:
            words = ["the", str(rng.choice(before)), *np_words]
        else:
            words = ["the", *np_words, str(rng.choice(after))]
        return " ".join(words if article else words[1:])
    words = _noun_phrase(desc, rng, article)
    if "relation" in desc:
        relation = desc["relation"]
        words += [str(rng.choice(RELATION_WORDS[relation["direction"]]))]
        words += _noun_phrase(relation["landmark"], rng, article=True)
    return " ".join(words)


def describe_object(
    objects: list[dict[str, Any]],
    t: int,
    width: int,
    height: int,
    rng: np.random.Generator,
    max_expressions: int,
    spatial_weight: float,
) -> list[tuple[dict[str, Any], str]]:
    """1..max_expressions (description, sentence) pairs for object ``t``; [] if nothing singles it out.

    ``objects``: dicts with ``size``, ``colour``, ``kind``, ``cx``, ``cy``. The first expression uses the fewest
    attributes that suffice (attributes before position before relation); the others are drawn from all valid
    descriptions: first a family (attributes weight 1, positions and relations ``spatial_weight`` each), then one
    description of it.
    """
    attr, pos, rel = _candidates(objects, t, width, height)
    pools = [[(d, 0) for d in attr], pos, [(d, 0) for d in rel]]
    for pool in pools:
        if pool:
            fewest = min(len(d) for d, _ in pool)
            shortest = [c for c in pool if len(c[0]) == fewest]
            first = shortest[int(rng.integers(len(shortest)))]
            pool.remove(first)
            break
    else:
        return []
    chosen = [first]
    for _ in range(int(rng.integers(1, max_expressions + 1)) - 1):
        weights = np.array([float(bool(p)) * w for p, w in zip(pools, (1.0, spatial_weight, spatial_weight))])
        if weights.sum() <= 0:
            break
        pool = pools[int(rng.choice(3, p=weights / weights.sum()))]
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
    out, seen = [], set()
    for desc, n in chosen:
        text = render(desc, n, rng)
        if text not in seen:
            seen.add(text)
            out.append((desc, text))
    return out
