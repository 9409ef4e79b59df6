"""The console's login throttle: blocks guessing per username, and its memory stays bounded."""

from __future__ import annotations

import pytest

from dicom_node.web import auth
from dicom_node.web.auth import LoginThrottle

pytestmark = [pytest.mark.unit]


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(auth, "time", fake)
    return fake


def test_a_username_is_blocked_after_the_limit_until_the_window_passes(clock: _Clock) -> None:
    throttle = LoginThrottle(limit=3, window=60.0)
    for _ in range(3):
        assert not throttle.blocked("Alice ")
        throttle.failed("alice")
    assert throttle.blocked("ALICE") and not throttle.blocked("bob")
    clock.now += 61
    assert not throttle.blocked("alice")


def test_checking_names_costs_no_memory_and_failures_are_bounded(clock: _Clock) -> None:
    throttle = LoginThrottle(limit=3, window=60.0, max_names=100)
    for number in range(1000):
        assert not throttle.blocked(f"guess-{number}")
    assert throttle._failures == {}
    for number in range(1000):  # a spray of names within one window
        clock.now += 0.01
        throttle.failed(f"guess-{number}")
    assert len(throttle._failures) == 100
    for _ in range(3):
        throttle.failed("alice")
    assert throttle.blocked("alice") and len(throttle._failures) == 100
    clock.now += 61  # the window passes: the next failure finds every old name expired
    throttle.failed("bob")
    assert list(throttle._failures) == ["bob"]


def test_failing_for_other_names_does_not_lift_a_block(clock: _Clock) -> None:
    """The fullest table forgot the key with the oldest first failure: the blocked one an attacker is
    after, which then had ``limit`` new guesses after ``max_names`` failures for made-up names (review).
    The keys with the fewest failures go first now."""
    throttle = LoginThrottle(limit=3, window=900.0, max_names=50)
    for _ in range(3):
        throttle.failed("alice")
    for _ in range(2):
        throttle.failed("bob")  # a user who mistyped twice
    for number in range(10_000):
        clock.now += 0.01
        throttle.failed(f"made-up-{number}")
    assert throttle.blocked("alice") and len(throttle._failures) == 50
    throttle.failed("bob")
    assert throttle.blocked("bob")  # his two failures were kept as well
