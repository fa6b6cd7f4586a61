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
model_stock, nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion) on the default pair, and
``passthrough`` as a ``slices`` frankenmerge (layers [0, 4L/7) of the base then [2L/7, L) of
fine-tune 1, L the size's layer count: [0, 16) + [8, 28) = 36 layers for the 0.5B shape; read and
written in bf16, the checkpoints' dtype, as a frankenmerge copies bits); writes
benchmarks/results/bench_merge_<size>_mergekit-methods.md. Its table compares the outputs by
tensor name (both must hold the same names, and their config.json the same
``num_hidden_layers``) as the largest absolute difference and the largest distance in bf16 ulps,
and states issue 13's targets for slerp, model_stock and passthrough (equal to one bf16 ulp, at
least 3x faster, at most half the peak RssAnon) as met or missed. mergekit 0.1.5 installs
beside the CPU torch with ``pip install --no-deps mergekit immutables accelerate peft`` (its
other requirements are already here or unused by a merge). ``--methods a,b`` runs only those.
``--repeat N`` runs each merge N times (both tools, alternating) and reports every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked, warm  # noqa: E402

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
#: method -> slices of a frankenmerge: (model: 0 the base, 1 fine-tune 1, layer_range as fractions of
#: the layer count in sevenths), and the dtype it is read in
SLICED = {"passthrough": ([(0, 0, 4), (1, 2, 7)], "bfloat16")}
#: issue 13's targets on the mergekit-methods pair: at most this time / memory ratio, at most this many bf16 ulps
TARGETS = {"slerp", "model_stock", "passthrough"}
TARGET_TIME, TARGET_MEMORY, TARGET_ULPS = 1 / 3, 0.5, 1
TIE_ULPS = 4  # the tie-heavy pair: deltas of 1..4 bf16 ulps
PAIRS = {  # --pair: (merge methods, fine-tunes merged, the pairs' ulps)
    "default": (["task_arithmetic", "ties", "dare_ties"], 2, 0),  # "mergekit-methods": fine-tunes as each needs
    "mergekit-methods": (["slerp", "model_stock", "passthrough", "nuslerp", "multislerp", "karcher", "sce",
                          "nearswap", "arcee_fusion"], 2, 0),
    "ties-heavy": (["ties"], 3, TIE_ULPS),
}


def n_layers(model: str) -> int:
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        return int(json.load(f)["num_hidden_layers"])


def sliced_config(path: str, method: str, base: str, fts: list[str]) -> str:
    """A ``slices`` config (mergekit's syntax, which ours follows): one source per slice."""
    spec, dtype = SLICED[method]
    layers, models = n_layers(base), [base, *fts]
    slices = "".join(f"  - sources:\n      - model: {models[m]}\n"
                     f"        layer_range: [{layers * a // 7}, {layers * b // 7}]\n" for m, a, b in spec)
    with open(path, "w") as f:
        f.write(f"merge_method: {method}\nslices:\n{slices}dtype: {dtype}\nout_dtype: bfloat16\n")
    return path


def config(path: str, method: str, base: str, fts: list[str]) -> str:
    if method in SLICED:
        return sliced_config(path, method, base, fts)
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


def _bf16_ordinal(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns as integers in the order of their values (+0 and -0 both 0): adjacent
    bf16 values differ by 1, so the difference of two ordinals is a distance in ulps."""
    x = bits.astype(np.int32)
    return np.where(x & 0x8000, -(x & 0x7FFF), x)


#: an element more than one bf16 ulp apart is "cancellation" when the two outputs are within this
#: many float32 ulps of the element's largest input: float32 rounding of terms (t * mean, (1 - t) * base)
#: much larger than their sum, which one bf16 ulp of the small sum cannot absorb
CANCEL_F32_ULPS = 4


def compare(a: str, b: str, inputs: list[str] = ()) -> dict:
    """The two outputs tensor by tensor (by name: a frankenmerge's renamed layers included):
    the largest absolute difference; for bf16 tensors the largest distance in bf16 ulps (None
    when a tensor is not bf16 in both), the count of elements 1 ulp apart and more than 1 apart,
    and of the latter those within CANCEL_F32_ULPS float32 ulps of the element's largest input
    (``inputs``: the merge's models, same tensor names; none for a frankenmerge). Raises if the
    tensor names, shapes or the config.json layer counts differ."""
    ca, cb = open_checkpoint(a), open_checkpoint(b)
    if set(ca.tensors) != set(cb.tensors):
        raise SystemExit(f"{a} and {b} hold different tensors: only in ours "
                         f"{sorted(set(ca.tensors) - set(cb.tensors))[:5]}, "
                         f"only in mergekit's {sorted(set(cb.tensors) - set(ca.tensors))[:5]}")
    layers = n_layers(a), n_layers(b)
    if layers[0] != layers[1]:
        raise SystemExit(f"config.json num_hidden_layers: ours {layers[0]}, mergekit's {layers[1]}")
    models = [open_checkpoint(m) for m in inputs]
    worst, ulps, one, more, cancel = 0.0, 0, 0, 0, 0
    for name, info in ca.tensors.items():
        other = cb.tensors[name]
        if tuple(info.shape) != tuple(other.shape):
            raise SystemExit(f"{name}: shape {info.shape} in ours, {other.shape} in mergekit's")
        for s in range(0, info.numel, 1 << 24):
            e = min(info.numel, s + (1 << 24))
            bx, by = read_bits(info, s, e), read_bits(other, s, e)
            x, y = to_float32(bx, info.dtype), to_float32(by, other.dtype)
            worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
            if ulps is None or not info.dtype.name == other.dtype.name == "BF16":
                ulps = None
                continue
            u = np.abs(_bf16_ordinal(bx) - _bf16_ordinal(by))
            ulps = max(ulps, int(np.max(u, initial=0)))
            one += int(np.count_nonzero(u == 1))
            far = np.flatnonzero(u > 1)
            more += far.size
            if far.size and models and all(name in m.tensors for m in models):
                scale = np.zeros(far.size, np.float32)
                for m in models:
                    t = m.tensors[name]
                    scale = np.maximum(scale, np.abs(to_float32(read_bits(t, s, e), t.dtype)[far]))
                cancel += int(np.count_nonzero(np.abs(x[far] - y[far]) <= CANCEL_F32_ULPS * 2.0**-23 * scale))
    return {"diff": worst, "ulps": ulps, "one_ulp": one, "more": more, "cancel": cancel, "layers": layers[0],
            "tensors": len(ca.tensors)}


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
                   **compare(os.path.join(work, "ours"), os.path.join(work, "mergekit"),
                             [] if method in SLICED else [base, *fts[:METHODS[method][0] or len(fts)]]))
        shutil.rmtree(os.path.join(work, "mergekit"))
    shutil.rmtree(os.path.join(work, "ours"))
    return row


def ulps_cell(row: dict) -> str:
    if "diff" not in row:
        return "-"
    if row["diff"] == 0:
        return "bit-identical"
    return "not bf16" if row["ulps"] is None else str(row["ulps"])


def verdict(row: dict) -> str:
    """met / missed (and what) for a method with a target; '-' for the others or without mergekit."""
    if row["method"] not in TARGETS:
        return "(no target)"
    if "mk_s" not in row:
        return "- (no mergekit)"
    missed = [what for what, ok in (
        ("equality", row["ulps"] is not None and row["more"] == row["cancel"]),
        ("time", row["ours_s"] <= TARGET_TIME * row["mk_s"]),
        ("memory", row["ours_rss"] <= TARGET_MEMORY * row["mk_rss"])) if not ok]
    if missed:
        return f"**missed** ({', '.join(missed)})"
    return "met" if not row["more"] else f"met ({row['more']} elements > 1 ulp, all cancellation)"


def model_stock_t(base: str, fts: list[str], name: str) -> dict:
    """model_stock's t on one tensor, as mergekit computes it (torch float32 sums) and exactly
    (float64 sums of the exact float32 values), and how many of the tensor's bf16 outputs of
    mergekit's own formula the difference alone moves: the cause of the two tools' differences."""
    import torch

    def read(folder: str) -> torch.Tensor:
        info = open_checkpoint(folder).tensors[name]
        return torch.from_numpy(to_float32(read_bits(info, 0, info.numel), info.dtype))

    w0, ws = read(base), [read(f) for f in fts]

    def t_of(dtype: torch.dtype) -> float:
        a, b = (w.to(dtype) - w0.to(dtype) for w in ws)
        cos = ((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-6)).clamp(-1, 1)
        return float(2 * cos / (1 + cos))

    def merged(t: float) -> torch.Tensor:
        t32 = torch.tensor(np.float32(t))
        return (t32 * (ws[0] + ws[1]) / 2 + (1 - t32) * w0).bfloat16().view(torch.int16).int()

    t32, t64 = t_of(torch.float32), t_of(torch.float64)
    moved = (merged(t32) - merged(t64)).abs()
    return {"tensor": name, "t_float32": t32, "t_exact": t64, "relative": abs(t32 - t64) / abs(t64),
            "moved": int((moved > 0).sum()), "moved_more": int((moved > 1).sum()), "numel": moved.numel()}


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
    targets = args.pair == "mergekit-methods"
    flags += f" --methods {args.methods}" if args.methods else ""
    lines = [title, "", "```", f"python benchmarks/bench_merge.py --size {args.size}{flags}", "```", ""]
    if targets:
        lines += [f"Issue 13's targets for {', '.join(sorted(TARGETS))}: the output equal to mergekit's to "
                  f"{TARGET_ULPS} bf16 ulp where the order of operations differs, ours / mergekit time <= "
                  f"{TARGET_TIME:.2f} (>= 3x faster), ours / mergekit peak RssAnon <= {TARGET_MEMORY} (<= 0.5x). "
                  "Outputs compared tensor by tensor by name (same names and config.json num_hidden_layers in "
                  "both). An element more than 1 bf16 ulp apart counts as *cancellation* (explained, not a miss) "
                  f"when the two values are within {CANCEL_F32_ULPS} float32 ulps of the element's largest input: "
                  "the merged value is much smaller than the terms it is summed from (model_stock's "
                  "`t * mean + (1 - t) * base` near 0), so mergekit's float32 rounding of those terms is several "
                  "ulps of the small bf16 result.", ""]
    lines += ["| method | ours s | mergekit s | ours / mergekit time | ours RssAnon | mergekit RssAnon "
              "| ours / mergekit memory | max abs difference |"
              + (" bf16 ulps | elements 1 ulp / > 1 ulp (of which cancellation) | layers | target |"
                 if targets else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if targets else "")]
    for r in rows:
        mk = r.get("mk_s")
        mk_rss = r.get("mk_rss")
        line = (f"| {r['method']} | {r['ours_s']:.1f} | {f(mk, '{:.1f}')} "
                f"| {f(mk and r['ours_s'] / mk, '{:.2f}')} | {r['ours_rss'] / 2**20:.0f} MiB "
                f"| {f(mk_rss and mk_rss / 2**20, '{:.0f} MiB')} "
                f"| {f(mk_rss and r['ours_rss'] / mk_rss, '{:.2f}')} | {f(r.get('diff'), '{:.3g}')} |")
        if targets:
            counts = "-" if r.get("ulps") is None else f"{r['one_ulp']} / {r['more']} ({r['cancel']})"
            line += f" {ulps_cell(r)} | {counts} | {f(r.get('layers'), '{}')} | {verdict(r)} |"
        lines.append(line)
    if targets and "model_stock" in methods:
        m = model_stock_t(base, fts[:2], "model.layers.3.mlp.down_proj.weight")
        lines += ["", f"model_stock's t on {m['tensor']}: mergekit's float32 sums give {m['t_float32']:.6f}, the exact "
                  f"sums {m['t_exact']:.6f} ({m['relative']:.1e} relative); in mergekit's own formula that alone moves "
                  f"{m['moved']} of the tensor's {m['numel']} bf16 outputs ({m['moved_more']} by more than one ulp)."]
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
