"""Argument types for the benchmark scripts: a bad value stops argparse with one line and exit status 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``prog: error: ...``), without the long usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def int_list(*, low: int = 1, multiple_of: int = 1, length: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers ``>= low`` (and multiples of ``multiple_of``)."""
    item = int_at_least(low)

    def parse(text: str) -> list[int]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        if length is not None and len(values) != length:
            raise argparse.ArgumentTypeError(f"expected {length} comma-separated integers, got {len(values)}")
        odd = [v for v in values if v % multiple_of]
        if odd:
            raise argparse.ArgumentTypeError(f"{odd} are not multiples of {multiple_of}")
        return values

    parse.__name__ = "integer list"
    return parse


def name_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated names, each one of ``choices`` (an empty list is allowed)."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    parse.__name__ = "name list"
    return parse


__all__ = ["OneLineParser", "int_at_least", "int_list", "name_list"]
