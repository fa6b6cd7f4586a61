"""70B shapes in bounded memory: compress (bitdelta, dare) and apply on every tensor shape of a
Llama-3-70B, against the same jobs on the 1B pair, and the wall time a real 70B would take.

    python benchmarks/bench_70b.py

The ``70B-2L`` pair (``deltastream.synthetic``) has the real 70B shapes: the 128256 x 8192
embedding and head, and 2 of the 80 layers with their 8192 x 28672 MLP matrices (3.8e9 parameters,
7.6 GB a side). A real 70B is 78 more of those layers: its time is extrapolated linearly in bytes.
Every job starts with its inputs in the page cache (read once before it). Writes
benchmarks/results/bench_70b.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked  # noqa: E402

from deltastream.synthetic import SHAPES, write_pair  # noqa: E402

GB = 1e9


def size_of(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def warm(*folders: str) -> None:
    """Read the inputs once, so that every job starts from the page cache (the 70B-2L pair, 15 GB,
    fits in this machine's RAM; otherwise the first job alone would read from disk)."""
    files = [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def run(size: str, exe: str, data: str) -> list[dict]:
    base, ft = write_pair(os.path.join(data, size), size)
    work = os.path.join(data, f"b70-{size}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    inputs = size_of(base) + size_of(ft)
    rows = []
    for method in ("bitdelta", "dare"):
        art = os.path.join(work, f"{method}.dsz")
        warm(base, ft)
        r = run_tracked([exe, "compress", base, ft, "-o", art, "-q", "--method", method])
        assert r.returncode == 0, r.stderr
        rows.append({"size": size, "job": f"compress {method}", "wall": r.wall_s, "rss": r.peak_rss_anon,
                     "read": inputs, "written": size_of(art)})
    art = os.path.join(work, "bitdelta.dsz")
    out = os.path.join(work, "rebuilt")
    warm(base)
    r = run_tracked([exe, "apply", base, art, "-o", out, "-q"])
    assert r.returncode == 0, r.stderr
    rows.append({"size": size, "job": "apply bitdelta", "wall": r.wall_s, "rss": r.peak_rss_anon,
                 "read": size_of(base) + size_of(art), "written": size_of(out)})
    shutil.rmtree(work)
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "deltastream")
    data = "bench-data"
    small, big = run("1B", exe, data), run("70B-2L", exe, data)
    scale = SHAPES["70B"].n_params / SHAPES["70B-2L"].n_params
    lines = ["# 70B shapes in bounded memory", "", "```", "python benchmarks/bench_70b.py", "```", "",
             "| pair | job | wall s | peak RssAnon | read | written | s per GB read | per-GB time / 1B's |",
             "|---|---|---|---|---|---|---|---|"]
    for s, b in zip(small, big):
        for row in (s, b):
            per = row["wall"] / (row["read"] / GB)
            ref = s["wall"] / (s["read"] / GB)
            lines.append(f"| {row['size']} | {row['job']} | {row['wall']:.1f} | {row['rss'] / 2**20:.0f} MiB | "
                         f"{row['read'] / GB:.2f} GB | {row['written'] / GB:.2f} GB | {per:.2f} | {per / ref:.2f} |")
    lines += ["", f"A real Llama-3-70B is {scale:.1f}x the 70B-2L pair's parameters. Extrapolated linearly in "
              "bytes, on this 2-core machine:", ""]
    for b in big:
        lines.append(f"- {b['job']}: {b['wall'] * scale / 60:.0f} min, reading {b['read'] * scale / GB:.0f} GB and "
                     f"writing {b['written'] * scale / GB:.0f} GB, in the same {b['rss'] / 2**20:.0f} MiB")
    text = "\n".join(lines) + "\n"
    with open("benchmarks/results/bench_70b.md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
