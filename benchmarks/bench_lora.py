"""extract-lora against mergekit's ``mergekit-extract-lora`` on the same pair, at the same rank.

    python benchmarks/bench_lora.py --size 1B --rank 64
    python benchmarks/bench_lora.py --size 1B --layers 2      # a quick run: the 1B shapes, 2 layers

Inputs: the synthetic Llama-shaped bf16 base and fine-tune of ``deltastream.synthetic`` (the
pair bench_merge.py uses, under ``--data``/<size>; ``--layers N`` keeps the size's shapes with N
layers, under <size>-<N>L). Both tools run as subprocesses on warm inputs (``memtrack``: wall
time and peak RssAnon of the process tree) and extract the same matrices: every linear weight of
the layers (q, k, v, o, gate, up, down projections), no embeddings, head or norms. deltastream
does that by default (``deltastream extract-lora BASE FT --rank R``; the embeddings, head and
norms are only reported); mergekit is told to with ``--exclude-regex`` for ``model.embed_tokens``
and ``lm_head`` (which it would otherwise store whole as ``modules_to_save``) and
``--skip-undecomposable`` (the RMSNorms, which it would otherwise store whole). Both adapters'
factors are bf16 by default (mergekit casts its factors to the checkpoints' dtype; ours gets
``--dtype bfloat16``, see ``--dtype``).

mergekit 0.1.5's extraction: per matrix, the whole delta ``ft - base`` in memory, a full
``torch.linalg.svd(..., full_matrices=False)`` in float32 on the CPU (``--device`` unset), kept
to the top ``--max-rank`` singular triplets, ``lora_A = sqrt(S) V^T`` and ``lora_B = U sqrt(S)``
(``--distribute-scale``, its default) with ``lora_alpha = r``. Ours: the streamed randomized SVD
(rank + 8 oversampled columns, 2 power iterations), ``lora_B = U S``, ``lora_A = V^T``.

Then the reconstruction error of each adapter, computed here streamed: per target matrix,
``||D - s B A||_F / ||D||_F`` with ``D = ft - base`` read in row blocks of about 4 Mi elements
(float32 products, float64 sums; ``s = lora_alpha / r`` of the module, from
``alpha_pattern``/``rank_pattern`` when there) and both adapters' factors (small) in memory, and
the total over all matrices, ``sqrt(sum ||D - s B A||^2 / sum ||D||^2)``. The best rank-r error
is the exact SVD's, so mergekit's is the reference (but for its bf16 factors' rounding).

Targets (issue 13): ours / mergekit time <= 0.5, ours / mergekit peak RssAnon <= 0.5, total
reconstruction error within 1% of mergekit's. Writes benchmarks/results/bench_lora_<size>.md
(``_<size>-<N>L`` with ``--layers``). ``--skip-mergekit`` runs ours alone (no comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from memtrack import run_tracked, warm  # noqa: E402

from deltastream.checkpoint import open_checkpoint, read_bits  # noqa: E402
from deltastream.dtypes import to_float32  # noqa: E402
from deltastream.synthetic import SHAPES, write_pair  # noqa: E402

TARGET_TIME, TARGET_MEMORY, TARGET_ERROR = 0.5, 0.5, 0.01
BLOCK_ELEMS = 4 << 20  # elements of D per row block
PREFIX = "base_model.model."


class Adapter:
    """A PEFT LoRA adapter folder: its config, and each module's factors as float32 (read whole:
    r x k and d x r)."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
            self.config = json.load(f)
        self.ckpt = open_checkpoint(os.path.join(folder, "adapter_model.safetensors"))
        pattern = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_([AB])\.weight$")
        found: dict[str, set[str]] = {}
        for name in self.ckpt.tensors:
            m = pattern.match(name)
            if m:
                found.setdefault(m.group(1), set()).add(m.group(2))
        self.modules = sorted(k for k, v in found.items() if v == {"A", "B"})
        self.extra = sorted(n for n in self.ckpt.tensors if not pattern.match(n))  # modules_to_save, biases
        self.dtypes = sorted({self.ckpt.tensors[f"{PREFIX}{m}.lora_A.weight"].dtype.name for m in self.modules})

    def _read(self, name: str) -> np.ndarray:
        info = self.ckpt.tensors[name]
        return to_float32(read_bits(info, 0, info.numel), info.dtype).reshape(info.shape)

    def factors(self, module: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(B, A, scale) with the module's merged delta ``scale * B @ A``."""
        a = self._read(f"{PREFIX}{module}.lora_A.weight")
        b = self._read(f"{PREFIX}{module}.lora_B.weight")
        r = a.shape[0]
        alpha = self._lookup(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
        if self.config.get("use_rslora"):
            return b, a, float(alpha) / float(np.sqrt(r))
        return b, a, float(alpha) / r

    @staticmethod
    def _lookup(pattern: dict, module: str, default):
        if module in pattern:
            return pattern[module]
        for key, value in pattern.items():  # PEFT matches a pattern key as a suffix of the module name
            if module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
                return value
        return default


def reconstruction(base: str, ft: str, adapters: list[Adapter], modules: list[str]) -> list[dict]:
    """Per module: ||D||_F^2 and, per adapter, ||D - s B A||_F^2, with D read in row blocks."""
    cb, cf = open_checkpoint(base), open_checkpoint(ft)
    rows = []
    for module in modules:
        name = module + ".weight"
        ib, i_f = cb.tensors[name], cf.tensors[name]
        d_rows, k = ib.shape
        facs = [ad.factors(module) for ad in adapters]
        for b, a, _ in facs:
            if b.shape != (d_rows, a.shape[0]) or a.shape[1] != k:
                raise SystemExit(f"{module}: factors {b.shape} x {a.shape} do not make {ib.shape}")
        energy, residual = 0.0, [0.0] * len(adapters)
        step = max(1, BLOCK_ELEMS // k)
        for r0 in range(0, d_rows, step):
            r1 = min(d_rows, r0 + step)
            d = (to_float32(read_bits(i_f, r0 * k, r1 * k), i_f.dtype)
                 - to_float32(read_bits(ib, r0 * k, r1 * k), ib.dtype)).reshape(r1 - r0, k)
            energy += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
            for j, (b, a, s) in enumerate(facs):
                res = d - np.float32(s) * (b[r0:r1] @ a)
                residual[j] += float(np.einsum("ij,ij->", res, res, dtype=np.float64))
        rows.append({"module": module, "shape": list(ib.shape), "rank": [a.shape[0] for _, a, _ in facs],
                     "energy": energy, "residual": residual})
    return rows


def shown(cmd: list[str]) -> str:
    return " ".join([os.path.basename(cmd[0])] + [f"'{c}'" if "\\" in c or "$" in c else c for c in cmd[1:]])


def rel(residual: float, energy: float) -> float:
    return float(np.sqrt(residual / energy)) if energy > 0 else 0.0


def render(args, stem: str, layers: int, memories: list[str], have_mk: bool, labels: list[str], cmds: list,
           runs: list, adapters: list[Adapter], rows: list[dict], error_s: float, made_s: float) -> str:
    """The results file: command lines, the table, the ratios against the targets, the errors per matrix."""
    modules = adapters[0].modules
    energy = sum(r["energy"] for r in rows)
    totals = [rel(sum(r["residual"][j] for r in rows), energy) for j in range(len(adapters))]
    flags = "".join(f" {k} {v}" for k, v in (("--layers", args.layers), ("--rank", args.rank),
                                               ("--dtype", None if args.dtype == "bfloat16" else args.dtype),
                                               ("--memory", None if memories == ["default"] else ",".join(memories)),
                                               ("--power-iters", args.power_iters), ("--oversample", args.oversample),
                                               ("--workers", args.workers)) if v is not None)
    lines = [f"# extract-lora vs mergekit-extract-lora: the {stem}-shaped bf16 pair at rank {args.rank}", "",
             "```", f"python benchmarks/bench_lora.py --size {args.size}{flags}"
             + (" --skip-mergekit" if args.skip_mergekit else ""), "```", "",
             "Commands (inputs warm in the page cache before each):", "", "```", *map(shown, cmds), "```", "",
             f"All extract the same {len(modules)} matrices ({', '.join(adapters[0].config['target_modules'])}"
             f" of {layers} layers); factors {' / '.join('+'.join(a.dtypes) for a in adapters)}; "
             f"other tensors in the adapters: {' / '.join(str(len(a.extra)) for a in adapters)}. "
             "Reconstruction error: `||D - s B A||_F / ||D||_F`, D = ft - base, over all the matrices, "
             f"computed streamed by the benchmark ({error_s:.0f} s).", "",
             "| | wall s | peak RssAnon | CPU s | reconstruction error (total) |", "|---|---|---|---|---|"]
    for label, r, err in zip(labels, runs, totals):
        lines.append(f"| {label} | {r.wall_s:.1f} | {r.peak_rss_anon / 2**20:.0f} MiB | {r.cpu_s:.0f} | {err:.6f} |")
    mk = len(memories) if have_mk else None
    if mk is not None:
        theirs = runs[mk]
        lines += ["", "| ours / mergekit | ratio | target | |", "|---|---|---|---|"]
        for i, memory in enumerate(memories):
            ours = runs[i]
            t_ratio = ours.wall_s / theirs.wall_s
            m_ratio = ours.peak_rss_anon / theirs.peak_rss_anon
            e_ratio = totals[i] / totals[mk] if totals[mk] > 0 else float("nan")
            tag = f" (--memory {memory})" if len(memories) > 1 or memory != "default" else ""
            for what, value, ok, goal in (
                    ("time", t_ratio, t_ratio <= TARGET_TIME, f"<= {TARGET_TIME}"),
                    ("peak RssAnon", m_ratio, m_ratio <= TARGET_MEMORY, f"<= {TARGET_MEMORY}"),
                    ("reconstruction error", e_ratio, abs(e_ratio - 1) <= TARGET_ERROR,
                     f"within {TARGET_ERROR:.0%} of 1")):
                lines.append(f"| {what}{tag} | {value:.4f} | {goal} | {'met' if ok else '**missed**'} |")

        def ratio(r: dict) -> float:
            return rel(r["residual"][0], r["energy"]) / max(rel(r["residual"][mk], r["energy"]), 1e-30)

        worst = max(rows, key=ratio)
        ours_err, mk_err = rel(worst["residual"][0], worst["energy"]), rel(worst["residual"][mk], worst["energy"])
        lines += ["", f"Largest per-matrix ratio of the errors ({labels[0]} / mergekit): {worst['module']}, "
                  f"{ours_err:.6f} / {mk_err:.6f} = {ratio(worst):.4f}."]
    shown_idx = [0] + ([mk] if mk is not None else [])
    head = "| matrices | count | shape | error ours |" + (" error mergekit | ours / mergekit |"
                                                      if mk is not None else "")
    sep = "|---|---|---|---|" + ("---|---|" if mk is not None else "")

    def cells(residuals: list[float], e: float) -> str:
        errs = [rel(residuals[j], e) for j in shown_idx]
        out = " | ".join(f"{x:.6f}" for x in errs)
        return out + ((f" | {errs[0] / errs[1]:.4f}" if errs[1] else " | -") if mk is not None else "")

    kinds: dict[str, list[dict]] = {}
    for r in rows:
        kinds.setdefault(r["module"].rsplit(".", 1)[-1], []).append(r)
    lines += ["", f"Per kind of matrix (errors over all its matrices; ours: {labels[0]}):", "", head, sep]
    for kind, rs in kinds.items():
        e = sum(r["energy"] for r in rs)
        res = [sum(r["residual"][j] for r in rs) for j in range(len(adapters))]
        lines.append(f"| {kind} | {len(rs)} | {'x'.join(map(str, rs[0]['shape']))} | {cells(res, e)} |")
    lines += ["", "<details><summary>every matrix</summary>", "", head.replace("| count ", "| rank "), sep]
    for r in rows:
        lines.append(f"| {r['module']} | {'/'.join(str(r['rank'][j]) for j in shown_idx)} "
                     f"| {'x'.join(map(str, r['shape']))} | {cells(r['residual'], r['energy'])} |")
    lines += ["", "</details>", "", f"(pair made or found in {made_s:.0f} s; generated at "
              f"{time.strftime('%Y-%m-%d %H:%M')})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1B", choices=sorted(k for k in SHAPES if k != "70B"))
    ap.add_argument("--layers", type=int, default=None, help="the size's shapes with only N layers (a quick run)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="our factors' dtype (default bfloat16, as mergekit writes them for a bf16 pair)")
    ap.add_argument("--memory", default="default",
                    help="comma-separated --memory values for ours, one run of ours each against the one mergekit "
                         "run ('default': deltastream's own, 1GiB), e.g. default,256MiB")
    ap.add_argument("--power-iters", type=int, default=None, help="passed to deltastream (default: its own, 2)")
    ap.add_argument("--oversample", type=int, default=None, help="passed to deltastream (default: its own, 8)")
    ap.add_argument("--workers", default=None, help="passed to deltastream (default: all cores)")
    ap.add_argument("--skip-mergekit", action="store_true", help="run ours alone")
    ap.add_argument("--keep", action="store_true", help="keep the adapters under DATA/lora-<stem>/")
    args = ap.parse_args()
    shape = SHAPES[args.size]
    stem = args.size
    if args.layers is not None:
        if args.layers < 1:
            raise SystemExit("--layers must be at least 1")
        shape = dataclasses.replace(shape, layers=args.layers)
        stem = f"{args.size}-{args.layers}L"
    memories = [m.strip() for m in args.memory.split(",") if m.strip()]
    t0 = time.perf_counter()
    base, ft = write_pair(os.path.join(args.data, stem), shape)
    made_s = time.perf_counter() - t0
    work = os.path.join(args.data, f"lora-{stem}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bindir = os.path.dirname(sys.executable)
    mergekit = os.path.join(bindir, "mergekit-extract-lora")
    have_mk = os.path.exists(mergekit) and not args.skip_mergekit

    def ours_cmd(i: int, memory: str) -> list[str]:
        extra = [("--memory", None if memory == "default" else memory), ("--power-iters", args.power_iters),
                 ("--oversample", args.oversample), ("--workers", args.workers)]
        return ([os.path.join(bindir, "deltastream"), "extract-lora", base, ft, "-o", os.path.join(work, f"ours{i}"),
                 "--rank", str(args.rank), "--dtype", args.dtype, "-q", "--overwrite"]
                + [str(x) for k, v in extra if v is not None for x in (k, v)])

    mk_dir = os.path.join(work, "mergekit")
    mk_cmd = [mergekit, "--model", ft, "--base-model", base, "--out-path", mk_dir, "--max-rank", str(args.rank),
              "--exclude-regex", r"^model\.embed_tokens$", "--exclude-regex", r"^lm_head$", "--skip-undecomposable",
              "--no-write-model-card", "--quiet"]
    runs, cmds, dirs = [], [], []  # ours for each --memory, then mergekit's
    for i, memory in enumerate(memories):
        cmds.append(ours_cmd(i, memory))
        dirs.append(os.path.join(work, f"ours{i}"))
    if have_mk:
        cmds.append(mk_cmd)
        dirs.append(mk_dir)
    for cmd in cmds:
        warm([base, ft])
        r = run_tracked(cmd)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        runs.append(r)
        print(f"{os.path.basename(cmd[0])}: {r.wall_s:.1f} s, peak RssAnon {r.peak_rss_anon / 2**20:.0f} MiB",
              flush=True)
    labels = [f"deltastream extract-lora (--memory {m})" if len(memories) > 1 or m != "default"
              else "deltastream extract-lora" for m in memories] + (["mergekit-extract-lora"] if have_mk else [])
    adapters = [Adapter(d) for d in dirs]
    modules = adapters[0].modules
    for a in adapters[1:]:
        if a.modules != modules:
            x, y = set(modules), set(a.modules)
            raise SystemExit(f"the adapters hold different modules: only the first's {sorted(x - y)[:5]}, "
                             f"only the other's {sorted(y - x)[:5]}")
    t1 = time.perf_counter()
    rows = reconstruction(base, ft, adapters, modules)
    error_s = time.perf_counter() - t1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    text = render(args, stem, shape.layers, memories, have_mk, labels, cmds, runs, adapters, rows, error_s, made_s)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open(f"benchmarks/results/bench_lora_{stem}.md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
