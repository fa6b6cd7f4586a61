"""Per-method compression, speed and memory on a synthetic Llama-shaped bf16 pair.

    python benchmarks/bench_methods.py --size 1B
    python benchmarks/bench_methods.py --size 0.5B --pair ties-heavy

For each method configuration: the stored size and ratio against the bf16 fine-tune, on the
edited linear weights (the tensors the method edits, array metadata included) and on the whole
artifact (with the tensors kept exact); compress and edit wall time as a ratio of the time to
read their inputs (``cat`` to /dev/null, page cache warm, in the same run); peak RssAnon of
compress and edit (summed over the process tree, sampled every 20 ms). Writes a markdown table to
benchmarks/results/bench_methods_<size>.md.

``--pair ties-heavy``: the methods that rank |delta| (trim, multi-bit BitDelta) on a fine-tune
whose every element is 1-4 bf16 ulps off the base (``write_pair(ulps=4)``): most magnitudes tie
with a threshold, the rank passes' worst case. Writes bench_methods_<size>_ties-heavy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked  # noqa: E402

from deltastream.synthetic import SHAPES, write_pair  # noqa: E402

RUNS = [
    ("lossless", []),
    ("dare", ["p=0.9"]),
    ("bitdelta", []),
    ("multibit", ["bits=2"]),
    ("dare_bitdelta", ["p=0.9"]),
    ("lowrank", ["rank_fraction=0.1"]),
]
EDIT_ONLY = [("trim", ["density=0.2"]), ("extrapolate", ["alpha=0.3"])]
TIE_ULPS = 4  # the tie-heavy pair: deltas of 1..4 bf16 ulps
RANKED = [("multibit", ["bits=2"]), ("trim", ["density=0.2"])]  # what --pair ties-heavy runs


def cat_time(folders: list[str]) -> float:
    files = [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1B", choices=sorted(SHAPES))
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--methods", nargs="*", default=None, help="only these method names")
    ap.add_argument("--pair", default="default", choices=("default", "ties-heavy"),
                    help="ties-heavy: deltas of 1-4 bf16 ulps (many tied magnitudes), the ranking methods only")
    args = ap.parse_args()
    ulps = TIE_ULPS if args.pair == "ties-heavy" else 0
    pair = os.path.join(args.data, f"{args.size}-ulps{ulps}" if ulps else args.size)
    base, ft = write_pair(pair, SHAPES[args.size], seed=0, ulps=ulps)
    work = os.path.join(pair, "methods")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    exe = [os.path.join(os.path.dirname(sys.executable), "deltastream")]
    read_s = cat_time([base, ft])
    rows = []
    from deltastream.methods import METHODS

    for name, params in (RANKED if ulps else RUNS + EDIT_ONLY):
        if name not in METHODS or (args.methods and name not in args.methods):
            continue
        flags = ["--method", name] + [x for p in params for x in ("-p", p)]
        label = name + (f" ({', '.join(params)})" if params else "")
        row = {"method": label}
        if (name, params) in RUNS:
            art = os.path.join(work, f"{name}.dsz")
            r = run_tracked([*exe, "compress", base, ft, "-o", art, "-q", "--overwrite", *flags])
            if r.returncode:
                raise SystemExit(f"{label}: compress failed: {r.stderr}")
            info = json.loads(subprocess.run([*exe, "info", art, "--json"], capture_output=True, text=True,
                                             check=True).stdout)
            edited = [t for t in info["tensors"] if t["policy"] not in ("lossless", "new", "grown")]
            stored_edited = sum(t["stored_bytes"] for t in edited)
            row.update(compress_s=r.wall_s, compress_rss=r.peak_rss_anon,
                       linear_ratio=(sum(t["bytes"] for t in edited) / stored_edited) if stored_edited else None,
                       whole_ratio=info["ratio"], stored=info["stored_bytes"])
            shutil.rmtree(art)
        out = os.path.join(work, f"{name}-edited")
        r = run_tracked([*exe, "edit", base, ft, "-o", out, "-q", "--overwrite", *flags])
        if r.returncode:
            raise SystemExit(f"{label}: edit failed: {r.stderr}")
        row.update(edit_s=r.wall_s, edit_rss=r.peak_rss_anon)
        shutil.rmtree(out)
        rows.append(row)
        print(row, flush=True)
    shutil.rmtree(work, ignore_errors=True)

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    kind = f" tie-heavy (deltas of 1-{ulps} bf16 ulps)" if ulps else ""
    flags = f" --pair {args.pair}" if ulps else ""
    lines = [f"# Methods on the {args.size}-shaped{kind} bf16 pair", "", "```", f"python benchmarks/bench_methods.py "
             f"--size {args.size}{flags}", "```", "",
             f"Reading the inputs (base + fine-tune, `cat` to /dev/null, page cache warm): {read_s:.2f} s.", "",
             "| method | ratio, linear weights | ratio, whole artifact | compress s | compress speed / read "
             "| compress RssAnon | edit s | edit speed / read | edit RssAnon |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {f(r.get('linear_ratio'), '{:.1f}x')} | {f(r.get('whole_ratio'), '{:.2f}x')} "
            f"| {f(r.get('compress_s'), '{:.1f}')} | {f(r.get('compress_s') and read_s / r['compress_s'], '{:.3f}')} "
            f"| {f(r.get('compress_rss') and r['compress_rss'] / 2**20, '{:.0f} MiB')} | {r['edit_s']:.1f} "
            f"| {read_s / r['edit_s']:.3f} | {r['edit_rss'] / 2**20:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(f"benchmarks/results/bench_methods_{args.size}{'_' + args.pair if ulps else ''}.md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
