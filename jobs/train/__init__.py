"""Stage 2, training: `python -m jobs.train` (see `__main__`). Read in this order: `spec` (the
contract), `preflight` (checks before any worker starts), `plan` (steps, `--dry-run`), `driver`
(the TorchTrainer), `loop` (each worker, top to bottom) with `engines`, `packed_batch`,
`evaluate`, `checkpoint`, `metrics_log` and `export`."""
