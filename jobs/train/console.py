"""What a training worker writes to its job's log."""

from __future__ import annotations

import sys


def say(text: str) -> None:
    """One line on stdout, flushed at once. Not `print`: Ray Train replaces `print` in its workers
    with a function that writes the text to stdout and also logs it (to stderr), so each printed
    line would reach the job's log twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def quiet_progress_bars() -> None:
    """No transformers progress bars in this worker ("Loading weights", "Writing model shards"):
    redrawn with carriage returns, they read as noise in a job's log."""
    from transformers.utils import logging

    logging.disable_progress_bar()
