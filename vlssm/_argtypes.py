"""argparse ``type=`` converters shared by every vlssm command (bench, train, eval, the data options).

Each takes the flag's string and returns the number, or raises ``argparse.ArgumentTypeError``
(argparse then names the flag and exits with status 2).
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["positive_int", "nonneg_int", "positive_float", "nonneg_float", "fraction", "ratio"]


def _number(kind: type, what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def convert(s: str):
        try:
            v = kind(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if (kind is float and not math.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    convert.__name__ = what.replace(" ", "_")
    return convert


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
nonneg_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: v > 0)
nonneg_float = _number(float, "a number >= 0", lambda v: v >= 0)
#: [0, 1): decays, end-of-schedule ratios
fraction = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
#: (0, 1]: imbalance ratios
ratio = _number(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
