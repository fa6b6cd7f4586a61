"""Choose the lossless encoding in the real pipeline: transform x codec, measured end to end.

    python benchmarks/lossless_pipeline.py bench-data/0.5B

For each (transform, blosc codec) runs compress and apply on the pair and reports the stored
ratio against the fine-tune, and compress / apply throughput (GB/s of fine-tune bytes). The
encoding study (encoding_study.py) measures codecs in isolation; this measures them where they
run, with the pipeline's chunking, threads and I/O.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import deltastream as ds
from deltastream.artifact import codecs

CANDIDATES = [
    ("sub", ("zstd", 1, "shuffle")),
    ("sub", ("zstd", 3, "shuffle")),
    ("sub", ("zstd", 1, "bitshuffle")),
    ("sub", ("lz4", 5, "shuffle")),
    ("sub", ("lz4", 5, "bitshuffle")),
    ("xor", ("zstd", 1, "bitshuffle")),
    ("xor", ("zstd", 3, "bitshuffle")),
    ("xor", ("lz4", 5, "bitshuffle")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pair", help="folder with base/ and ft/")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    base, ft = os.path.join(args.pair, "base"), os.path.join(args.pair, "ft")
    work = os.path.join(args.pair, "lossless-choice")
    print("| transform | codec | ratio | compress GB/s | apply GB/s |\n|---|---|---|---|---|")
    for transform, blosc in CANDIDATES:
        role = "delta" if transform == "sub" else "xor"
        codecs.PRESETS[role] = codecs.Preset(role, blosc=blosc)
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        t0 = time.perf_counter()
        art = ds.compress(base, ft, os.path.join(work, "a.dsz"), transform=transform, workers=args.workers)
        t1 = time.perf_counter()
        ds.apply(base, art, os.path.join(work, "out"), workers=args.workers)
        t2 = time.perf_counter()
        summary = ds.info(art)
        gb = summary["fine_tune_bytes"] / 1e9
        print(f"| {transform} | blosc {blosc[0]} clevel {blosc[1]} {blosc[2]} | {summary['ratio']:.3f} "
              f"| {gb / (t1 - t0):.2f} | {gb / (t2 - t1):.2f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
