"""Evaluation as a job of its own: `python -m jobs.evaluate` (see `__main__`). Read in this order:
`spec` (the contract), `driver` (the Ray tasks, one per worker, and the report)."""
