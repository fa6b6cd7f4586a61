"""``deltastream extract-lora``: its options and what it prints and writes."""

from __future__ import annotations

import argparse
import json
import os
import time

from ..errors import ParameterError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from .extract import FACTOR_DTYPES

    p = sub.add_parser("extract-lora", help="write a full fine-tune's delta as a PEFT LoRA adapter (streamed SVD)")
    p.add_argument("base", help="base checkpoint")
    p.add_argument("fine_tune", help="fine-tuned checkpoint (or a LoRA adapter folder, re-extracted)")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR", help="adapter folder to write")
    g = p.add_argument_group("rank")
    g.add_argument("--rank", "-r", type=int, default=None, metavar="R",
                   help="rank of every matrix (at most its smaller side)")
    g.add_argument("--rank-fraction", type=float, default=None, metavar="F",
                   help="rank max(1, int(F x the matrix's smaller side)) per matrix")
    g.add_argument("--energy", type=float, default=None, metavar="E",
                   help="per matrix, the smallest rank keeping a fraction E of its delta energy, among the "
                        "singular values of a sketch at --rank or --rank-fraction (default 0.25)")
    g.add_argument("--oversample", type=int, default=8, metavar="N", help="extra sketch columns (default: 8)")
    g.add_argument("--power-iters", type=int, default=2, metavar="Q",
                   help="power iterations, two passes over the data each (default: 2)")
    g.add_argument("--seed", default="0", metavar="N", help="seed of the sketch (default: 0)")
    g = p.add_argument_group("adapter")
    g.add_argument("--modules-to-save", action="store_true",
                   help="also store the changed tensors LoRA cannot express (norms, embeddings, heads) whole")
    g.add_argument("--base-name", default=None, metavar="NAME",
                   help="base_model_name_or_path to record, e.g. a Hub id (default: BASE's absolute path)")
    g.add_argument("--dtype", default="float32", choices=sorted(FACTOR_DTYPES),
                   help="dtype of lora_A and lora_B (default: float32)")
    g.add_argument("--json", default=None, metavar="FILE", help="write the report (every tensor's energy) as JSON")
    g.add_argument("--verbose", "-v", action="store_true", help="print every matrix's rank and energy kept")
    g.add_argument("--chunk-size", default=None, metavar="SIZE", help="bytes of each tensor per task (default 32MiB)")
    g.add_argument("--memory", default=None, metavar="SIZE", help="memory budget for chunks in flight (default 1GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace ADAPTER_DIR if it exists")
    from ..cli import _add_run_options  # --workers, --scheduler, --cluster, --quiet as the other streamed commands

    _add_run_options(p, resume=False)


def run(args: argparse.Namespace) -> int:
    from ..api import extract_lora
    from .extract import format_report

    if args.json and os.path.isdir(args.json):
        raise ParameterError(f"--json '{args.json}' is a folder")
    start = time.perf_counter()
    report = extract_lora(args.base, args.fine_tune, args.output, rank=args.rank, rank_fraction=args.rank_fraction,
                          energy=args.energy, modules_to_save=args.modules_to_save, base_name=args.base_name,
                          dtype=args.dtype, oversample=args.oversample, power_iters=args.power_iters,
                          chunk_size=args.chunk_size, memory=args.memory, seed=args.seed, overwrite=args.overwrite,
                          workers=args.workers, scheduler=args.scheduler, progress=None if not args.quiet else False,
                          client=getattr(args, "client", None))
    print(format_report(report, args.verbose))
    if args.json:
        partial = f"{args.json}.partial-{os.getpid()}"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=True)
            f.write("\n")
        os.replace(partial, args.json)
    print(f"wrote {report['adapter']} in {time.perf_counter() - start:.1f}s")
    return 0
