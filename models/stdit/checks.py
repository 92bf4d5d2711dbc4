"""Type and range checks for config fields, and reading a config file, shared by Open-Sora's configs.

Every check raises one ``ValueError`` naming the config, the field, the value and what is allowed.
A ``bool`` is never an int or a float here (JSON's ``true`` is not a channel count).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def check_int(owner: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(
    owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None, high_open: bool = False
) -> float:
    """``float(value)`` if it is a finite int or float (not a bool) in ``[low, high]`` (``[low, high)`` with
    ``high_open``); ``None`` bounds are open."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be a finite number in {bounds}, got {value!r}")
    return float(value)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` if it is a bool (``true`` / ``false`` in JSON; not 0, 1 or ``"yes"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool (true or false), got {value!r}")
    return value


def check_sequence(owner: str, name: str, value: Any, *, length: int | None = None) -> tuple[Any, ...]:
    """``tuple(value)`` if it is a list or tuple (of ``length`` entries, if given)."""
    if (
        not isinstance(value, Sequence)
        or isinstance(value, (str, bytes))
        or (length is not None and len(value) != length)
    ):
        what = "a list" if length is None else f"a list of {length} entries"
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return tuple(value)


def check_ints(owner: str, name: str, value: Any, *, length: int | None = None, none: bool = False) -> tuple[Any, ...]:
    """``tuple(value)`` if it is a non-empty list of ints >= 1 (``None`` entries allowed with ``none``)."""
    values = check_sequence(owner, name, value, length=length)
    bad = [
        v for v in values if not ((none and v is None) or (not isinstance(v, bool) and isinstance(v, int) and v >= 1))
    ]
    if bad or not values:
        allowed = "ints >= 1" + (" or null" if none else "")
        raise ValueError(f"{owner}: {name} must be a non-empty list of {allowed}, got {value!r}")
    return values


def check_dict(owner: str, name: str, value: Any) -> dict[str, Any]:
    """``value`` if it is a dict (a JSON object)."""
    if not isinstance(value, dict):
        raise ValueError(f"{owner}: {name} must be an object (a dict), got {value!r}")
    return value


def read_config(path: str | Path, owner: str) -> dict[str, Any]:
    """The JSON object in file ``path``; a ``ValueError`` naming the file if it cannot be read, is not
    JSON, or is not an object."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{owner}: cannot read {path} as JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{owner}: {path} must hold a JSON object, got {type(values).__name__}")
    return values
