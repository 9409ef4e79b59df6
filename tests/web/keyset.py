"""The walk both lists paged by key (the audit log, the results list) are held to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def walk_by_links(page: Callable[..., Any], ids: Callable[[Any], list[int]], pages: int) -> list[list[int]]:
    """Pages 1..``pages`` counted by number, then sought by their "Older" links from page 1 and back by
    their "Newer" links: each sought page must be the counted one, and an anchor that is not there falls
    back to counting. ``page(number, **seek)`` gives a page; ``ids(page)`` its rows' ids. Returns the
    counted pages."""
    counted = [ids(page(n)) for n in range(1, pages + 1)]
    sought, current = [counted[0]], page(1)
    for number in range(2, pages + 1):
        assert current.more and current.older == {"before": ids(current)[-1]}
        current = page(number, **current.older)
        sought.append(ids(current))
    assert sought == counted and not current.more and current.older == {}
    for number in range(pages - 1, 1, -1):  # and back by the "Newer" links
        assert current.newer == {"after": ids(current)[0]}
        current = page(number, **current.newer)
        assert ids(current) == counted[number - 1] and current.more
    assert page(1).newer == {}
    assert ids(page(3, before=999_999)) == counted[2]  # no such row: counted
    return counted
