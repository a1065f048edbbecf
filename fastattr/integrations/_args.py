"""Argument checks shared by the adapters."""

from __future__ import annotations

import operator


def as_index(name: str, value) -> int:
    """An integer argument (Python or numpy int; no bool, no float)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
