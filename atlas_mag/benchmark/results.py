"""Reading a results dict of `run_benchmark`: a row, one of its fields, a ratio of two fields."""

from __future__ import annotations

from typing import Any


def find_row(results: dict[str, Any], section: str, variant: str, length: int) -> dict[str, Any] | None:
    """The row of `variant` at `length` (the context, in the decode section) in `section`, or None."""
    key = "context" if section == "decode" else "length"
    return next((row for row in results[section] if row["variant"] == variant and row[key] == length), None)


def lookup(results: dict[str, Any], section: str, variant: str, length: int, field: str) -> float | None:
    """`field` of that row, or None where the row or the field is missing."""
    row = find_row(results, section, variant, length)
    return None if row is None else row.get(field)


def ratio_of(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`, or None where either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator
