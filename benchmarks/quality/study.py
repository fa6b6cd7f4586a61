"""The quality study: every edit of the paper at its settings, on a real fine-tune, with the
``analyze`` term beside the measured loss change (METHODS.md Part B; docs/quality.md reads it).

    python benchmarks/quality/study.py [--cache bench-data/quality] [--out docs/quality]
                                       [--rows dare,table1,...] [--max-tokens 1024] [--tiny]

Runs prepare.py's steps first (cached), then one ``Analyzer`` over the fine-tune and the held-out
text: the model loads once, the gradient at W_POST is taken once, and each row is one edit made by
``edit``'s own code. Writes results.json, results.csv, one plot per group, scatter.png (term against
measured change over all rows) and tables.md; ``--doc FILE`` also replaces the block between
``<!-- study:begin -->`` and ``<!-- study:end -->`` in FILE with the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from docfill import fill_doc  # noqa: E402
from prepare import DEFAULT_CACHE, ROOT, held_out_loss, prepare  # noqa: E402

from deltastream.analysis import Analyzer  # noqa: E402
from deltastream.analysis.sweep import Sweep, plot_sweep, run_sweep, write_csv  # noqa: E402

SMALL_CHANGE = 0.05  # the "small" measured change: the term is checked to be within 10% there
TABLE1_K = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5)


@dataclass(frozen=True)
class Group:
    """One figure of the study: methods (name, fixed parameters), one parameter swept over values."""

    name: str
    title: str
    methods: list[tuple[str, dict[str, Any]]]
    sweep: Sweep
    claim: str = ""
    extra: dict = field(default_factory=dict)


GROUPS = [
    Group("dare", "DARE and DARE-k: drop rate p, one series per k",
          [("dare", {"k": 0.0}), ("dare", {"k": 0.5}), ("dare", {"k": -0.5})], Sweep("p", (0.5, 0.9, 0.99)),
          "DARE keeps the fine-tune's performance up to high drop rates; k != 0 (DARE-k) changes little at p = 0.5"),
    Group("table1", "Table 1 at p = 0.5: random (DARE-k), biased by sign of dW, biased by sign of dW.grad",
          [("dare", {"p": 0.5}), ("biased", {"p": 0.5, "by": "delta"}), ("biased", {"p": 0.5, "by": "grad"})],
          Sweep("k", TABLE1_K),
          "random and dW-biased multipliers barely move the loss; the dW.grad-biased edit collapses for k far from 1"),
    Group("multibit", "multi-bit BitDelta: magnitude bits", [("multibit", {})], Sweep("bits", (1, 2, 3, 4)),
          "4 bits match the fine-tune; 1 bit loses"),
    Group("bitdelta", "BitDelta (1 bit, one scale per tensor): scale multiple", [("bitdelta", {})],
          Sweep("scale", (0.5, 0.75, 1.0, 1.5, 2.0)), "BitDelta loses; the mean magnitude (scale 1) is not optimal"),
    Group("trim", "TIES trim (top 20% of |delta| per tensor)", [("trim", {})], Sweep("density", (0.2,)),
          "TIES trim loses"),
    Group("lowrank", "low rank (Twin-Merging, rank fraction 0.1)", [("lowrank", {})], Sweep("rank_fraction", (0.1,)),
          "low rank loses"),
    Group("extrapolate", "extrapolation / interpolation: W_POST + alpha dW", [("extrapolate", {})],
          Sweep("alpha", tuple(round(-1 + 0.2 * i, 1) for i in range(11))),
          "the sign of the term predicts whether extrapolating helps"),
]


class CachedAnalyzer:
    """An Analyzer that runs an edit it has seen once only (Table 1's DARE p=0.5 k=0.5 is also a
    DARE row)."""

    def __init__(self, analyzer: Analyzer):
        self.analyzer, self.seen = analyzer, {}

    def run(self, method, params, **kw):
        key = (method, json.dumps(params, sort_keys=True), json.dumps(kw, sort_keys=True, default=str))
        if key not in self.seen:
            self.seen[key] = self.analyzer.run(method, params, **kw)
        return self.seen[key]


def run_study(prepared, groups: list[Group], *, max_tokens: int, seq_len: int, steps: int, batch_size: int,
              log=print) -> dict[str, Any]:
    started = time.perf_counter()
    with Analyzer(prepared.base, prepared.fine_tune, prepared.eval_text, steps=steps, max_tokens=max_tokens,
                  seq_len=seq_len, batch_size=batch_size) as analyzer:
        t = time.perf_counter()
        analyzer.gradient()
        gradient_s = time.perf_counter() - t
        cached = CachedAnalyzer(analyzer)
        rows: list[dict[str, Any]] = []
        for group in groups:
            log(f"{group.name}: {group.title}")

            def show(row, group=group):
                row["group"] = group.name
                log(f"  {row['method']:32} {row['parameter']}={row['value']:<6} term {row['term']:+.5f}  "
                    f"measured {row['delta_loss']:+.5f}  ({row['seconds']:.0f} s)")

            rows += run_sweep(cached, group.methods, group.sweep, on_row=show)  # type: ignore[arg-type]
        tokens, predicted = analyzer.windows.tokens, analyzer.windows.predicted
    loss_base = held_out_loss(prepared.base, prepared.eval_text, max_tokens, seq_len)
    return {"rows": rows, "loss_base": loss_base, "loss_post": rows[0]["loss_post"] if rows else None,
            "tokens": tokens, "predicted": predicted, "steps": steps, "seq_len": seq_len,
            "gradient_s": gradient_s, "study_s": time.perf_counter() - started, "prepare": prepared.log}


# --- reading the figures ---------------------------------------------------------------------------

def unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct edit (Table 1's DARE p=0.5 k=0.5 is also a DARE row): what statistics count."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(json.dumps(r["config"], sort_keys=True), r)
    return list(seen.values())


def correlation(rows: list[dict[str, Any]]) -> dict[str, float]:
    import numpy as np

    rows = unique(rows)
    x = np.array([r["term"] for r in rows])
    y = np.array([r["delta_loss"] for r in rows])
    if len(rows) < 3 or x.std() == 0 or y.std() == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "n": len(rows)}

    def ranks(v):
        return np.argsort(np.argsort(v)).astype(float)

    return {"pearson": float(np.corrcoef(x, y)[0, 1]), "spearman": float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
            "n": len(rows)}


def relative_error(row: dict[str, Any]) -> float:
    return abs(row["term"] - row["delta_loss"]) / abs(row["delta_loss"]) if row["delta_loss"] else float("nan")


def small_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in unique(rows) if 0 < abs(r["delta_loss"]) < SMALL_CHANGE]


def tables(study: dict[str, Any], groups: list[Group]) -> str:
    """The markdown the doc shows: one table per group, then the term's accuracy."""
    rows = study["rows"]
    lp, lb = study["loss_post"], study["loss_base"]
    out = [f"Held-out text: {study['tokens']} tokens ({study['predicted']} predicted positions, windows of "
           f"{study['seq_len']}), C = {study['steps']}. Base: loss {lb:.4f}, perplexity {math.exp(lb):.2f}; "
           f"fine-tune: loss {lp:.4f}, perplexity {math.exp(lp):.2f}.", ""]
    for group in groups:
        mine = [r for r in rows if r["group"] == group.name]
        if not mine:
            continue
        out += [f"**{group.title}**", "",
                "| edit | " + group.sweep.parameter + " | perplexity | measured change | term | first order "
                "| rel. error |", "|---|---|---|---|---|---|---|"]
        for r in mine:
            out.append(f"| {r['method']} | {r['value']} | {math.exp(r['loss_edit']):.2f} | {r['delta_loss']:+.5f} "
                       f"| {r['term']:+.5f} | {r['first_order']:+.5f} | {_pct(relative_error(r))} |")
        out.append("")
    corr = correlation(rows)
    out += [f"**The term against the measured change, all {corr['n']} distinct edits**: "
            f"Pearson r = {corr['pearson']:.4f}, Spearman rho = {corr['spearman']:.4f}.", ""]
    small = small_rows(rows)
    inside = sum(relative_error(r) <= 0.10 for r in small)
    out += [f"**Edits with a small measured change (0 < |change| < {SMALL_CHANGE})**: the term is within 10% of the "
            f"measured change for {inside} of {len(small)}.", "",
            "| edit | setting | measured change | term | rel. error | within 10% |", "|---|---|---|---|---|---|"]
    for r in sorted(small, key=lambda r: abs(r["delta_loss"])):
        err = relative_error(r)
        out.append(f"| {r['method']} | {r['parameter']}={r['value']} | {r['delta_loss']:+.5f} | {r['term']:+.5f} "
                   f"| {_pct(err)} | {'yes' if err <= 0.10 else 'no'} |")
    return "\n".join(out) + "\n"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def plot_scatter(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=120)
    for i, group in enumerate(dict.fromkeys(r["group"] for r in rows)):
        mine = [r for r in rows if r["group"] == group]
        ax.scatter([r["delta_loss"] for r in mine], [r["term"] for r in mine], s=18, color=f"C{i}", label=group)
    values = [v for r in rows for v in (r["term"], r["delta_loss"])]
    lo, hi = min(values + [0.0]), max(values + [0.0])
    ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8, label="term = measured")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    corr = correlation(rows)
    ax.set_xlabel("measured loss change L(W_EDIT) - L(W_POST)")
    ax.set_ylabel(f"Riemann-sum term (C = {rows[0]['steps']})" if rows else "term")
    ax.set_title(f"term vs measured, {corr['n']} edits: r = {corr['pearson']:.3f}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(study: dict[str, Any], groups: list[Group], out: str, doc: str | None = None) -> list[str]:
    os.makedirs(out, exist_ok=True)
    rows = study["rows"]
    paths = [os.path.join(out, "results.json"), os.path.join(out, "results.csv"), os.path.join(out, "tables.md")]
    with open(paths[0], "w") as f:
        json.dump({**study, "correlation": correlation(rows)}, f, indent=1, default=str)
    write_csv(rows, paths[1])
    text = tables(study, groups)
    with open(paths[2], "w") as f:
        f.write(text)
    for group in groups:
        mine = [r for r in rows if r["group"] == group.name]
        if len(mine) > len(group.methods):  # a single point per series draws no line
            paths.append(os.path.join(out, f"{group.name}.png"))
            plot_sweep(mine, paths[-1], group.title)
    if rows:
        paths.append(os.path.join(out, "scatter.png"))
        plot_scatter(rows, paths[-1])
    if doc:
        fill_doc(doc, "study", text)
    return paths


def _thin(sweep: Sweep) -> Sweep:
    v = sweep.values
    return replace(sweep, values=tuple(dict.fromkeys((v[0], v[len(v) // 2], v[-1]))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--out", default=None, help="results folder (default docs/quality; --tiny: CACHE/results)")
    parser.add_argument("--rows", default=",".join(g.name for g in GROUPS),
                        help="groups to run, comma-separated: " + ",".join(g.name for g in GROUPS))
    parser.add_argument("--max-tokens", type=int, default=None, help="held-out tokens (default 1024; --tiny 256)")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default 256; --tiny 32)")
    parser.add_argument("--steps", type=int, default=5, help="C, the Riemann sum's steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--doc", default=None, help="markdown file whose study:begin/end block gets the tables")
    parser.add_argument("--rewrite", action="store_true",
                        help="only rewrite tables, plots and --doc from OUT/results.json (no model is run)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model and generated text (seconds)")
    args = parser.parse_args(argv)
    wanted = args.rows.split(",")
    unknown = sorted(set(wanted) - {g.name for g in GROUPS})
    if unknown:
        parser.error(f"--rows: unknown group(s) {', '.join(unknown)}")
    groups = [g for g in GROUPS if g.name in wanted]
    if args.tiny:  # every group and method, three points of each sweep; tiny matrices want one thread
        import torch

        torch.set_num_threads(1)
        groups = [replace(g, sweep=_thin(g.sweep)) for g in groups]
    out = args.out or (os.path.join(args.cache, "results") if args.tiny else os.path.join(ROOT, "docs", "quality"))
    if args.rewrite:
        with open(os.path.join(out, "results.json")) as f:
            study = json.load(f)
        study.pop("correlation", None)
        for path in write_outputs(study, [g for g in GROUPS if g.name in wanted], out, args.doc):
            print(f"wrote {path}")
        return 0
    started = time.perf_counter()
    prepared = prepare(args.cache, args.tiny)
    max_tokens = args.max_tokens or (256 if args.tiny else 1024)
    seq_len = args.seq_len or (32 if args.tiny else 256)
    print(f"study: {prepared.fine_tune} against {prepared.base}, {max_tokens} held-out tokens of "
          f"{os.path.basename(prepared.eval_text)}, C = {args.steps}")
    study = run_study(prepared, groups, max_tokens=max_tokens, seq_len=seq_len, steps=args.steps,
                      batch_size=args.batch_size)
    study["total_s"] = time.perf_counter() - started
    for path in write_outputs(study, groups, out, args.doc):
        print(f"wrote {path}")
    corr = correlation(study["rows"])
    print(f"{len(study['rows'])} rows in {study['study_s']:.0f} s (gradient {study['gradient_s']:.0f} s); "
          f"term vs measured: r = {corr['pearson']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
