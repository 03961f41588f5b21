"""Stage 1, data preparation: `python -m jobs.prepare` (see `__main__`). Read in this order:
`spec` (the contract), `inputs` (checked before any row is read), `cache` (an earlier output
reused), the pure per-row functions (`records` -> `formats` -> `filters` -> `templates` ->
`labels`) strung together by `stages`, run by `driver` in process or by `ray_pass` in Ray tasks;
then `selection`, `packing`, `outputs` and `manifest`."""
