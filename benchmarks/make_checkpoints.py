#!/usr/bin/env python
"""Generate a synthetic Llama-shaped bf16 base + fine-tune checkpoint pair, by size name.

    python benchmarks/make_checkpoints.py --size 1B --out bench-data/1B

writes ``bench-data/1B/base`` and ``bench-data/1B/ft`` (HF-style sharded safetensors, config.json,
generation_config.json). A pair that is already there and complete (same size, seed, delta
parameters and shard size) is kept unless ``--force``. The generator and its data model live in
``deltastream/synthetic.py`` (shared with ``deltastream demo``); this is its command line.
"""

from __future__ import annotations

import argparse
import sys

from deltastream.errors import DeltastreamError
from deltastream.synthetic import SHAPES, write_pair


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, choices=list(SHAPES),
                    help="model size name (70B: shapes only, ~280 GB for the pair)")
    ap.add_argument("--out", required=True, help="folder to hold base/ and ft/ (e.g. bench-data/1B)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--lowrank-std", type=float, default=1.5e-4, help="std of the rank-16 delta part")
    ap.add_argument("--noise-std", type=float, default=2.5e-4, help="std of the dense delta part (x row scale)")
    ap.add_argument("--max-shard-size", default="1GB", help="largest shard, HF style (default 1GB)")
    ap.add_argument("--workers", type=int, default=None, help="generator threads (default: CPU count)")
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete pair is there")
    args = ap.parse_args(argv)
    try:
        write_pair(args.out, args.size, seed=args.seed, lowrank_std=args.lowrank_std, noise_std=args.noise_std,
                   max_shard_size=args.max_shard_size, workers=args.workers, force=args.force, verbose=True)
    except (DeltastreamError, FileExistsError) as exc:
        print(f"make_checkpoints: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
