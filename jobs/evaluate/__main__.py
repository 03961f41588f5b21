"""Evaluate a model on its own: a base model, a training's export, or a base model with a LoRA
adapter (an export's or a checkpoint's), on a prepared dataset's split and a list of prompts.
Reports token-weighted loss, perplexity, token and sequence accuracy and the answers, with an
adapter the base model's figures beside them, in OUTPUT/evaluation.json.

    python -m jobs.evaluate --spec configs/evaluation/cpu-smoke.yaml [--set adapter=...]

Exit codes: 0 done, 2 invalid spec (every problem listed with its field path)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from jobs.common.overrides import job_arguments
from jobs.common.spec import SpecError
from jobs.evaluate.driver import evaluate_model
from jobs.evaluate.spec import REPORT_FILE, load_evaluation_spec


def summary(report: dict[str, Any], output: str) -> str:
    """The figures side by side (the base model's where there is an adapter), and the first answer."""
    lines = [f"evaluation {report['name']}: {report['rows']} {report['split'] or '-'} rows on {report['workers']} "
             f"worker(s) in {report['seconds']} s"]
    columns = [("model", report["metrics"])] + ([("base", report["base_metrics"])] if "base_metrics" in report else [])
    for key in ("eval_loss", "perplexity", "token_accuracy", "sequence_accuracy"):
        if key in report["metrics"]:
            lines.append(f"  {key:<18}" + "".join(f"{name} {figures[key]:<12.4f}" for name, figures in columns))
    for generation in report["generations"][:1]:
        lines.append(f"prompt: {generation['prompt']}\nanswer: {generation['answer']}")
    lines.append(f"report: {output.rstrip('/')}/{REPORT_FILE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments("python -m jobs.evaluate", __doc__.split("\n\n")[0], "evaluation",
                           "adapter=runs/x/export/adapter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = load_evaluation_spec(args.spec, args.overrides)
        report = evaluate_model(spec, args.num_cpus)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report, spec.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
