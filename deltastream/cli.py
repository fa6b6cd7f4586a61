"""The ``deltastream`` command line. Every subcommand maps to one function of the Python API.

Errors a user can cause print one line, ``deltastream: error: ...``, and exit with status 2
(130 when interrupted); they never show a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from . import api
from ._version import __version__
from .errors import DeltastreamError, Interrupted, escape
from .config import load_job_config
from .engine.graph import local_cluster
from .errors import ParameterError
from .jobs.info import format_info
from .methods import METHODS, get_method
from .params import parse_assignments
from .units import format_size

__all__ = ["main", "build_parser"]


def _add_run_options(p: argparse.ArgumentParser, resume: bool = True) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker threads (default: the number of CPU cores)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a dask.distributed scheduler (e.g. tcp://host:8786) instead of local threads")
    g.add_argument("--cluster", default=None, metavar="local:N",
                   help="start a dask.distributed LocalCluster of N worker processes for this command")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    if resume:
        g.add_argument("--resume", action="store_true",
                       help="continue a killed run of the same job from its finished chunks (OUT.partial); "
                            "an interrupted --resume run keeps its partial output for the next")


def _add_device_option(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help=f"where dare and 1-bit bitdelta chunks are {verb}: cuda (the GPU, the CPU's bits), "
                        "auto (cuda when torch sees one), cpu (default)")


def _add_method_options(p: argparse.ArgumentParser, default: str | None) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default=None, metavar="NAME",
                   help=f"one of: {', '.join(sorted(METHODS))}" + (f" (default: {default})" if default else ""))
    g.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable (see 'deltastream methods')")
    g.add_argument("--seed", type=int, default=None, help="seed of random edits (default: 0), recorded")
    g.add_argument("--include", action="append", default=None, metavar="GLOB",
                   help="also edit tensors matching this name pattern (repeatable)")
    g.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                   help="keep tensors matching this pattern exact (repeatable; wins over --include)")
    g.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="method, params, seed, include, exclude... from YAML; options given here win")
    g.add_argument("--chunk-size", default=None, metavar="SIZE",
                   help="bytes of each tensor per task, e.g. 32MiB (default: 32MiB, shrunk to fit --memory)")
    g.add_argument("--memory", default=None, metavar="SIZE", help="memory budget for chunks in flight (default: 1GiB)")
    p.set_defaults(default_method=default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltastream",
        description="Streaming compression, editing and merging of fine-tune deltas (safetensors).",
    )
    parser.add_argument("--version", action="version", version=f"deltastream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="store a fine-tune as a compressed delta against its base")
    p.add_argument("base", help="base checkpoint: folder, model.safetensors.index.json or .safetensors file")
    p.add_argument("fine_tune", nargs="*", help="fine-tuned checkpoint(s), same forms as BASE; with several, "
                   "OUT is a folder of one artifact each, made in one pass over the base")
    p.add_argument("-o", "--output", required=True, metavar="OUT.dsz", help="artifact (or folder) to write")
    _add_method_options(p, default="lossless")
    _add_device_option(p, "encoded")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_run_options(p)

    p = sub.add_parser("edit", help="write base + an edited delta as a checkpoint (DARE, BitDelta, trim...)")
    p.add_argument("base", help="base checkpoint")
    p.add_argument("fine_tune", help="fine-tuned checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    _add_method_options(p, default=None)
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest output shard, Hugging Face style (default: 5GB)")
    _add_device_option(p, "edited (biased and extrapolate chunks too)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _add_run_options(p)

    p = sub.add_parser("merge", help="merge fine-tunes from a mergekit-style YAML config")
    p.add_argument("config", help="the merge config (mergekit's format: merge_method, base_model, models, ...)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of random sparsification (DARE, DELLA), recorded")
    p.add_argument("--strict", action="store_true",
                   help="refuse a vocabulary larger than the base's instead of cropping it (with a warning)")
    p.add_argument("--chunk-size", default=None, metavar="SIZE", help="bytes of each tensor per task (default 32MiB)")
    p.add_argument("--memory", default=None, metavar="SIZE", help="memory budget for chunks in flight (default 1GiB)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest output shard (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _add_run_options(p)

    p = sub.add_parser("methods", help="list every method with its parameters")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("apply", help="rebuild the fine-tune from base + artifact")
    p.add_argument("base", help="the base checkpoint the artifact was made against")
    p.add_argument("artifact", help="the .dsz artifact")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard, Hugging Face style (default: 5GB)")
    _add_device_option(p, "decoded")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _add_run_options(p)

    p = sub.add_parser("info", help="show an artifact's manifest, sizes and ratios")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("verify", help="check an artifact's integrity, and that BASE is its base")
    p.add_argument("artifact")
    p.add_argument("base", nargs="?", default=None,
                   help="also check this is the right base and that the rebuild is exact")
    _add_run_options(p, resume=False)

    p = sub.add_parser("demo", help="make a small model pair, compress and rebuild it, print a table")
    p.add_argument("--workdir", default=None, help="keep the demo's files here (default: a temp folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return parser


def format_methods(described: list[dict]) -> str:
    """The table ``deltastream methods`` prints."""
    lines = []
    for m in described:
        form = "compress, edit" if m["compact"] else "edit only"
        lines += [f"{m['id']}  ({form})", f"    {m['summary']}"]
        for p in m["params"]:
            choices = f" {{{'|'.join(map(str, p['choices']))}}}" if p["choices"] else ""
            lines.append(f"    {p['name']:<10} {p['type']:<6} default {p['default']!s:<9}{choices}  {p['help']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _run_kwargs(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "scheduler": args.scheduler, "progress": None if not args.quiet else False,
            "client": getattr(args, "client", None)}


@contextlib.contextmanager
def _cluster(args: argparse.Namespace):
    """--cluster local:N: one LocalCluster for the whole command (every pass runs on it)."""
    spec = getattr(args, "cluster", None)
    if not spec:
        yield
        return
    kind, _, n = spec.partition(":")
    if kind != "local" or not n.isdigit() or int(n) < 1:
        raise ParameterError(f"--cluster expects local:N (N worker processes), not {spec!r}")
    from distributed import Client

    with local_cluster(int(n)) as cluster, Client(cluster, set_as_default=False) as client:
        args.client = client
        yield


def _job_options(args: argparse.Namespace) -> dict:
    """Method, parameters, policy and sizes from --config, then the command line on top."""
    doc = load_job_config(args.config) if args.config else {}
    method = args.method or doc.get("method") or args.default_method
    if method is None:
        raise ParameterError("no method: pass --method NAME (see 'deltastream methods') or a --config with one")
    params = {**doc.get("params", {}), **parse_assignments(args.param)}
    workers = args.workers if args.workers is not None else doc.get("workers")
    return {
        "method": get_method(method, **params),
        "seed": args.seed if args.seed is not None else int(doc.get("seed", 0)),
        "include": tuple(args.include if args.include is not None else doc.get("include", ())),
        "exclude": tuple(args.exclude if args.exclude is not None else doc.get("exclude", ())),
        "chunk_size": args.chunk_size or doc.get("chunk_size"),
        "memory": args.memory or doc.get("memory"),
        "workers": workers, "scheduler": args.scheduler, "progress": None if not args.quiet else False,
        "client": getattr(args, "client", None),
        **({"max_shard_size": args.max_shard_size or doc.get("max_shard_size") or "5GB"}
           if hasattr(args, "max_shard_size") else {}),
        **({"fine_tunes": doc.get("fine_tunes")} if args.command == "compress" else {}),
    }


def _command(args: argparse.Namespace) -> int:
    if args.command == "compress":
        start = time.perf_counter()
        options = _job_options(args)
        fine_tunes = list(args.fine_tune) or list(options.pop("fine_tunes", None) or [])
        options.pop("fine_tunes", None)
        if not fine_tunes:
            raise ParameterError("no fine-tune to compress: give FT paths or 'fine_tunes:' in --config")
        target = fine_tunes[0] if len(fine_tunes) == 1 else fine_tunes
        outs = api.compress(args.base, target, args.output, options.pop("method"), overwrite=args.overwrite,
                            resume=args.resume, device=args.device, **options)
        for out in [outs] if isinstance(outs, str) else outs:
            summary = api.info(out)
            print(f"wrote {out}: {format_size(summary['stored_bytes'])} for a "
                  f"{format_size(summary['fine_tune_bytes'])} fine-tune ({summary['ratio']:.2f}x)")
        print(f"done in {time.perf_counter() - start:.1f}s")
    elif args.command == "edit":
        start = time.perf_counter()
        options = _job_options(args)
        method = options.pop("method")
        out = api.edit(args.base, args.fine_tune, args.output, method, overwrite=args.overwrite,
                       resume=args.resume, device=args.device, **options)
        print(f"wrote {out} ({method.method_id}) in {time.perf_counter() - start:.1f}s")
    elif args.command == "merge":
        start = time.perf_counter()
        out = api.merge(args.config, args.output, seed=args.seed, strict=args.strict, chunk_size=args.chunk_size,
                        memory=args.memory, max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                        resume=args.resume, **_run_kwargs(args))
        print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    elif args.command == "methods":
        described = [cls.describe() for _, cls in sorted(METHODS.items())]
        print(json.dumps(described, indent=2, default=str) if args.json else format_methods(described))
    elif args.command == "apply":
        start = time.perf_counter()
        out = api.apply(args.base, args.artifact, args.output, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite, resume=args.resume, device=args.device, **_run_kwargs(args))
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
        with _cluster(args):
            return _command(args)
    except DeltastreamError as exc:
        print(f"deltastream: error: {escape(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `deltastream info --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"deltastream: error: {Interrupted('interrupted; partial output removed')}", file=sys.stderr)
        return Interrupted.exit_code
    except OSError as exc:  # a full disk, a permission problem, a vanished file
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"deltastream: error: {escape(f'file{where}: {exc.strerror or exc}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
