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
        assert throttle.admit("Alice ")  # each attempt let through counts until it succeeds
    assert not throttle.admit("ALICE") and throttle.admit("bob")
    clock.now += 61
    assert throttle.admit("alice")
    throttle.succeeded("alice")
    assert all(throttle.admit("alice") for _ in range(3))


def test_the_names_tried_are_bounded_in_memory(clock: _Clock) -> None:
    throttle = LoginThrottle(limit=3, window=60.0, max_names=100)
    for number in range(1000):  # a spray of names within one window
        clock.now += 0.01
        assert throttle.admit(f"guess-{number}")
    assert len(throttle._failures) == 100
    for _ in range(3):
        assert throttle.admit("alice")
    assert not throttle.admit("alice") and len(throttle._failures) == 100
    clock.now += 61  # the window passes: the next attempt finds every old name expired
    assert throttle.admit("bob")
    assert list(throttle._failures) == ["bob"]


def test_failing_for_other_names_does_not_lift_a_block(clock: _Clock) -> None:
    """The fullest table forgot the key with the oldest first failure: the blocked one an attacker is
    after, which then had ``limit`` new guesses after ``max_names`` failures for made-up names (review).
    The keys with the fewest failures go first now."""
    throttle = LoginThrottle(limit=3, window=900.0, max_names=50)
    for _ in range(3):
        throttle.admit("alice")
    for _ in range(2):
        throttle.admit("bob")  # a user who mistyped twice
    for number in range(10_000):
        clock.now += 0.01
        throttle.admit(f"made-up-{number}")
    assert not throttle.admit("alice") and len(throttle._failures) == 50
    assert throttle.admit("bob")  # his two failures were kept as well: this is his last try
    assert not throttle.admit("bob")
