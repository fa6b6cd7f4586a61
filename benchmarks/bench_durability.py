"""What trust costs: the fsync of an output before it appears, and the resume journal's input
checks (issue 9, cases 8 and 22).

    python benchmarks/bench_durability.py                 # a ~250 MB-a-side pair in bench-data/durability
    python benchmarks/bench_durability.py --repeat 3 --workers 2
    python benchmarks/bench_durability.py --size 0.5B --out bench-data/0.5B

For a compress (lossless) and an apply of a generated pair it times, in-process and alternating
so that page-cache state is alike for both sides:

* ``sync``: the run as shipped, against the same run with the final sync and the per-chunk
  writeback (sync_file_range) turned off;
* ``apply: sync, no per-chunk writeback``: the sync with the writeback each chunk write starts
  turned off, against no sync at all: what handing each chunk to the disk at once saves;
* ``journal``: compress with the journal (a JSON record per task, with the CRC-32C of every input
  range it read) against the same run with no journal at all;
* ``resume``: a compress whose every task is journaled, resumed (each skipped task's input ranges
  re-read and checked), against an uninterrupted compress.

Each figure is the best of ``--repeat`` runs; ratios are with/without.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import deltastream as ds  # noqa: E402
from deltastream.checkpoint import writer  # noqa: E402
from deltastream.engine import atomic, graph  # noqa: E402
from deltastream.synthetic import SHAPES, LlamaShape, write_pair  # noqa: E402

#: 126 M parameters: 252 MB a side in bf16
SHAPE = LlamaShape(1024, 2816, 8, 16, 8, 16000, note="durability benchmark, ~250 MB")


@contextmanager
def patched(module, name, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@contextmanager
def no_sync():
    """Neither the final sync nor the writeback each chunk write starts (the pre-issue-9 runs)."""
    with patched(atomic, "sync_tree", lambda folder: None), patched(writer, "_START_WRITEBACK", None):
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-data/durability")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--size", default=None, choices=sorted(SHAPES),
                        help="a synthetic pair of deltastream.synthetic instead of the ~250 MB one (e.g. 0.5B: a 1 GB "
                             "apply output, more than the disk absorbs without waiting)")
    args = parser.parse_args()
    base, ft = write_pair(args.out, args.size or SHAPE, verbose=True)
    work = os.path.join(args.out, "runs")
    os.makedirs(work, exist_ok=True)
    art = os.path.join(work, "a.dsz")
    run = {"workers": args.workers, "overwrite": True}

    def compress():
        ds.compress(base, ft, art, **run)

    def apply():
        ds.apply(base, art, os.path.join(work, "rebuilt"), **run)

    compress()  # warm the page cache and make the artifact apply needs
    rows = []
    for name, fn in (("compress", compress), ("apply", apply)):
        synced, plain = [], []
        for _ in range(args.repeat):  # alternate, so that writeback of one run burdens both sides alike
            synced.append(best(fn, 1))
            with no_sync():
                plain.append(best(fn, 1))
        rows.append((f"{name}: sync before rename", min(synced), min(plain)))
    with patched(writer, "_START_WRITEBACK", None):  # the sync alone: the whole output waits for it at the end
        rows.append(("apply: sync, no per-chunk writeback", best(apply, args.repeat), rows[-1][2]))

    with no_sync():
        recorded, stubbed = [], []
        for _ in range(args.repeat):
            recorded.append(best(compress, 1))
            with patched(graph, "journaled", lambda fn, entry, task: fn(task)):
                stubbed.append(best(compress, 1))
        rows.append(("compress: journal (records, input CRCs)", min(recorded), min(stubbed)))

        def resume():
            out = os.path.join(work, "r.dsz")
            shutil.rmtree(out, ignore_errors=True)

            def stop(tmp, path):
                raise RuntimeError("stop before publishing")

            with patched(atomic, "_publish", stop):
                try:
                    ds.compress(base, ft, out, resume=True, workers=args.workers)
                except RuntimeError:
                    pass
            start = time.perf_counter()
            ds.compress(base, ft, out, resume=True, workers=args.workers)
            return time.perf_counter() - start

        resumed = min(resume() for _ in range(args.repeat))
        rows.append(("compress: resume of a finished journal", resumed, min(recorded)))

    size = sum(os.path.getsize(os.path.join(r, f)) for p in (base, ft) for r, _, fs in os.walk(p) for f in fs)
    print(f"\ninputs: {size / 1e6:.0f} MB (base + fine-tune), workers {args.workers or os.cpu_count()}, "
          f"best of {args.repeat}")
    print(f"{'':40s} {'with':>8s} {'without':>8s} {'ratio':>6s}")
    for label, with_, without in rows:
        print(f"{label:40s} {with_:7.2f}s {without:7.2f}s {with_ / without:6.2f}")


if __name__ == "__main__":
    main()
