"""``deltastream analyze``: its options and what it prints and writes."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import ParameterError
from ..params import parse_assignments
from .model import DTYPES

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="predict (Riemann-sum term) and measure the loss change an edit causes")
    p.add_argument("base", help="base checkpoint folder (its tokenizer tokenizes the data)")
    p.add_argument("fine_tune", help="fine-tuned checkpoint folder (W_POST; its config.json builds the model)")
    p.add_argument("--data", required=True, metavar="TEXT_FILE", help="UTF-8 text the loss is measured on")
    g = p.add_argument_group("the edit")
    g.add_argument("--method", action="append", default=[], metavar="NAME[:K=V,...]",
                   help="edit with this method (edit's own code), repeatable; parameters after ':' are this "
                        "method's alone")
    g.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of every --method, repeatable")
    g.add_argument("--seed", default="0", metavar="N", help="seed of random edits (default: 0)")
    g.add_argument("--edited", default=None, metavar="DIR",
                   help="analyse this edited or merged checkpoint of the fine-tune's architecture instead")
    g.add_argument("--include", action="append", default=[], metavar="GLOB", help="also edit these tensors")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="keep these tensors exact")
    g = p.add_argument_group("the loss")
    g.add_argument("--steps", type=int, default=5, metavar="C", help="Riemann-sum steps C (default: 5, the paper's)")
    g.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="tokens of the data used (default: 4096)")
    g.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per window (default: 256)")
    g.add_argument("--batch-size", type=int, default=4, metavar="N",
                   help="windows per forward pass: speed and memory only (default: 4)")
    g.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="the model's dtype; bfloat16 halves its memory and is approximate (default: float32)")
    g.add_argument("--recompute", default=True, action=argparse.BooleanOptionalAction,
                   help="hold one block's activations and a slice of the logits for backward, recomputing the "
                        "rest: about a third slower, a fraction of the memory (default: on)")
    g.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="where the model runs")
    g = p.add_argument_group("sweeps and outputs")
    g.add_argument("--sweep", default=None, metavar="NAME=VALUES",
                   help="analyse every value of one method parameter, e.g. p=0.1,0.5,0.9 or alpha=-1:1:0.1")
    g.add_argument("--tolerance", type=float, default=0.01, metavar="T",
                   help="a sweep names the most aggressive setting with |term| <= T (default: 0.01)")
    g.add_argument("--json", default=None, metavar="FILE", help="write every figure as JSON")
    g.add_argument("--csv", default=None, metavar="FILE", help="write the sweep's table as CSV")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot term and measured change per value")
    g.add_argument("--save-gradient", default=None, metavar="DIR",
                   help="also write grad L(W_POST) as a checkpoint (for edit --method biased -p by=grad)")
    g.add_argument("--work-dir", default=None, metavar="DIR", help="scratch folder for edits (default: the temp dir)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _methods(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    shared = parse_assignments(args.param)
    out = []
    for spec in args.method:
        name, _, own = spec.partition(":")
        out.append((name, {**shared, **parse_assignments([x for x in own.split(",") if x])}))
    return out


def _check(args: argparse.Namespace, methods: list) -> None:
    if args.edited and methods:
        raise ParameterError("analyze: give --method or --edited, not both")
    if not (args.edited or methods or args.save_gradient):
        raise ParameterError("analyze: nothing to analyse: give --method NAME or --edited DIR")
    if args.sweep and not methods:
        raise ParameterError("analyze: --sweep varies a parameter of --method")
    if (args.csv or args.plot) and not args.sweep:
        raise ParameterError("analyze: --csv and --plot draw a sweep: give --sweep NAME=VALUES")


def _write_json(path: str, doc: Any) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=True)
        f.write("\n")
    os.replace(partial, path)


def run(args: argparse.Namespace) -> int:
    from ..params import parse_seed
    from .analyzer import Analyzer
    from .report import format_analysis, format_best, format_row
    from .sweep import most_aggressive, parse_sweep, plot_sweep, run_sweep, write_csv

    methods = _methods(args)
    _check(args, methods)
    seed = parse_seed(args.seed, "--seed")
    sweep = parse_sweep(args.sweep) if args.sweep else None
    rules: dict[str, Any] = {"include": tuple(args.include), "exclude": tuple(args.exclude)}
    with Analyzer(args.base, args.fine_tune, args.data, steps=args.steps, max_tokens=args.max_tokens,
                  seq_len=args.seq_len, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
                  progress=not args.quiet, work_dir=args.work_dir, recompute=args.recompute) as analyzer:
        if args.save_gradient:
            print(f"wrote the gradient at the fine-tune to {analyzer.save_gradient(args.save_gradient)}")
        if sweep is not None or len(methods) > 1:
            analyzer.gradient()  # one c = 0 pass serves every row's first-order term
        doc: Any = None
        if sweep is not None:
            rows = run_sweep(analyzer, methods, sweep, seed=seed, on_row=lambda r: print(format_row(r), flush=True),
                             **rules)
            best = most_aggressive(rows, args.tolerance)
            print(format_best(best, args.tolerance))
            doc = {"sweep": {"parameter": sweep.parameter, "values": list(sweep.values)},
                   "tolerance": args.tolerance, "rows": rows,
                   "most_aggressive": {m: (r["value"] if r else None) for m, r in best.items()}}
            if args.csv:
                write_csv(rows, args.csv)
            if args.plot:
                plot_sweep(rows, args.plot, title=f"term and measured loss change vs {sweep.parameter}")
        elif methods or args.edited:
            results = [analyzer.run(edited=args.edited).as_dict()] if args.edited else \
                [analyzer.run(name, params, seed=seed, **rules).as_dict() for name, params in methods]
            print("\n\n".join(format_analysis(r) for r in results))
            doc = results[0] if len(results) == 1 else {"analyses": results}
        if args.json and doc is not None:
            _write_json(args.json, doc)
    return 0
