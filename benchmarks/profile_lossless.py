"""Where the time of a lossless compress and apply goes: cProfile, one worker, sync scheduler.

    python benchmarks/profile_lossless.py bench-data/0.5B

Prints the share of wall time of the top functions (by own time) for each job.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import sys
import tempfile

import deltastream as ds


def profile(label: str, call) -> None:
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:8]
    print(f"\n{label}: {total:.2f} s (1 worker)")
    for (file, line, fn), (_, _, own, _, _) in rows:
        print(f"  {own / total:6.1%}  {fn}  ({os.path.basename(file)}:{line})")


def main() -> None:
    pair = sys.argv[1] if len(sys.argv) > 1 else "bench-data/0.5B"
    base, ft = os.path.join(pair, "base"), os.path.join(pair, "ft")
    work = tempfile.mkdtemp(dir=pair)
    try:
        art = os.path.join(work, "a.dsz")
        profile("compress", lambda: ds.compress(base, ft, art, scheduler="sync"))
        profile("apply", lambda: ds.apply(base, art, os.path.join(work, "out"), scheduler="sync"))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
