"""Low rank: Twin-Merging's SVD compression of a weight matrix's delta (METHODS.md §2.10).

Twin keeps ``U[:, :r] diag(S[:r]) Vh[:r]`` of ``delta = ft - base`` with ``r = int(density *
min(d, k))`` (``rank_fraction`` here is Twin's density, 1 - mask_rate: the default 0.1 is its
"sparsity 0.9"); 1-D tensors are unchanged. Only 2-D tensors are accepted; the policy keeps every
other tensor exact. ``r = 0`` (a small matrix, or a small fraction) keeps no singular value: the
tensor's delta is dropped, as Twin's ``int()`` rule gives.

The SVD is computed out of core, without ever holding the d x k delta, by a randomized SVD
(Halko, Martinsson & Tropp 2011, Alg. 4.4 with 5.1) of the matrix as the chunks stream by, with
``l = min(r + oversample, min(d, k))`` columns and ``q = power_iters``:

====  ===============  ================================================================
pass  each chunk       the driver (finalize_pre)
====  ===============  ================================================================
0     ``Z = D^T G``    ``P = qr(Z)``: a basis of D's row space (k x l)
1..   ``Y = D P``      ``Q = qr(Y)`` (d x l)   } repeated q times: subspace (power) iteration
      ``Z = D^T Q``    ``P = qr(Z)``           }
2q+1  ``C = D P``      ``C = U_C S W^T`` (via qr + svd of an l x l); ``V_r = P W_r``;
                       ``U_r S_r = C W_r = D V_r``
====  ===============  ================================================================

so 2q + 2 passes over the data (6 at the default q = 2), then the write pass. The sketch is of the
*row* space: ``G`` (d x l) is Gaussian with row i drawn from a Philox stream keyed by (seed, the
tensor's random-stream name, i), so every chunk draws only the rows it holds (never a k x l
Gaussian per task) and the sketch is the same for any chunking or worker count. This is Halko's
scheme applied to ``D^T``: the same singular subspaces, the same number of passes as sketching
the column space, and the result is ``D V_r V_r^T``, the best rank-r matrix with row space
``V_r`` (its error is ``||D||^2 - sum S_r^2`` exactly, reported as ``rel_error``).

Products are computed per chunk in float64 from the float32 delta (a chunk that starts or ends
inside a row adds its part of that row's product), partials are folded per tensor in chunk
order, and QR/SVD run in float64 in the driver.

Stored: ``u``, the rows of ``U_r S_r`` in float32, each plan chunk storing the rows its elements
touch (exactly ``U_r S_r`` row-major when chunks hold whole rows, the usual case; a row that
spans chunks is stored once per chunk touching it), bit-shuffled + zstd (~12% smaller); and
``vt`` (``V_r^T``, r x k float32), a state array (stored raw, as the job stores state arrays).
Decoding a chunk is its elements of ``u @ vt`` in float32; ``edit`` runs the same decode on the
same float32 factors, so compress + apply == edit bit for bit. Stored bytes: ``4 r (d + k)``
against ``2 d k`` for bf16, i.e. ``0.2 (d + k) / max(d, k)`` at rank_fraction 0.1: 0.40x a square
bf16 matrix, 0.26x a 4096 x 14336 one (measured 0.37x and 0.25x with the shuffle and metadata).

What is, and is not, the same bits:

- For a fixed chunk size: identical for any worker count and scheduler (threads, sync, a
  cluster), and from run to run: each chunk's products do not depend on the schedule, and the
  fold tree and its order are fixed by the chunk order.
- Across chunk sizes: not bit-identical. The float64 sums over chunks are grouped differently,
  so the factors differ in their last float64 bits; after the float32 rounding of the factors
  and of the output, most outputs are the same bits and some differ by one ulp of the output
  dtype (tests: within rtol 1e-5). Where ``S[r-1]`` and ``S[r]`` (nearly) tie, which of the two
  directions is kept is decided by such noise (the error is then the same either way).
- Across seeds, numpy versions (``Generator.standard_normal``) and BLAS/LAPACK builds: the
  sketch or the rounding may differ; the artifact never needs the sketch again, so apply is
  unaffected.

Memory, per task: the chunk's float32 delta and base (8 B per element, as every lossy method),
float64 slabs of the delta (at most 16 MiB), the sketch's rows in pass 0 (m x l float64 for the
m rows a chunk touches) and the partial: m x l float64 in the ``D P`` passes, k x l float64 in
the ``D^T`` passes (up to ~fan-in + workers of those wait for their fold). The state every task
reads (shared by threads, copied per task on a cluster): ``P`` (k x l) or ``Q`` (d x l) float64,
then ``us`` (d x r) and ``vt`` (r x k) float32 in the write pass. The driver's finalize holds
``Y``/``C`` and the row partials (2 d l float64) and a QR's workspace.

Compute: d k l float64 multiply-adds per pass, (2q + 2) passes, plus QRs of d x l and k x l in the
driver; decoding is r float32 multiply-adds per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..dtypes import DType
from ..exact import NonFinite
from ..params import check_range, field
from ..scratch import scratch
from .base import ChunkContext, Encoding, StoredArray

__all__ = ["LowRank", "LowRankParams", "rank_of", "sketch_width"]


@dataclass(frozen=True)
class LowRankParams:
    rank_fraction: float = field(0.1, "rank kept per matrix: r = int(rank_fraction * min(d, k)) "
                                      "(Twin-Merging's density; 0.1 is its sparsity 0.9)")
    oversample: int = field(8, "extra sketch columns of the randomized SVD: l = r + oversample")
    power_iters: int = field(2, "power (subspace) iterations; each costs two passes over the data")

    def __post_init__(self):
        check_range("lowrank", "rank_fraction", self.rank_fraction, 0.0, 1.0, low_open=True)
        check_range("lowrank", "oversample", self.oversample, 0)
        check_range("lowrank", "power_iters", self.power_iters, 0)


def _state_bytes(shape: tuple[int, ...], params: LowRankParams) -> int:
    """The driver's peak for one tensor: bases and partials of d x l and k x l in float64."""
    if len(shape) != 2:
        return 0
    return 3 * (shape[0] + shape[1]) * sketch_width(shape, params) * 8


def rank_of(shape: tuple[int, ...], rank_fraction: float) -> int:
    """Twin's rule: r = int(density * min(d, k)) (0 for anything but a non-empty matrix)."""
    if len(shape) != 2:
        return 0
    return int(rank_fraction * min(shape))


def sketch_width(shape: tuple[int, ...], params: LowRankParams) -> int:
    r = rank_of(shape, params.rank_fraction)
    return min(r + params.oversample, min(shape)) if r else 0


# --- the geometry of a flat chunk of a row-major matrix ---------------------------------------

class _Rows(NamedTuple):
    """Whole rows row0 .. row0+n, at offset off of the chunk."""
    row0: int
    n: int
    off: int


class _Part(NamedTuple):
    """Columns c0 .. c1 of one row, at offset off of the chunk."""
    row: int
    c0: int
    c1: int
    off: int


def _pieces(start: int, stop: int, k: int) -> list[_Rows | _Part]:
    """Elements [start, stop) of a matrix with rows of k: a partial row, whole rows, a partial row."""
    out: list[_Rows | _Part] = []
    pos = start
    if pos < stop and pos % k:
        c0 = pos % k
        c1 = min(k, c0 + stop - pos)
        out.append(_Part(pos // k, c0, c1, 0))
        pos += c1 - c0
    if stop - pos >= k:
        n = (stop - pos) // k
        out.append(_Rows(pos // k, n, pos - start))
        pos += n * k
    if pos < stop:
        out.append(_Part(pos // k, 0, stop - pos, pos - start))
    return out


def _rows_touched(start: int, stop: int, k: int) -> tuple[int, int]:
    """First row and number of rows the chunk's elements lie in."""
    if stop <= start:
        return start // k, 0
    first = start // k
    return first, (stop - 1) // k - first + 1


_SLAB = 1 << 21  # float64 elements of the delta converted at a time (16 MiB)


def _f64(x: np.ndarray, tag: str = "lowrank.f64") -> np.ndarray:
    """A float64 copy of x in this thread's scratch buffer (valid until the next call)."""
    out = scratch(tag, x.size, np.float64).reshape(x.shape)
    out[...] = x
    return out


def _gaussian_rows(key: tuple[int, int], row0: int, n: int, width: int) -> np.ndarray:
    """Rows row0 .. row0+n of the tensor's d x l Gaussian sketch: row i from its own Philox stream."""
    out = np.empty((n, width), np.float64)
    base = key[0] | (key[1] << 32)
    for i in range(n):
        gen = np.random.Generator(np.random.Philox(key=base | ((row0 + i) << 64)))
        out[i] = gen.standard_normal(width)
    return out


class LowRank(Encoding):
    method_id = "lowrank"
    Params = LowRankParams
    summary = "rank-r SVD of each matrix's delta (Twin-Merging), out-of-core randomized SVD; stores the factors"
    examples = ({"rank_fraction": 0.25},)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == 2

    # --- passes ------------------------------------------------------------------------------
    def pre_passes(self, shape: tuple[int, ...]) -> int:
        return 2 * self.params.power_iters + 2 if rank_of(shape, self.params.rank_fraction) else 0

    def pre_stats(self, i: int, delta: np.ndarray, ctx: ChunkContext) -> dict:
        k = ctx.shape[1]
        pieces = _pieces(ctx.start, ctx.stop, k)
        if i % 2:  # a D P pass: the rows of Y (or C) this chunk touches, partial rows partial
            p = ctx.state["p"]
            rows = []
            for piece in pieces:
                if isinstance(piece, _Rows):
                    d = delta[piece.off: piece.off + piece.n * k].reshape(piece.n, k)
                    y = np.empty((piece.n, p.shape[1]), np.float64)
                    step = max(1, _SLAB // k)  # slabs of whole rows: each writes its own rows of y
                    for s in range(0, piece.n, step):
                        np.matmul(_f64(d[s: s + step]), p, out=y[s: s + step])
                    rows.append((piece.row0, y))
                else:
                    d = delta[piece.off: piece.off + piece.c1 - piece.c0]
                    rows.append((piece.row, (_f64(d) @ p[piece.c0: piece.c1])[None, :]))
            return {"y_list": rows}
        # a D^T pass: k x l, against the sketch's rows (pass 0) or Q's
        if i == 0:
            width = sketch_width(ctx.shape, self.params)
            first, n = _rows_touched(ctx.start, ctx.stop, k)
            right = _gaussian_rows(ctx.rng_key, first, n, width)
            right_row0 = first
        else:
            right, right_row0 = ctx.state["q"], 0
            width = right.shape[1]
        z = np.zeros((k, width), np.float64)
        fro2 = 0.0
        # whole rows first (their product fills z; there is at most one such piece), then the
        # partial rows add theirs; float64 temporaries stay under _SLAB elements
        for piece in sorted(pieces, key=lambda x: isinstance(x, _Part)):
            if isinstance(piece, _Rows):
                d = delta[piece.off: piece.off + piece.n * k].reshape(piece.n, k)
                r0 = piece.row0 - right_row0
                rhs = right[r0: r0 + piece.n]
                step = max(1, _SLAB // piece.n)  # slabs of columns: each fills its own rows of z
                for c in range(0, k, step):
                    block = _f64(d[:, c: c + step])
                    np.matmul(block.T, rhs, out=z[c: c + step])
                    if i == 0:
                        fro2 += float(np.vdot(block, block))
            else:
                vec = right[piece.row - right_row0]
                step = max(1, _SLAB // width)
                for c in range(piece.c0, piece.c1, step):
                    c_end = min(piece.c1, c + step)
                    block = _f64(delta[piece.off + c - piece.c0: piece.off + c_end - piece.c0])
                    z[c: c_end] += np.outer(block, vec)
                    if i == 0:
                        fro2 += float(np.vdot(block, block))
        out: dict[str, object] = {"z": z}
        if i == 0:
            if not math.isfinite(fro2):  # the job names the element (methods.base.non_finite_error)
                raise NonFinite("a NaN or infinite delta has no SVD")
            out.update(fro2=fro2, shape_list=[tuple(ctx.shape)])
        return out

    def finalize_pre(self, i: int, combined: dict, state: dict) -> dict:
        state = dict(state)
        if i == 0:
            state["_shape"] = tuple(combined["shape_list"][0])
            state["_fro2"] = combined["fro2"]
            state["p"] = np.linalg.qr(combined["z"])[0]
            return state
        d, k = state["_shape"]
        if i % 2 == 0:  # Z = D^T Q -> P
            del state["q"]
            state["p"] = np.linalg.qr(combined["z"])[0]
            return state
        y = np.zeros((d, state["p"].shape[1]), np.float64)
        for row0, block in combined["y_list"]:
            y[row0: row0 + block.shape[0]] += block
        del combined["y_list"]
        if i < self.pre_passes((d, k)) - 1:  # Y = D P -> Q
            del state["p"]
            state["q"] = np.linalg.qr(y)[0]
            return state
        # C = D P = U_C S W^T: qr(C) = Q_C R, svd(R) = U_R S W^T
        r = rank_of((d, k), self.params.rank_fraction)
        _, w_t = np.linalg.svd(np.linalg.qr(y, mode="r"))[1:]
        w_r = w_t[:r].T
        us = y @ w_r  # = D V_r = U_r S_r
        vt = (state.pop("p") @ w_r).T
        captured = float(np.einsum("ij,ij->", us, us))
        fro2 = state.pop("_fro2")
        state.pop("_shape")
        state.update(rank=r, sketch=int(y.shape[1]),
                     rel_error=math.sqrt(max(0.0, fro2 - captured) / fro2) if fro2 > 0 else 0.0,
                     _us=np.ascontiguousarray(us, np.float32), vt=np.ascontiguousarray(vt, np.float32))
        return state

    # --- the artifact form -------------------------------------------------------------------
    def state_layout(self, shape):
        r = rank_of(shape, self.params.rank_fraction)
        if not r:
            return {}
        return {"rank": ("int", ()), "sketch": ("int", ()), "rel_error": ("number", ()), "vt": ("array", (r, shape[1]))}

    def stored_arrays(self, dtype: DType, shape: tuple[int, ...], chunk_elems: int,
                      state: dict) -> list[StoredArray]:
        r = rank_of(shape, self.params.rank_fraction)
        if not r:
            return []
        numel, k = math.prod(shape), shape[1]
        starts = np.arange(0, numel, chunk_elems, dtype=np.int64)
        stops = np.minimum(starts + chunk_elems, numel)
        touched = (stops - 1) // k - starts // k + 1
        chunk_len = int(touched.max()) * r
        total = (len(starts) - 1) * chunk_len + int(touched[-1]) * r
        return [StoredArray("u", np.dtype(np.float32), chunk_len, total, "xor")]

    def encode(self, base: np.ndarray, ft: np.ndarray, ctx: ChunkContext) -> dict[str, np.ndarray]:
        """The chunk's rows of U_r S_r, from the state the passes left (the chunk's data is not
        read again: it was, by the passes)."""
        if not rank_of(ctx.shape, self.params.rank_fraction):
            return {}
        if "_us" not in ctx.state:
            raise RuntimeError(f"tensor '{ctx.tensor}': lowrank encode without its factors (passes not run)")
        first, n = _rows_touched(ctx.start, ctx.stop, ctx.shape[1])
        return {"u": ctx.state["_us"][first: first + n].reshape(-1)}

    def state_bytes(self, shape):
        return _state_bytes(shape, self.params)

    def encode_with_stats(self, base, ft, ctx):
        return self.encode(base, ft, ctx), None  # no delta needed: encode reads the factors

    def decode_delta(self, stored: dict[str, np.ndarray], base: np.ndarray, ctx: ChunkContext) -> np.ndarray:
        out = scratch("lowrank.out", ctx.size, np.float32)
        r = rank_of(ctx.shape, self.params.rank_fraction)
        if not r:
            out[...] = 0
            return out
        k = ctx.shape[1]
        first, n = _rows_touched(ctx.start, ctx.stop, k)
        u = stored["u"][: n * r].reshape(n, r)
        vt = ctx.state["vt"]
        for piece in _pieces(ctx.start, ctx.stop, k):
            if isinstance(piece, _Rows):
                r0 = piece.row0 - first
                np.matmul(u[r0: r0 + piece.n], vt, out=out[piece.off: piece.off + piece.n * k].reshape(piece.n, k))
            else:
                np.matmul(u[piece.row - first], vt[:, piece.c0: piece.c1],
                          out=out[piece.off: piece.off + piece.c1 - piece.c0])
        return out
