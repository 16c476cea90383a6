"""argparse types shared by the scripts: comma-separated lists and bounded ints.

Each returns a parser that raises ``argparse.ArgumentTypeError`` with what was expected
and what was got, so ``parser.error`` names the option.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def names(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of names, each one of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        got = tuple(s.strip() for s in text.split(",") if s.strip())
        if not got or any(n not in allowed for n in got):
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {what} from {', '.join(allowed)}. "
                f"Got {text!r} instead."
            )
        return got

    return parse


def ratios(what: str, example: str, *, sort: bool = False) -> Callable[[str], tuple[float, ...]]:
    """A comma-separated list of finite floats >= 1 (deduplicated and sorted if ``sort``)."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(s) for s in text.split(",") if s.strip())
        except ValueError:
            values = ()
        if not values or not all(math.isfinite(v) and v >= 1 for v in values):
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {what} >= 1, e.g. {example}. "
                f"Got {text!r} instead."
            )
        return tuple(sorted(set(values))) if sort else values

    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}. Got {text!r} instead.")
        return value

    return parse


def ints(what: str) -> Callable[[str], tuple[int, ...]]:
    """A comma-separated list of ints >= 1."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {what} (ints >= 1), e.g. 64,128. "
                f"Got {text!r} instead."
            )
        return values

    return parse
