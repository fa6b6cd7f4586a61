"""Compress (and apply) throughput against the time to read the inputs, warm and cold page cache.

    python benchmarks/bench_throughput.py --size 1B [--cold] [--label after]

"Reading the inputs" is ``cat base/*.safetensors ft/*.safetensors > /dev/null``. Warm: both
files in the page cache, best of ``--repeat`` runs each, compress timed in-process (after one
untimed run, so that the kernels are compiled and the interpreter's start is not counted). Cold
(``--cold``, needs permission to write /proc/sys/vm/drop_caches): the page cache is dropped
before every ``cat`` and every compress, which is what a real 70B pair (282 GB, more than the RAM)
sees; cat and compress alternate, and the ratio is the median of the pairs. The ratio reported
is read time / job time: 1.0 means the job runs at the speed of reading the pair. Apply (warm
only) reads the base and the artifact and writes a whole checkpoint; it is given against the same
read time, and its input GB/s counts the pair's bytes, as compress does.

Writes benchmarks/results/bench_throughput_<size>[_<label>].md. Run it from a checkout of an
older commit (PYTHONPATH=that checkout) with --label before for a before/after table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import deltastream as ds
from deltastream.synthetic import SHAPES, write_pair

METHODS = {"bitdelta": {}, "dare": {"p": 0.9}, "lossless": {}}


def inputs(folders: list[str]) -> list[str]:
    return [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def cat_s(files: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def compress_s(base: str, ft: str, out: str, method: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    ds.compress(base, ft, out, method, **METHODS[method])
    return time.perf_counter() - start


def apply_s(base: str, artifact: str, out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    ds.apply(base, artifact, out)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1B", choices=sorted(SHAPES))
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also measure with the page cache dropped")
    ap.add_argument("--label", default="", help="suffix of the results file (e.g. before, after)")
    args = ap.parse_args()
    pair = os.path.join(args.data, args.size)
    base, ft = write_pair(pair, SHAPES[args.size], seed=0)
    files = inputs([base, ft])
    gb = sum(os.path.getsize(f) for f in files) / 1e9
    out = os.path.join(pair, "throughput.dsz")

    cat_s(files)
    warm_cat = min(cat_s(files) for _ in range(args.repeat))
    rows = [f"| read (`cat`) | {warm_cat:.2f} s | {gb / warm_cat:.1f} GB/s | 1 |"]
    cold_rows = []
    for method in args.methods:
        compress_s(base, ft, out, method)  # compile and warm
        t = min(compress_s(base, ft, out, method) for _ in range(args.repeat))
        rows.append(f"| compress {method} | {t:.2f} s | {gb / t:.2f} GB/s | {warm_cat / t:.2f} |")
        print(rows[-1], flush=True)
        rebuilt = os.path.join(pair, "throughput-rebuilt")
        apply_s(base, out, rebuilt)
        t = min(apply_s(base, out, rebuilt) for _ in range(args.repeat))
        shutil.rmtree(rebuilt, ignore_errors=True)
        rows.append(f"| apply {method} | {t:.2f} s | {gb / t:.2f} GB/s | {warm_cat / t:.2f} |")
        print(rows[-1], flush=True)
        if args.cold:
            pairs = []
            for _ in range(args.repeat):
                drop_caches()
                c = cat_s(files)
                drop_caches()
                pairs.append((c, compress_s(base, ft, out, method)))
            ratio = statistics.median(c / t for c, t in pairs)
            cold_rows.append(f"| compress {method} | "
                             + ", ".join(f"{t:.2f}" for _, t in pairs) + " | "
                             + ", ".join(f"{c:.2f}" for c, _ in pairs) + f" | {ratio:.2f} |")
            print(cold_rows[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)

    lines = [f"# Compress and apply throughput, {args.size} pair ({gb:.2f} GB of inputs)"
             f"{' - ' + args.label if args.label else ''}",
             "", f"`python benchmarks/bench_throughput.py --size {args.size}{' --cold' if args.cold else ''}`"
             f"{' (' + args.label + ')' if args.label else ''}", "",
             f"Warm page cache (best of {args.repeat}):", "",
             "| job | wall | input GB/s | speed / read |", "|---|---|---|---|", *rows]
    if cold_rows:
        lines += ["", "Cold page cache (caches dropped before each run; cat and compress alternate):", "",
                  "| job | compress s | cat s | speed / read (median) |", "|---|---|---|---|", *cold_rows]
    name = f"bench_throughput_{args.size}{'_' + args.label if args.label else ''}.md"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
