"""Merging, ours against mergekit on the same inputs, and batch compression.

    python benchmarks/bench_merge.py --size 0.5B

Inputs: a synthetic Llama-shaped bf16 base and two fine-tunes of it (``deltastream.synthetic``,
variants 0 and 1). For task_arithmetic, ties and dare_ties (density 0.5): our wall time and
peak RssAnon (summed over the process tree), and, when mergekit is installed (the optional
``compare`` extra; never a test dependency), mergekit's on the same config in the same run, their
ratios, and the largest difference between the two outputs. Then batch compression: one
``compress`` of 4 fine-tunes against the time of one. Writes benchmarks/results/bench_merge_<size>.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked  # noqa: E402

from deltastream.checkpoint import open_checkpoint, read_bits  # noqa: E402
from deltastream.dtypes import to_float32  # noqa: E402
from deltastream.synthetic import write_pair  # noqa: E402

METHODS = {"task_arithmetic": "", "ties": ", density: 0.5", "dare_ties": ", density: 0.5"}


def config(path: str, method: str, base: str, fts: list[str]) -> str:
    models = "".join(f"  - model: {ft}\n    parameters: {{weight: 0.5{METHODS[method]}}}\n" for ft in fts)
    with open(path, "w") as f:
        f.write(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
                "dtype: float32\nout_dtype: bfloat16\n")  # no tokenizer: the synthetic models have none
    return path


def warm(paths: list[str]) -> None:
    """Read the inputs once so that both tools start with them in the page cache (whoever ran
    first would otherwise pay for the disk)."""
    for path in paths:
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                with open(os.path.join(path, name), "rb") as f:
                    while f.read(64 << 20):
                        pass


def max_difference(a: str, b: str) -> float:
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    worst = 0.0
    for name, info in ca.tensors.items():
        other = cb.tensors[name]
        for s in range(0, info.numel, 1 << 24):
            e = min(info.numel, s + (1 << 24))
            x = to_float32(read_bits(info, s, e), info.dtype)
            y = to_float32(read_bits(other, s, e), other.dtype)
            worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--data", default="bench-data")
    args = ap.parse_args()
    folders = [os.path.join(args.data, args.size)] + [os.path.join(args.data, f"{args.size}-v{v}") for v in (1, 2, 3)]
    pairs = [write_pair(f, args.size, variant=v) for v, f in enumerate(folders)]
    base, fts = pairs[0][0], [p[1] for p in pairs]
    work = os.path.join(args.data, f"merge-{args.size}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    exe = os.path.dirname(sys.executable)
    mergekit = os.path.join(exe, "mergekit-yaml")
    has_mergekit = os.path.exists(mergekit)
    rows = []
    for method in METHODS:
        cfg = config(os.path.join(work, f"{method}.yaml"), method, os.path.abspath(base),
                     [os.path.abspath(f) for f in fts[:2]])
        warm([base, *fts[:2]])
        ours = run_tracked([os.path.join(exe, "deltastream"), "merge", cfg, "-o", os.path.join(work, "ours"), "-q",
                            "--overwrite"])
        if ours.returncode:
            raise SystemExit(ours.stderr)
        row = {"method": method, "ours_s": ours.wall_s, "ours_rss": ours.peak_rss_anon}
        if has_mergekit:
            warm([base, *fts[:2]])
            theirs = run_tracked([mergekit, cfg, os.path.join(work, "mergekit"), "--random-seed", "0",
                                  "--allow-crimes", "--lazy-unpickle"])
            if theirs.returncode:
                raise SystemExit(theirs.stderr[-2000:])
            row.update(mk_s=theirs.wall_s, mk_rss=theirs.peak_rss_anon,
                       diff=max_difference(os.path.join(work, "ours"), os.path.join(work, "mergekit")))
            shutil.rmtree(os.path.join(work, "mergekit"))
        shutil.rmtree(os.path.join(work, "ours"))
        rows.append(row)
        print(row, flush=True)
    ds_exe = os.path.join(exe, "deltastream")
    warm([base, *fts])
    one = run_tracked([ds_exe, "compress", base, fts[0], "-o", os.path.join(work, "one.dsz"), "-q"])
    four = run_tracked([ds_exe, "compress", base, *fts, "-o", os.path.join(work, "four"), "-q"])
    shutil.rmtree(work, ignore_errors=True)

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    lines = [f"# Merging the {args.size}-shaped bf16 base + 2 fine-tunes", "", "```",
             f"python benchmarks/bench_merge.py --size {args.size}", "```", "",
             "| method | ours s | mergekit s | ours / mergekit time | ours RssAnon | mergekit RssAnon "
             "| ours / mergekit memory | max abs difference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mk = r.get("mk_s")
        lines.append(f"| {r['method']} | {r['ours_s']:.1f} | {f(mk, '{:.1f}')} | {f(mk and r['ours_s'] / mk, '{:.2f}')} "
                     f"| {r['ours_rss'] / 2**20:.0f} MiB | {f(r.get('mk_rss') and r['mk_rss'] / 2**20, '{:.0f} MiB')} "
                     f"| {f(r.get('mk_rss') and r['ours_rss'] / r['mk_rss'], '{:.2f}')} | {f(r.get('diff'), '{:.3g}')} |")
    lines += ["", f"Batch compression (lossless): one fine-tune {one.wall_s:.1f} s; four fine-tunes in one command "
              f"{four.wall_s:.1f} s = **{four.wall_s / one.wall_s:.2f}x** the time of one "
              f"(peak RssAnon {one.peak_rss_anon / 2**20:.0f} / {four.peak_rss_anon / 2**20:.0f} MiB)."]
    text = "\n".join(lines) + "\n"
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(f"benchmarks/results/bench_merge_{args.size}.md", "w") as fh:
        fh.write(text)
    print(text)
    print(f"(generated at {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
