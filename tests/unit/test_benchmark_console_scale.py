"""benchmarks/console_scale.py: what its table says of an operation that gives no figure (its options:
test_benchmark_arguments)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import console_scale

pytestmark = pytest.mark.unit


def test_an_operation_that_fails_is_called_failed_not_slower_than_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A page that answered 500 at once (a node version timed on a database another one filled) was
    shown as "> 30000" ms, as if the deadline had stopped it, and the run exited 0."""

    def broken() -> object:
        raise RuntimeError("GET /results: 500")

    def ops(*_: Any) -> dict[str, Callable[[], object]]:
        return {"broken page": broken, "fine page": lambda: None}

    monkeypatch.setattr(console_scale, "fill", lambda *_: {})
    monkeypatch.setattr(console_scale, "operations", ops)
    assert console_scale.main(["--work", str(tmp_path), "--studies", "10000", "--audit", "100000",
                               "--rounds", "1"]) == 1  # fmt: skip
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "> 30000" not in captured.out
    assert [line.split()[2] for line in lines if line.startswith("broken page")] == ["failed"]
    figures = json.loads(lines[-1])
    assert figures["ms"]["broken page"] is None and figures["failed"] == ["broken page"]
    assert "broken page: failed (RuntimeError: GET /results: 500)" in captured.err
