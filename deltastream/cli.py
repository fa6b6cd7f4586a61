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
import warnings

from . import api
from ._version import __version__
from .config import load_job_config
from .engine.graph import local_cluster
from .errors import DeltastreamError, DeltastreamWarning, Interrupted, ParameterError, escape
from .jobs.info import format_info, format_verified
from .methods import METHODS, backends, get_method
from .params import MAX_PROCESSES, MAX_WORKERS, parse_assignments, parse_local_cluster, parse_seed, parse_workers
from .units import format_size

__all__ = ["main", "build_parser"]


def _add_run_options(p: argparse.ArgumentParser, resume: bool = True) -> None:
    g = p.add_argument_group("execution")
    g.add_argument("--workers", default=None, metavar="N",
                   help=f"worker threads, 1 to {MAX_WORKERS} (default: the number of CPU cores)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="run on a dask.distributed scheduler (e.g. tcp://host:8786) instead of local threads")
    g.add_argument("--cluster", default=None, metavar="local:N",
                   help=f"start a dask.distributed LocalCluster of N worker processes (1 to {MAX_PROCESSES}) "
                        "for this command")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    if resume:
        g.add_argument("--resume", action="store_true",
                       help="continue a killed run of the same job from its finished chunks (OUT.partial); "
                            "an interrupted --resume run keeps its partial output for the next")


def _add_device_option(p: argparse.ArgumentParser, verb: str, role: str) -> None:
    on_gpu = sorted({i.method.method_id for i in backends.implementations("torch") if i.role == role})
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help=f"where chunks are {verb}: cuda (the GPU, the CPU's bits; {', '.join(on_gpu)} have a GPU "
                        "path, for the parameters docs/methods.md lists; other chunks run on the CPU), auto (cuda "
                        "when torch sees one), cpu (default)")


def _add_method_options(p: argparse.ArgumentParser, default: str | None) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", default=None, metavar="NAME",
                   help=f"one of: {', '.join(sorted(METHODS))}" + (f" (default: {default})" if default else ""))
    g.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable (see 'deltastream methods')")
    g.add_argument("--seed", default=None, metavar="N",
                   help="seed of random edits, 0 to 2^64-1 (default: 0), recorded")
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
    _add_device_option(p, "encoded", "encode")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_run_options(p)

    p = sub.add_parser("edit", help="write base + an edited delta as a checkpoint (DARE, BitDelta, trim...)")
    p.add_argument("base", help="base checkpoint")
    p.add_argument("fine_tune", help="fine-tuned checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    _add_method_options(p, default=None)
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest output shard, Hugging Face style (default: 5GB)")
    _add_device_option(p, "edited", "edit")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    _add_run_options(p)

    p = sub.add_parser("merge", help="merge fine-tunes from a mergekit-style YAML config")
    p.add_argument("config", help="the merge config (mergekit's format: merge_method, base_model, models, ...)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="checkpoint folder to write")
    p.add_argument("--seed", default="0", metavar="N",
                   help="seed of random sparsification (DARE, DELLA), 0 to 2^64-1 (default: 0), recorded")
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
    _add_device_option(p, "decoded", "decode")
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

    from .analysis.command import add_parser as add_analyze

    add_analyze(sub)

    from .lora.command import add_parser as add_extract_lora

    add_extract_lora(sub)

    from .serve.command import add_parser as add_serve

    add_serve(sub)

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


def _parse_numbers(args: argparse.Namespace) -> None:
    """The numeric options, from their strings, checked before anything starts (a cluster included)."""
    if getattr(args, "workers", None) is not None:
        args.workers = parse_workers(args.workers, "--workers")
    if getattr(args, "seed", None) is not None:
        args.seed = parse_seed(args.seed, "--seed")
    if getattr(args, "cluster", None) is not None:
        args.cluster = parse_local_cluster(args.cluster, "--cluster")
    if (getattr(args, "scheduler", None) or "").startswith("local:"):
        parse_local_cluster(args.scheduler, "--scheduler")


def _run_kwargs(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "scheduler": args.scheduler, "progress": None if not args.quiet else False,
            "client": getattr(args, "client", None)}


@contextlib.contextmanager
def _cluster(args: argparse.Namespace):
    """--cluster local:N (N parsed already): one LocalCluster for the whole command (every pass runs on it)."""
    n = getattr(args, "cluster", None)
    if n is None:
        yield
        return
    from distributed import Client

    with local_cluster(n) as cluster, Client(cluster, set_as_default=False) as client:
        args.client = client
        yield


def _given(option, from_config, default=None):
    """The command line's value if given (even an empty or zero one, which is then refused), else the config's."""
    return option if option is not None else from_config if from_config is not None else default


def _job_options(args: argparse.Namespace) -> dict:
    """Method, parameters, policy and sizes from --config, then the command line on top."""
    doc = load_job_config(args.config, args.method) if args.config else {}
    method = args.method or doc.get("method") or args.default_method
    if method is None:
        raise ParameterError("no method: pass --method NAME (see 'deltastream methods') or a --config with one")
    params = {**doc.get("params", {}), **parse_assignments(args.param)}
    return {
        "method": get_method(method, **params),
        "seed": _given(args.seed, doc.get("seed"), 0),
        "include": tuple(_given(args.include, doc.get("include"), ())),
        "exclude": tuple(_given(args.exclude, doc.get("exclude"), ())),
        "chunk_size": _given(args.chunk_size, doc.get("chunk_size")),
        "memory": _given(args.memory, doc.get("memory")),
        **_run_kwargs(args), "workers": _given(args.workers, doc.get("workers")),
        **({"max_shard_size": _given(args.max_shard_size, doc.get("max_shard_size"), "5GB")}
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
        # ASCII: a name's C1 controls and bidi marks reach the terminal as \u escapes, still exact JSON
        print(json.dumps(summary, indent=2, ensure_ascii=True) if args.json else format_info(summary))
    elif args.command == "verify":
        api.verify(args.artifact, args.base, **_run_kwargs(args))
        print(format_verified(api.info(args.artifact), args.artifact, args.base))
    elif args.command == "analyze":
        from .analysis.command import run as run_analyze

        return run_analyze(args)
    elif args.command == "extract-lora":
        from .lora.command import run as run_extract_lora

        return run_extract_lora(args)
    elif args.command == "serve":
        from .serve.command import run as run_serve

        return run_serve(args)
    elif args.command == "demo":
        from .demo import run_demo

        print(run_demo(workdir=args.workdir, progress=None if not args.quiet else False))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A deltastream warning as one line, as errors are; any other as Python shows it."""
    if issubclass(category, DeltastreamWarning):
        print(f"deltastream: warning: {escape(message)}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a tensor name an ASCII terminal cannot show is escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the filters and showwarning when the command ends
        warnings.simplefilter("always", DeltastreamWarning)
        warnings.showwarning = _show_warning
        return _run_command(args)


def _run_command(args: argparse.Namespace) -> int:
    try:
        _parse_numbers(args)
        with _cluster(args):
            return _command(args)
    except DeltastreamError as exc:
        print(f"deltastream: error: {escape(exc)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `deltastream info --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # outside a job's output (planning, verify): nothing partial to remove or keep
        print(f"deltastream: error: {Interrupted('interrupted by SIGINT')}", file=sys.stderr)
        return Interrupted.exit_code
    except OSError as exc:  # a full disk, a permission problem, a vanished file
        where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
        print(f"deltastream: error: {escape(f'file{where}: {exc.strerror or exc}')}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
