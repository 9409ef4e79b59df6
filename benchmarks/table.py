"""The tables benchmarks print before their last-line JSON: one way to lay them out.

The first column is left-aligned (what a row is), the others right-aligned (figures), each as wide as its
longest cell, two spaces apart. A column's format spec (``".3f"``, ``".1f"``) applies to numbers; ``None``
prints as "—" (not measured, not applicable); anything else prints as ``str`` does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

MISSING = "—"


def cell(value: object, spec: str = "") -> str:
    """One value as a table shows it."""
    if value is None:
        return MISSING
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def render(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]) -> str:
    """``columns`` are (header, format spec) pairs; each row has one value per column."""
    texts = [[header for header, _ in columns]]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row has {len(row)} values for {len(columns)} columns")
        texts.append([cell(value, spec) for value, (_, spec) in zip(row, columns, strict=True)])
    widths = [max(len(line[i]) for line in texts) for i in range(len(columns))]
    return "\n".join(
        "  ".join(
            text.ljust(width) if i == 0 else text.rjust(width)
            for i, (text, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in texts
    )


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_line(figures: object) -> str:
    """The last line of a benchmark: JSON that a strict parser reads, an undefined figure (NaN: an AUC
    without positives, a median of nothing) as ``null``, as the table shows it as "—"."""
    return json.dumps(_finite(figures), allow_nan=False)
