"""The element RNG: a counter-based generator, a pure function of (seed, tensor name, index).

Random edits (DARE masks, DELLA sampling) draw one 32-bit value per element from
``uniform_u32(key, start, stop)``, where ``key = tensor_key(seed, name)``. The value of element i
depends on nothing else: not the chunking, the worker count, the scheduler, the device, or which
other tensors or models are in the run. A numba kernel (CPU) and torch (any device) compute the
same bits, and tests/test_kernels.py checks the kernel against a plain numpy form of the hash.

The mixer is Chris Wellons' ``lowbias32`` integer hash (bias ~0.17, among the best 32-bit
two-round hashes), applied as a keyed chain over the index's low and high 32-bit halves:
``h = mix(mix(lo ^ k0) ^ hi ^ k1)``. All arithmetic is mod 2^32; torch, which lacks wrapping
unsigned 32-bit multiplies on every device, splits each multiply into 16-bit halves in int64.
"""

from __future__ import annotations

import hashlib

import numpy as np

from . import kernels
from .kernels import M1 as _M1
from .kernels import M2 as _M2

__all__ = ["tensor_key", "uniform_u32", "uniform_u32_torch", "threshold_u32"]


def tensor_key(seed: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys from the seed and the tensor's name (stable across runs and machines)."""
    h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:], "little")


def uniform_u32(key: tuple[int, int], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """The uint32 draws of elements [start, stop) of the tensor with this key (into ``out``).

    A fused kernel (kernels.draws): 2.2-2.5 G draws/s per core here, ~10x the same hash as
    whole-array numpy (benchmarks/micro.py), which tests/test_kernels.py keeps as the reference."""
    if out is None:
        out = np.empty(max(0, stop - start), np.uint32)
    kernels.draws(key[0], key[1], start, out[: max(0, stop - start)])
    return out


def threshold_u32(p: float) -> int:
    """The integer t with P(draw < t) = p, to 2^-32: the draw-vs-threshold test both paths use."""
    return min(1 << 32, max(0, round(p * (1 << 32))))


# --- torch -----------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mul32_torch(x, c: int):
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix_torch(x):
    x = x ^ (x >> 16)
    x = _mul32_torch(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32_torch(x, _M2)
    return x ^ (x >> 16)


def uniform_u32_torch(key: tuple[int, int], start: int, stop: int, device=None):
    """The same draws as :func:`uniform_u32`, computed by torch (int64 tensor of uint32 values)."""
    import torch

    index = torch.arange(start, stop, dtype=torch.int64, device=device)
    h = _mix_torch((index & _MASK32) ^ key[0])
    return _mix_torch(h ^ (index >> 32) ^ key[1])
