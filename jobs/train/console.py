"""What a training worker writes to its job's log."""

from __future__ import annotations

import sys


def say(text: str) -> None:
    """One line on stdout, flushed at once. Not `print`: Ray Train replaces `print` in its workers
    with a function that writes the text to stdout and also logs it (to stderr), so each printed
    line would reach the job's log twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
