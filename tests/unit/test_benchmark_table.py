"""The one table layout the benchmarks print (benchmarks/table.py)."""

from __future__ import annotations

import pytest

from benchmarks import table

pytestmark = pytest.mark.unit


def test_columns_fit_their_longest_cell_and_figures_align_right() -> None:
    text = table.render(
        [("pictures", ""), ("images", ""), ("accuracy", ".3f"), ("ms", ".1f")],
        [["not turned", 176, 0.83712, 41.26], ["upside down", 36, None, 112.0]],
    )
    assert text.splitlines() == [
        "pictures     images  accuracy     ms",
        "not turned      176     0.837   41.3",
        "upside down      36         —  112.0",
    ]


def test_a_format_spec_applies_to_numbers_only() -> None:
    assert table.cell(0.5, ".2f") == "0.50"
    assert table.cell("1.84x", ".2f") == "1.84x"  # a ratio already written out
    assert table.cell(True, ".2f") == "True"
    assert table.cell(None, ".2f") == table.MISSING


def test_a_row_short_of_a_value_is_refused() -> None:
    with pytest.raises(ValueError, match="2 values for 3 columns"):
        table.render([("a", ""), ("b", ""), ("c", "")], [[1, 2]])
