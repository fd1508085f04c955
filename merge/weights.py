"""Parse `--weights math=0.35,code=0.35,17=0.5` into an ordered mapping of member key -> weight.

A key is a domain name (its newest expert of the seed) or an expert id; which one is decided by
whoever resolves the keys against the registry, not here.
"""

from __future__ import annotations

import math
import re

from xmerge.errors import XmergeError

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_EXAMPLE = "e.g. --weights math=0.35,code=0.35,17=0.3"


def parse_weights(text: str, *, allow_negative: bool = False, normalize: bool = False) -> dict[str, float]:
    """Ordered {key: weight} from "k1=w1,k2=w2"; weights are finite, >= 0 unless allow_negative,
    not all zero; with normalize they are divided by their sum (which must then be > 0)."""
    if not text or not text.strip():
        raise XmergeError(f"--weights is empty; give KEY=WEIGHT pairs, {_EXAMPLE}")
    weights: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise XmergeError(f"--weights item {item!r} has no '='; write KEY=WEIGHT, {_EXAMPLE}")
        if not key:
            raise XmergeError(f"--weights item {item!r} has no domain or expert id before '='; {_EXAMPLE}")
        if not _KEY.fullmatch(key):
            raise XmergeError(
                f"--weights key {key!r} is not a domain name or expert id "
                "(letters, digits, '_', '-', '.', ':'); " + _EXAMPLE
            )
        if not value:
            raise XmergeError(f"--weights item {item!r} has no weight after '='; {_EXAMPLE}")
        try:
            weight = float(value)
        except ValueError:
            raise XmergeError(f"weight of {key!r} is {value!r}, not a number; {_EXAMPLE}") from None
        if not math.isfinite(weight):
            raise XmergeError(f"weight of {key!r} is {value!r}; weights must be finite numbers")
        if weight < 0 and not allow_negative:
            raise XmergeError(f"weight of {key!r} is negative ({value}); pass --allow-negative to permit it")
        if key in weights:
            raise XmergeError(f"{key!r} appears twice in --weights; give each domain or expert once")
        weights[key] = weight
    return normalized(weights) if normalize else _check_not_all_zero(weights)


def normalized(weights: dict[str, float]) -> dict[str, float]:
    """The same keys with weights divided by their sum (which must be > 0)."""
    total = sum(_check_not_all_zero(weights).values())
    if not total > 0:
        raise XmergeError(f"weights sum to {total:g}; cannot normalize them to sum 1 (use --no-normalize)")
    return {key: weight / total for key, weight in weights.items()}


def _check_not_all_zero(weights: dict[str, float]) -> dict[str, float]:
    if all(weight == 0 for weight in weights.values()):
        raise XmergeError(f"all weights are zero ({', '.join(weights)}); give at least one a non-zero weight")
    return weights
