"""``deltastream serve``: its options, and the server it starts."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import DeltastreamError, DeltastreamWarning, ParameterError, escape

__all__ = ["add_parser", "run"]

EXTRA = "deltastream serve needs the 'serve' extra: pip install 'deltastream[serve]'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: the batching defaults (here, not in server.py, so that building the parser imports no fastapi)
DEFAULT_MAX_BATCH = 8
DEFAULT_WINDOW_MS = 10.0
DEFAULT_MAX_QUEUE = 64


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base and its compressed fine-tunes over an OpenAI-compatible HTTP API")
    p.add_argument("base", help="base checkpoint folder (a transformers causal LM with its tokenizer)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARTIFACT",
                   help="serve this artifact of BASE (or a PEFT LoRA adapter folder over BASE) as model NAME, "
                        "repeatable")
    p.add_argument("--base-name", default=None, metavar="NAME",
                   help="the model name of the base itself (default: BASE's folder name)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="the base's dtype on the device (default: auto, the checkpoint's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the model runs (default: auto, cuda when torch sees one)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to bind (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000, metavar="N", help="TCP port (default: 8000)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request, and allow adding and removing "
                        "variants while serving (POST /v1/variants, DELETE /v1/variants/NAME); default: the "
                        "DELTASTREAM_API_KEY environment variable, which keeps the key out of the process list")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"most rows (prompts x n) in one mixed batch (default: {DEFAULT_MAX_BATCH}); larger "
                        "batches raise throughput until the device is compute-bound")
    g.add_argument("--batch-window-ms", type=float, default=DEFAULT_WINDOW_MS, metavar="MS",
                   help=f"how long the first request of a batch waits for others to join it (default: "
                        f"{DEFAULT_WINDOW_MS:g}); adds up to MS to a lone request's latency, 0 batches only "
                        "what is already waiting")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                   help=f"requests that may wait for a batch; beyond them the server answers 503 (default: "
                        f"{DEFAULT_MAX_QUEUE})")
    p.add_argument("--quiet", "-q", action="store_true", help="log only warnings and errors, not every request")


def parse_variants(specs: list[str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, eq, artifact = spec.partition("=")
        if not eq or not name or not artifact:
            raise ParameterError(f"--variant takes NAME=ARTIFACT, not '{escape(spec)}'")
        if name in (n for n, _ in out):
            raise ParameterError(f"--variant: the name '{escape(name)}' is given twice")
        out.append((name, artifact))
    return out


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise ParameterError(f"--port must be from 1 to 65535, not {args.port}")
    if not 1 <= args.max_batch <= 1024:
        raise ParameterError(f"--max-batch must be from 1 to 1024, not {args.max_batch}")
    if not 0 <= args.batch_window_ms <= 10_000:
        raise ParameterError(f"--batch-window-ms must be from 0 to 10000, not {args.batch_window_ms:g}")
    if not 1 <= args.max_queue <= 1_000_000:
        raise ParameterError(f"--max-queue must be from 1 to 1000000, not {args.max_queue}")
    if args.api_key is not None and not args.api_key.strip():
        raise ParameterError("--api-key is empty")


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import transformers  # noqa: F401
        import uvicorn
    except ImportError:
        raise DeltastreamError(EXTRA) from None
    from . import VariantBank
    from .server import create_app, served_name

    variants = parse_variants(args.variant)
    _check(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("DELTASTREAM_API_KEY") or None
    base_name = args.base_name or served_name(args.base)
    if base_name in (n for n, _ in variants):
        raise ParameterError(f"--variant: '{escape(base_name)}' is the base's name (change it with --base-name)")
    if args.host not in LOOPBACK and api_key is None:
        warnings.warn(f"serving on {args.host} without --api-key: anyone who reaches the port can use it",
                      DeltastreamWarning, stacklevel=2)
    dtype = None if args.dtype == "auto" else args.dtype
    bank = VariantBank.from_pretrained(args.base, device=args.device, dtype=dtype)
    for name, artifact in variants:
        bank.add(name, artifact)
    app = create_app(bank, base_name=base_name, api_key=api_key, max_batch=args.max_batch,
                     batch_window_ms=args.batch_window_ms, max_queue=args.max_queue)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {base_name} and {len(variants)} variant(s) on {bank.device} at http://{shown}:{args.port}/v1",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning" if args.quiet else "info"))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the SIGINT: the normal way to stop
        print("deltastream serve: stopped", file=sys.stderr)
        return 0
    return 0 if server.started else 2
