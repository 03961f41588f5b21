"""Stage 2: fine-tune on prepared datasets with Ray Train (DeepSpeed ZeRO or DDP, LoRA or full).

    python -m jobs.train --spec configs/training/cpu-smoke.yaml [--set optim.lr=2e-4 ...] [--dry-run]
    ray job submit -- python -m jobs.train --spec /abs/path/spec.yaml

Before any worker starts, the spec is checked against this cluster (GPU-only features) and the
datasets against the model (tokenizer SHA-256). A run lives under `checkpoint.storage/name`:
its checkpoints, `metrics.jsonl`, and at the end `export/` (the adapter and the merged model,
ready to serve). A rerun with the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from jobs.common import run_layout, storage
from jobs.common.overrides import job_arguments
from jobs.common.spec import SpecError
from jobs.train.driver import IN_MEMORY_MAX_BYTES, dry_run, train
from jobs.train.spec import TrainingSpec, load_training_spec


def report(result, spec: TrainingSpec) -> str:
    """The end of a run, for people: final metrics, where things are, one generated answer."""
    metrics, run = result.metrics or {}, storage.absolute(spec.run_uri)
    lines = [f"training finished: step {metrics.get('step', '-')}, loss {metrics.get('loss', math.nan):.4f}, "
             f"eval_loss {metrics.get('eval_loss', math.nan):.4f}, perplexity {metrics.get('perplexity', math.nan):.2f}, "
             f"token_accuracy {metrics.get('token_accuracy', math.nan):.3f}, "
             f"sequence_accuracy {metrics.get('sequence_accuracy', math.nan):.3f}",
             f"checkpoint: {result.checkpoint.path if result.checkpoint else None}",
             f"metrics:    {run_layout.metrics_uri(run)}",
             f"export:     {run_layout.export_uri(run)}"]
    for generation in metrics.get("generations", [])[:1]:
        lines.append(f"prompt:     {generation['prompt']}\nanswer:     {generation['answer']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments("python -m jobs.train", __doc__.split("\n\n")[0], "training", "optim.lr=2e-4")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--in-memory-max-bytes", type=int, default=IN_MEMORY_MAX_BYTES,
                        help="splits up to this size are read once and held in memory (0: always stream)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = load_training_spec(args.spec, args.overrides)
        if args.dry_run:
            print(json.dumps(dry_run(spec), indent=2))
            return 0
        result = train(spec, args.num_cpus, args.in_memory_max_bytes)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
