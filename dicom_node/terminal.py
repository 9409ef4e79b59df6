"""Command-line output: the one place the node writes to the terminal instead of the log."""

from __future__ import annotations

import sys


def say(text: str, *, err: bool = False) -> None:
    """Print a line for the operator (stderr for errors), flushed at once."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()
