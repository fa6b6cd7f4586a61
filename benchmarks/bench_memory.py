"""The memory model, measured: peak RssAnon against chunk size and worker count.

    python benchmarks/bench_memory.py --size 0.5B

For lossless and bitdelta compress, 3 chunk sizes x 2 worker counts: the peak RssAnon (summed
over the process tree, sampled every 20 ms) and the model's prediction
``fixed + workers x footprint x chunk`` with the footprints of ``deltastream.api`` and the fixed
part measured as the peak of ``deltastream methods`` (the libraries loaded) on the same machine.
Use a pair whose tensors are larger than the chunks (70B-2L), or the chunk size cannot show. Also the chunk size the
default ``--memory 1GiB`` picks. Writes benchmarks/results/bench_memory_<size>.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked  # noqa: E402

from deltastream.api import footprint  # noqa: E402
from deltastream.methods import get_method  # noqa: E402
from deltastream.synthetic import write_pair  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--data", default="bench-data")
    args = ap.parse_args()
    base, ft = write_pair(os.path.join(args.data, args.size), args.size)
    exe = os.path.join(os.path.dirname(sys.executable), "deltastream")
    out = os.path.join(args.data, "memory.dsz")
    fixed = run_tracked([exe, "methods"]).peak_rss_anon  # the process and its libraries
    rows = []
    for method in ("lossless", "bitdelta"):
        k = footprint(get_method(method))
        for chunk in (8, 32, 128):
            for workers in (1, 2):
                r = run_tracked([exe, "compress", base, ft, "-o", out, "-q", "--overwrite", "--method", method,
                                 "--chunk-size", f"{chunk}MiB", "--memory", "64GiB", "--workers", str(workers)])
                predicted = fixed + workers * k * chunk * MiB
                rows.append((method, chunk, workers, r.peak_rss_anon / MiB, predicted / MiB, r.wall_s))
                print(rows[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = [f"# Peak RssAnon against chunk size and workers ({args.size} pair)", "", "```",
             f"python benchmarks/bench_memory.py --size {args.size}", "```", "",
             f"Fixed part (the process with its libraries loaded: `deltastream methods`): {fixed / MiB:.0f} MiB.",
             "",
             "| method | chunk | workers | peak RssAnon | model: fixed + workers x footprint x chunk "
             "| measured / model | wall s |", "|---|---|---|---|---|---|---|"]
    for method, chunk, workers, peak, pred, wall in rows:
        lines.append(f"| {method} | {chunk} MiB | {workers} | {peak:.0f} MiB | {pred:.0f} MiB | {peak / pred:.2f} "
                     f"| {wall:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(f"benchmarks/results/bench_memory_{args.size}.md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
