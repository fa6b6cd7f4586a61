"""``deltastream demo``: the main job end to end on a small generated Llama pair, as a table.

It writes a 4-layer Llama-shaped bf16 base and fine-tune (synthetic.py), then for each method
compresses, rebuilds and compares the rebuild with the fine-tune, printing the stored size, the
ratio against the fine-tune, the largest absolute error and the time. A reference row gives
plain zstd of the fine-tune's files, the figure a delta encoding has to beat.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
from numcodecs import Zstd

from . import api
from .checkpoint import open_checkpoint, read_bits
from .dtypes import to_float32
from .methods import METHODS, get_method
from .synthetic import SHAPES, write_pair
from .units import format_size

__all__ = ["run_demo"]


def _max_abs_error(reference: str, rebuilt: str) -> float:
    ref, out = open_checkpoint(reference), open_checkpoint(rebuilt)
    worst = 0.0
    for name, info in ref.tensors.items():
        a = to_float32(read_bits(info, 0, info.numel), info.dtype)
        b = to_float32(read_bits(out.tensors[name], 0, info.numel), info.dtype)
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
    return worst


def _zstd_size(folder: str, level: int = 3, block: int = 32 << 20) -> int:
    codec, total = Zstd(level=level), 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as f:
                while data := f.read(block):
                    total += len(codec.encode(data))
    return total


#: the compact methods, with the parameters the demo shows (those not registered are skipped)
DEMO_RUNS: list[tuple[str, dict[str, Any]]] = [
    ("lossless", {}),
    ("dare", {"p": 0.9}),
    ("bitdelta", {}),
    ("multibit", {"bits": 2}),
    ("bitdelta", {"residual": 1}),
    ("dare_bitdelta", {"p": 0.9}),
    ("ternary", {}),
    ("lowrank", {"rank_fraction": 0.1}),
]
#: methods with no compact form: the demo shows their edit's error and time
DEMO_EDITS: list[tuple[str, dict[str, Any]]] = [
    ("trim", {"density": 0.2}),
    ("extrapolate", {"alpha": 0.3}),
    ("biased", {"p": 0.5, "k": 0.5}),
]


def _edited_ratio(summary: dict) -> float | None:
    """Ratio over the tensors the method edited (the linear weights), metadata included."""
    edited = [t for t in summary["tensors"] if t["policy"] not in ("lossless", "new", "grown")]
    stored = sum(t["stored_bytes"] for t in edited)
    return sum(t["bytes"] for t in edited) / stored if stored else None


def run_demo(workdir: str | None = None, progress: bool | None = None) -> str:
    """Run the demo and return its table as text."""
    with tempfile.TemporaryDirectory(prefix="deltastream-demo-") as tmp:
        folder = workdir or tmp
        os.makedirs(folder, exist_ok=True)
        shape = SHAPES["demo"]
        start = time.perf_counter()
        base, ft = write_pair(folder, shape, seed=0)
        made = time.perf_counter() - start
        ft_bytes = open_checkpoint(ft).nbytes
        #: label, stored bytes, ratio over the edited tensors, max error, seconds (None: not measured)
        rows: list[tuple[str, int | None, float | None, float | None, float | None]] = [
            ("zstd -3 of the fine-tune (reference)", _zstd_size(ft), None, None, None)]
        for i, (name, params) in enumerate(DEMO_RUNS):
            if name not in METHODS:
                continue
            method = get_method(name, **params)
            label = name + (f" ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")
            start = time.perf_counter()
            art = api.compress(base, ft, os.path.join(folder, f"run{i}.dsz"), method, overwrite=True,
                               progress=progress)
            out = api.apply(base, art, os.path.join(folder, f"run{i}-rebuilt"), overwrite=True, progress=progress)
            elapsed = time.perf_counter() - start
            summary = api.info(art)
            rows.append((label, summary["stored_bytes"], _edited_ratio(summary), _max_abs_error(ft, out), elapsed))
        for i, (name, params) in enumerate(DEMO_EDITS):
            if name not in METHODS:
                continue
            label = f"{name} ({', '.join(f'{k}={v}' for k, v in params.items())}), edit only"
            start = time.perf_counter()
            out = api.edit(base, ft, os.path.join(folder, f"edit{i}"), get_method(name, **params), overwrite=True,
                           progress=progress)
            rows.append((label, None, None, _max_abs_error(ft, out), time.perf_counter() - start))
        lines = [
            f"deltastream demo: a Llama-shaped bf16 pair, {shape.n_params / 1e6:.1f}M parameters "
            f"({format_size(ft_bytes)} per checkpoint), made in {made:.1f}s" + (f" in {folder}" if workdir else ""),
            "",
            f"{'method':<38} {'stored':>10} {'ratio':>8} {'linear':>8} {'max error':>10} {'time':>7}",
        ]
        for label, stored, edited, err, seconds in rows:
            size = "-" if stored is None else format_size(stored)
            ratio = "-" if stored is None else f"{ft_bytes / stored:.2f}x"
            lines.append(f"{label:<38} {size:>10} {ratio:>8} "
                         f"{'-' if edited is None else f'{edited:.1f}x':>8} "
                         f"{'-' if err is None else f'{err:.3g}':>10} "
                         f"{'-' if seconds is None else f'{seconds:.2f}s':>7}")
        lines += ["",
                  "ratio: the fine-tune's bytes / the artifact's; linear: the same over the tensors the method",
                  "edits (embeddings, lm_head and norms are stored exactly); max error: largest |rebuilt - fine-tune|;",
                  "time: compress + apply (a lossless rebuild is checked bit for bit against the fine-tune's CRCs),",
                  "or the edit for methods with no compact form"]
        return "\n".join(lines)
