"""Merging, ours against mergekit on the same inputs, and batch compression.

    python benchmarks/bench_merge.py --size 0.5B
    python benchmarks/bench_merge.py --size 0.5B --pair ties-heavy --repeat 2

Inputs: a synthetic Llama-shaped bf16 base and two fine-tunes of it (``deltastream.synthetic``,
variants 0 and 1). For task_arithmetic, ties and dare_ties (density 0.5): our wall time and
peak RssAnon (summed over the process tree), and, when mergekit is installed (the optional
``compare`` extra; never a test dependency), mergekit's on the same config in the same run, their
ratios, and the largest difference between the two outputs. Then batch compression: one
``compress`` of 4 fine-tunes against the time of one. Writes benchmarks/results/bench_merge_<size>.md.

``--pair ties-heavy``: TIES of three fine-tunes whose every element is 1-4 bf16 ulps off the base
(``write_pair(ulps=4)``, embeddings included): |delta| takes a few values per exponent, so most
elements tie with the trim threshold, as in real bf16 fine-tunes; the exact top-k's worst case.
Writes benchmarks/results/bench_merge_<size>_ties-heavy.md (no batch compression section).
``--pair mergekit-methods``: mergekit's other methods (slerp with a per-filter gradient of t,
model_stock, nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion) on the default pair;
writes benchmarks/results/bench_merge_<size>_mergekit-methods.md. mergekit 0.1.5 installs
beside the CPU torch with ``pip install --no-deps mergekit immutables accelerate peft`` (its
other requirements are already here or unused by a merge). ``--methods a,b`` runs only those.
``--repeat N`` runs each merge N times (both tools, alternating) and reports every run.
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

#: method -> (fine-tunes merged (None: the pair's), per-model parameters besides weight (None: no
#: weight), global parameters)
METHODS = {"task_arithmetic": (None, "", ""), "ties": (None, ", density: 0.5", ""),
           "dare_ties": (None, ", density: 0.5", ""),
           # mergekit's other methods (merging/methods/): base + the fine-tunes
           "slerp": (1, None, "{t: [{filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}, {value: 0.5}]}"),
           "nuslerp": (2, "", ""), "multislerp": (2, "", ""), "karcher": (2, None, ""),
           "model_stock": (2, None, ""), "sce": (2, None, "{select_topk: 0.5}"), "nearswap": (1, None, "{t: 0.0001}"),
           "arcee_fusion": (1, None, "")}
TIE_ULPS = 4  # the tie-heavy pair: deltas of 1..4 bf16 ulps
PAIRS = {  # --pair: (merge methods, fine-tunes merged, the pairs' ulps)
    "default": (["task_arithmetic", "ties", "dare_ties"], 2, 0),  # "mergekit-methods": fine-tunes as each needs
    "mergekit-methods": (["slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce", "nearswap",
                          "arcee_fusion"], 2, 0),
    "ties-heavy": (["ties"], 3, TIE_ULPS),
}


def config(path: str, method: str, base: str, fts: list[str]) -> str:
    count, per_model, glob = METHODS[method]
    fts = fts[:count] if count else fts
    if per_model is None:
        models = "".join(f"  - model: {ft}\n" for ft in fts)
    else:
        models = "".join(f"  - model: {ft}\n    parameters: {{weight: 0.5{per_model}}}\n" for ft in fts)
    with open(path, "w") as f:  # no tokenizer: the synthetic models have none
        f.write(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}"
                + (f"parameters: {glob}\n" if glob else "") + "dtype: float32\nout_dtype: bfloat16\n")
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


def merge_both(work: str, method: str, base: str, fts: list[str], mergekit: str | None) -> dict:
    """One merge by us, then by mergekit (if given) on the same config and warm inputs."""
    cfg = config(os.path.join(work, f"{method}.yaml"), method, os.path.abspath(base), [os.path.abspath(f) for f in fts])
    warm([base, *fts])
    ours = run_tracked([os.path.join(os.path.dirname(sys.executable), "deltastream"), "merge", cfg,
                        "-o", os.path.join(work, "ours"), "-q", "--overwrite"])
    if ours.returncode:
        raise SystemExit(ours.stderr)
    row = {"method": method, "ours_s": ours.wall_s, "ours_rss": ours.peak_rss_anon}
    if mergekit:
        warm([base, *fts])
        theirs = run_tracked([mergekit, cfg, os.path.join(work, "mergekit"), "--random-seed", "0",
                              "--allow-crimes", "--lazy-unpickle"])
        if theirs.returncode:
            raise SystemExit(theirs.stderr[-2000:])
        row.update(mk_s=theirs.wall_s, mk_rss=theirs.peak_rss_anon,
                   diff=max_difference(os.path.join(work, "ours"), os.path.join(work, "mergekit")))
        shutil.rmtree(os.path.join(work, "mergekit"))
    shutil.rmtree(os.path.join(work, "ours"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="0.5B")
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--pair", default="default", choices=sorted(PAIRS),
                    help="ties-heavy: TIES of 3 fine-tunes with deltas of 1-4 bf16 ulps (many tied magnitudes)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each merge (machine noise)")
    ap.add_argument("--methods", default="", help="comma-separated: only these of the pair's methods")
    args = ap.parse_args()
    methods, merged, ulps = PAIRS[args.pair]
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    stem = f"{args.size}-ulps{ulps}" if ulps else args.size
    folders = [os.path.join(args.data, stem)] + [os.path.join(args.data, f"{stem}-v{v}") for v in (1, 2, 3)]
    pairs = [write_pair(f, args.size, variant=v, ulps=ulps) for v, f in enumerate(folders[:merged if ulps else 4])]
    base, fts = pairs[0][0], [p[1] for p in pairs]
    work = os.path.join(args.data, f"merge-{stem}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    mergekit = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    rows = []
    for method in methods:
        for _ in range(args.repeat):
            rows.append(merge_both(work, method, base, fts[:merged], mergekit if os.path.exists(mergekit) else None))
            print(rows[-1], flush=True)
    batch = None
    if args.pair == "default":
        ds_exe = os.path.join(os.path.dirname(sys.executable), "deltastream")
        warm([base, *fts])
        batch = (run_tracked([ds_exe, "compress", base, fts[0], "-o", os.path.join(work, "one.dsz"), "-q"]),
                 run_tracked([ds_exe, "compress", base, *fts, "-o", os.path.join(work, "four"), "-q"]))
    shutil.rmtree(work, ignore_errors=True)

    def f(x, fmt):
        return "-" if x is None else fmt.format(x)

    title = (f"# Merging the {args.size}-shaped bf16 base + 2 fine-tunes" if not ulps else
             f"# TIES of three tie-heavy fine-tunes (deltas of 1-{ulps} bf16 ulps) of the {args.size}-shaped bf16 base")
    if args.pair == "mergekit-methods":
        title = f"# mergekit's other methods on the {args.size}-shaped bf16 base and fine-tunes"
    flags = ((f" --pair {args.pair}" if args.pair != "default" else "")
             + (f" --repeat {args.repeat}" if args.repeat > 1 else ""))
    lines = [title, "", "```", f"python benchmarks/bench_merge.py --size {args.size}{flags}", "```", "",
             "| method | ours s | mergekit s | ours / mergekit time | ours RssAnon | mergekit RssAnon "
             "| ours / mergekit memory | max abs difference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mk = r.get("mk_s")
        mk_rss = r.get("mk_rss")
        lines.append(f"| {r['method']} | {r['ours_s']:.1f} | {f(mk, '{:.1f}')} "
                     f"| {f(mk and r['ours_s'] / mk, '{:.2f}')} | {r['ours_rss'] / 2**20:.0f} MiB "
                     f"| {f(mk_rss and mk_rss / 2**20, '{:.0f} MiB')} "
                     f"| {f(mk_rss and r['ours_rss'] / mk_rss, '{:.2f}')} | {f(r.get('diff'), '{:.3g}')} |")
    if batch:
        one, four = batch
        lines += ["", f"Batch compression (lossless): one fine-tune {one.wall_s:.1f} s; four fine-tunes in one command "
                  f"{four.wall_s:.1f} s = **{four.wall_s / one.wall_s:.2f}x** the time of one "
                  f"(peak RssAnon {one.peak_rss_anon / 2**20:.0f} / {four.peak_rss_anon / 2**20:.0f} MiB)."]
    text = "\n".join(lines) + "\n"
    os.makedirs("benchmarks/results", exist_ok=True)
    suffix = f"_{args.pair}" if args.pair != "default" else ""
    with open(f"benchmarks/results/bench_merge_{args.size}{suffix}.md", "w") as fh:
        fh.write(text)
    print(text)
    print(f"(generated at {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
