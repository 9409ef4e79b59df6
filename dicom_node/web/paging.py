"""Counting for the console's paged lists without reading every matching row.

"Page N of M" needs the number of matching rows; counting them read the whole match on every page (all
500,000 audit events, every study with a finding: 50-160 ms a page on PostgreSQL at 100,000 studies,
benchmarks/console_scale.py). A list counts at most :data:`COUNT_CAP` rows and past that says "more
than 1,000": nobody pages through a thousand rows, they narrow the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

COUNT_CAP = 1000


@dataclass(frozen=True)
class Count:
    """The number of matching rows, exact up to :data:`COUNT_CAP`; past it ``total`` is the cap and
    ``capped`` is set (there are more)."""

    total: int
    capped: bool

    def pages(self, per_page: int) -> int:
        """The number of pages, or when capped the number of pages the counted rows fill (at least)."""
        return max(1, -(-self.total // per_page))


def capped_count(session: Session, rows: Select[Any], cap: int | None = None) -> Count:
    """How many rows ``rows`` selects, reading at most ``cap + 1`` of them (:data:`COUNT_CAP`)."""
    cap = COUNT_CAP if cap is None else cap
    counted = int(session.scalar(select(func.count()).select_from(rows.limit(cap + 1).subquery())) or 0)
    return Count(min(counted, cap), counted > cap)
