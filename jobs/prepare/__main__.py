"""Stage 1: conversation datasets -> tokenized, masked, packed Parquet with a manifest.

    python -m jobs.prepare --spec configs/datasets/demo.yaml [--set max_seq_length=2048 ...]
    ray job submit -- python -m jobs.prepare --spec '{"name": ...}'

An output whose manifest records the same spec, input files (size and modification time) and
tokenizer is reused as it is (`jobs.prepare.cache`); `--force` prepares it again.

Exit codes: 0 done, 1 too many invalid rows (max_reject_ratio), 2 invalid spec.
"""

from __future__ import annotations

import logging
import sys

from jobs.common.overrides import job_arguments
from jobs.common.spec import SpecError
from jobs.prepare import manifest as mf
from jobs.prepare.driver import RejectRatioExceeded, prepare
from jobs.prepare.inputs import Options
from jobs.prepare.spec import load_spec


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments("python -m jobs.prepare", __doc__.split("\n\n")[0], "dataset", "max_seq_length=2048")
    parser.add_argument("--batch-size", type=int, default=Options.batch_size, help="rows per tokenizer call")
    parser.add_argument("--blocks", type=int, default=None, help="tokenize in at least N tasks, splitting files into parts "
                        "(default: 2 per CPU)")
    parser.add_argument("--in-process-max-bytes", type=int, default=Options.in_process_max_bytes,
                        help="inputs up to this size skip Ray and run in this process (0: always on Ray)")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even if the output was prepared from the same spec, input files and "
                             "tokenizer (by default that output is reused)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = Options(num_cpus=args.num_cpus, batch_size=args.batch_size, blocks=args.blocks,
                      in_process_max_bytes=args.in_process_max_bytes,
                      force=args.force)
    try:
        manifest = prepare(load_spec(args.spec, args.overrides), options)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RejectRatioExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(mf.summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
