"""The ``deltastream`` command line. Every subcommand maps to one function of the Python API.

Errors a user can cause print one line, ``deltastream: error: ...``, and exit with status 2
(130 when interrupted); they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import api
from ._version import __version__
from .errors import DeltastreamError, Interrupted
from .jobs.info import format_info
from .methods import METHODS
from .units import format_size

__all__ = ["main", "build_parser"]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker threads (default: the number of CPU cores)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a dask.distributed scheduler (e.g. tcp://host:8786) instead of local threads")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltastream",
        description="Streaming compression, editing and merging of fine-tune deltas (safetensors).",
    )
    parser.add_argument("--version", action="version", version=f"deltastream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="store a fine-tune as a compressed delta against its base")
    p.add_argument("base", help="base checkpoint: folder, model.safetensors.index.json or .safetensors file")
    p.add_argument("fine_tune", help="fine-tuned checkpoint, same forms as BASE")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dsz", help="artifact to write")
    p.add_argument("--method", default="lossless", choices=sorted(METHODS), help="encoding (default: lossless)")
    p.add_argument("--chunk-size", default=None, metavar="SIZE",
                   help="bytes of each tensor per task, e.g. 32MiB (default: 32MiB, shrunk to fit --memory)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory budget for chunks in flight (default: 1GiB)")
    p.add_argument("--seed", type=int, default=None, help="seed of random edits, recorded in the artifact")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_run_options(p)

    p = sub.add_parser("apply", help="rebuild the fine-tune from base + artifact")
    p.add_argument("base", help="the base checkpoint the artifact was made against")
    p.add_argument("artifact", help="the .dsz artifact")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, Hugging Face style (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _add_run_options(p)

    p = sub.add_parser("info", help="show an artifact's manifest, sizes and ratios")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("verify", help="check an artifact's integrity, and that BASE is its base")
    p.add_argument("artifact")
    p.add_argument("base", nargs="?", default=None,
                   help="also check this is the right base and that the rebuild is exact")
    _add_run_options(p)

    p = sub.add_parser("demo", help="make a small model pair, compress and rebuild it, print a table")
    p.add_argument("--workdir", default=None, help="keep the demo's files here (default: a temp folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def _run_kwargs(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "scheduler": args.scheduler, "progress": None if not args.quiet else False}


def _command(args: argparse.Namespace) -> int:
    if args.command == "compress":
        start = time.perf_counter()
        out = api.compress(args.base, args.fine_tune, args.output, args.method, chunk_size=args.chunk_size,
                           memory=args.memory, seed=args.seed, overwrite=args.overwrite, **_run_kwargs(args))
        summary = api.info(out)
        print(f"wrote {out}: {format_size(summary['stored_bytes'])} for a {format_size(summary['fine_tune_bytes'])}"
              f" fine-tune ({summary['ratio']:.2f}x) in {time.perf_counter() - start:.1f}s")
    elif args.command == "apply":
        start = time.perf_counter()
        out = api.apply(args.base, args.artifact, args.output, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, **_run_kwargs(args))
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    elif args.command == "info":
        summary = api.info(args.artifact)
        print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else format_info(summary))
    elif args.command == "verify":
        api.verify(args.artifact, args.base, **_run_kwargs(args))
        what = f"and base '{args.base}' match" if args.base else "is intact"
        print(f"ok: artifact '{args.artifact}' {what}")
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(workdir=args.workdir, progress=None if not args.quiet else False))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except DeltastreamError as exc:
        print(f"deltastream: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `deltastream info --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"deltastream: error: {Interrupted('interrupted; partial output removed')}", file=sys.stderr)
        return Interrupted.exit_code
    except OSError as exc:  # a full disk, a permission problem, a vanished file
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"deltastream: error: file{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
