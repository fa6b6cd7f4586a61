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

import numpy as np
from numcodecs import Zstd

from . import api
from .checkpoint import open_checkpoint, read_bits
from .dtypes import to_float32
from .methods import METHODS
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
        rows = [("zstd -3 of the fine-tune (reference)", _zstd_size(ft), None, None)]
        for name in sorted(METHODS):
            start = time.perf_counter()
            art = api.compress(base, ft, os.path.join(folder, f"{name}.dsz"), name, overwrite=True,
                               progress=progress)
            out = api.apply(base, art, os.path.join(folder, f"{name}-rebuilt"), overwrite=True,
                            progress=progress)
            elapsed = time.perf_counter() - start
            rows.append((name, api.info(art)["stored_bytes"], _max_abs_error(ft, out), elapsed))
        lines = [
            f"deltastream demo: a Llama-shaped bf16 pair, {shape.n_params / 1e6:.1f}M parameters "
            f"({format_size(ft_bytes)} per checkpoint), made in {made:.1f}s" + (f" in {folder}" if workdir else ""),
            "",
            f"{'method':<38} {'stored':>10} {'ratio':>8} {'max error':>10} {'time':>8}",
        ]
        for name, stored, err, elapsed in rows:
            lines.append(f"{name:<38} {format_size(stored):>10} {ft_bytes / stored:>7.2f}x "
                         f"{'-' if err is None else f'{err:.3g}':>10} "
                         f"{'-' if elapsed is None else f'{elapsed:.2f}s':>8}")
        lines += ["", "time = compress + apply (rebuild, checked bit for bit against the fine-tune's checksums)"]
        return "\n".join(lines)
