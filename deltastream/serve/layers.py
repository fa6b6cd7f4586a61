"""A variant's deltas on the device, and the products the patched modules add per row.

Each serving form (:mod:`deltastream.serve.forms`) becomes a :class:`DeviceDelta` with:

- ``matmul(x)``: ``x @ delta^T`` for a float ``x [n, cols]`` (a linear layer's delta product);
- ``take(rows)``: the delta's rows (an embedding's lookup of token ids);
- ``add_to(weight)``: a working copy ``round(f32(weight) + delta)`` in the weight's dtype (``bank.use``);
- ``nbytes``: what it holds on the device.

Packed forms are decoded at most :data:`BLOCK_ELEMS` elements (a block of rows) at a time: a
product never holds a dense float copy of a matrix. On the CPU, BitDelta's signs multiply through
the lookup-table kernel (serve/kernels.py) while a variant has at most :data:`LUT_MAX_TOKENS`
tokens in the batch, and by blocks decoded in numba + BLAS above (many tokens are compute-bound,
where BLAS wins). :func:`linear_delta` is a patched linear layer's whole delta for a mixed batch:
every variant's sign product in one kernel call, the other forms one product each.
"""

from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .forms import CodebookDelta, DenseDelta, ServingForm, SignDelta, SparseDelta, rows_cols

__all__ = ["DeviceDelta", "DenseOnDevice", "SparseOnDevice", "SignOnDevice", "CodebookOnDevice", "to_device",
           "is_zero", "DeltaJob", "linear_delta", "working_copies", "BLOCK_ELEMS", "LUT_MAX_TOKENS"]

#: elements of one decoded block of rows (16 MiB of float32)
BLOCK_ELEMS = 1 << 22
#: tokens of one variant up to which the CPU sign product runs the lookup-table kernel rather than
#: block decode + BLAS (benchmarks/bench_serve.py --part kernels measures both)
LUT_MAX_TOKENS = 8
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [..., ceil(cols/8)] (np.packbits order) -> bool [..., cols]."""
    shifts = _SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _SHIFTS[packed.device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :cols].bool()


_POOL: list[ThreadPoolExecutor] = []
#: elements of work (tokens x rows x column groups, or rows x columns) below which a kernel runs
#: on the calling thread alone (a hand-off to the pool costs tens of microseconds)
SPLIT_WORK = 1 << 18


def _split(parts: int, work: int, kernel: Callable[[int, int], None]) -> None:
    """kernel(lo, hi) over [0, parts) in torch.get_num_threads() slices, the last on the calling
    thread, unless ``work`` is too small to share (the numba kernels release the GIL; numba's own
    parallel loops fought torch's OpenMP threads here)."""
    threads = min(torch.get_num_threads(), parts) if work >= SPLIT_WORK else 1
    if threads <= 1:
        kernel(0, parts)
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="deltastream-bank"))
    step = -(-parts // threads)
    bounds = [(lo, min(parts, lo + step)) for lo in range(0, parts, step)]
    futures = [_POOL[0].submit(kernel, lo, hi) for lo, hi in bounds[:-1]]
    kernel(*bounds[-1])
    for f in futures:
        f.result()


_NUMPY_BITS = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.uint16}


def _empty_like(w: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``w``; on the CPU from numpy, whose large buffers are madvised onto huge
    pages: a switch writes a model's worth of them, and first touches of 4 KiB pages cost 5x more."""
    bits = _NUMPY_BITS.get(w.dtype)
    if w.device.type != "cpu" or bits is None:
        return torch.empty_like(w)
    return torch.from_numpy(np.empty(tuple(w.shape), bits)).view(w.dtype)


def working_copies(like: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Uninitialised tensors like each of ``like`` (None where not on the CPU): on the CPU, views
    of one numpy buffer (one mapping, madvised onto huge pages as a whole), so that a switch's
    copies fault in by 2 MiB pages where the kernel has them and go back with one unmap."""
    cpu = [t.device.type == "cpu" and t.dtype in _NUMPY_BITS for t in like]
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 if c else 0 for t, c in zip(like, cpu)]
    arena = np.empty(sum(sizes), np.uint8)
    out: list[torch.Tensor | None] = []
    at = 0
    for t, c, size in zip(like, cpu, sizes):
        if not c:
            out.append(None)
            continue
        words = arena[at:at + t.numel() * t.element_size()].view(_NUMPY_BITS[t.dtype])
        out.append(torch.from_numpy(words).view(t.dtype).reshape(t.shape))
        at += size
    return out


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class DeviceDelta:
    """A tensor's delta as rows x cols (leading dimensions flattened)."""

    shape: tuple[int, ...]
    rows: int
    cols: int

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.rows, self.cols = rows_cols(self.shape)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """float32 [len(rows), cols]: the delta's rows."""
        raise NotImplementedError

    def block(self, lo: int, hi: int) -> torch.Tensor:
        return self.take(torch.arange(lo, hi, device=self.device))

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _blocks(self):
        step = max(1, BLOCK_ELEMS // max(1, self.cols))
        for lo in range(0, self.rows, step):
            yield lo, min(self.rows, lo + step)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, cols] -> float32 [n, rows], a block of rows decoded at a time."""
        xf = x.float()
        out = torch.empty((x.shape[0], self.rows), dtype=torch.float32, device=x.device)
        for lo, hi in self._blocks():
            torch.matmul(xf, self.block(lo, hi).T, out=out[:, lo:hi])
        return out

    def add_to(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """round(f32(weight) + delta) in weight's dtype, into ``out`` (a tensor like weight) or a
        new tensor; weight is not changed."""
        w = weight.reshape(self.rows, self.cols)
        out = _empty_like(w) if out is None else out.reshape(self.rows, self.cols)
        for lo, hi in self._blocks():
            out[lo:hi] = (w[lo:hi].float() + self.block(lo, hi)).to(w.dtype)
        return out.reshape(weight.shape)

    def dense(self) -> torch.Tensor:
        """The whole delta, float32 (tests and the generic per-row path of small tensors)."""
        return self.block(0, self.rows).reshape(self.shape)


class DenseOnDevice(DeviceDelta):
    """A decoded delta, stored in the model's dtype."""

    def __init__(self, values: torch.Tensor):
        super().__init__(tuple(values.shape))
        self.values = values.reshape(self.rows, self.cols)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)

    def take(self, rows):
        return self.values.index_select(0, rows).float()

    def block(self, lo, hi):
        return self.values[lo:hi].float()

    def matmul(self, x):
        return x.to(self.values.dtype) @ self.values.T


class SparseOnDevice(DeviceDelta):
    """Kept entries as CSR rows: row pointers, column indices (int32 while they fit) and values."""

    def __init__(self, form: SparseDelta, device: torch.device, dtype: torch.dtype):
        super().__init__(form.shape)
        index = form.index
        rows = index // self.cols
        itype = np.int32 if max(index.size, self.cols) < 2**31 - 1 else np.int64
        crow = np.zeros(self.rows + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=self.rows), out=crow[1:])
        self.crow = torch.from_numpy(crow.astype(itype)).to(device)
        self.col = torch.from_numpy((index % self.cols).astype(itype)).to(device)
        # float32 values: CPU sparse products have no bf16 kernel, and the kept entries are few
        self.values = torch.from_numpy(np.ascontiguousarray(form.values, np.float32)).to(device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            self.csr = torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.rows, self.cols),
                                               check_invariants=False)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.crow, self.col, self.values)

    def take(self, rows):
        crow = self.crow.long()
        starts, counts = crow[rows], crow[rows + 1] - crow[rows]
        total = int(counts.sum())
        out = torch.zeros((rows.numel(), self.cols), dtype=torch.float32, device=self.device)
        if total:
            which = torch.repeat_interleave(torch.arange(rows.numel(), device=self.device), counts)
            first = torch.cumsum(counts, 0) - counts
            at = starts[which] + torch.arange(total, device=self.device) - first[which]
            out[which, self.col[at].long()] = self.values[at]
        return out

    def matmul(self, x):
        return (self.csr @ x.float().T).T


class SignOnDevice(DeviceDelta):
    """Packed sign planes [levels, rows, ceil(cols/8)], +-alpha [levels, rows], an optional mask."""

    def __init__(self, form: SignDelta, device: torch.device):
        super().__init__(form.shape)
        self.planes = torch.from_numpy(np.ascontiguousarray(np.stack(form.planes))).to(device)
        self.alphas = torch.from_numpy(np.ascontiguousarray(form.alphas, np.float32)).to(device)
        self.mask = torch.from_numpy(np.ascontiguousarray(form.mask)).to(device) if form.mask is not None else None

    @property
    def device(self) -> torch.device:
        return self.planes.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.planes, self.alphas, self.mask)

    @property
    def cpu_kernels(self) -> bool:
        """Whether the numba kernels run it (on the CPU, without a mask)."""
        return self.device.type == "cpu" and self.mask is None

    def _decode(self, planes, alphas, mask):
        if self.cpu_kernels:
            from .kernels import SIGNS, decode_signs

            out = torch.empty((planes.shape[1], self.cols), dtype=torch.float32)
            decode_signs(planes.contiguous().numpy(), alphas.contiguous().numpy(), SIGNS, out.numpy())
            return out
        out = torch.zeros((planes.shape[1], self.cols), dtype=torch.float32, device=self.device)
        for j in range(planes.shape[0]):  # as BitDelta's decode: 0 + (+-alpha) per level, then the mask
            a = alphas[j][:, None]
            out += torch.where(_unpack(planes[j], self.cols), a, -a)
        if mask is not None:
            out[~_unpack(mask, self.cols)] = 0
        return out

    def take(self, rows):
        return self._decode(self.planes[:, rows], self.alphas[:, rows], None if self.mask is None else self.mask[rows])

    def block(self, lo, hi):
        return self._decode(self.planes[:, lo:hi], self.alphas[:, lo:hi],
                            None if self.mask is None else self.mask[lo:hi])

    def matmul(self, x):
        if self.cpu_kernels and x.shape[0] <= LUT_MAX_TOKENS:
            return linear_delta(x, [(None, self)])
        if self.cpu_kernels and x.dtype in (torch.bfloat16, torch.float16) and self.cols % 8 == 0:
            return self._half_matmul(x)
        return super().matmul(x)

    def _half_matmul(self, x):
        """x in bf16/float16, columns a multiple of 8: each plane's block as +-1 in x's dtype (exact),
        one half-precision GEMM (float32 accumulation, the product rounded to x's dtype) times alpha
        in float32. The unpack runs on the calling thread: torch's OpenMP workers spin after each
        GEMM and a second thread beside them ran slower, not faster."""
        from .kernels import UNIT_SIGNS, unpack_signs

        table = UNIT_SIGNS[str(x.dtype).removeprefix("torch.")]
        out = torch.zeros((x.shape[0], self.rows), dtype=torch.float32)
        step = max(1, BLOCK_ELEMS // self.cols)
        signs = torch.empty((min(step, self.rows), self.cols), dtype=x.dtype)
        words = signs.view(torch.uint16).numpy().view(np.uint64)
        for lo, hi in self._blocks():
            for j in range(self.planes.shape[0]):
                unpack_signs(self.planes[j, lo:hi].numpy(), table, words[:hi - lo])
                out[:, lo:hi] += (x @ signs[:hi - lo].T).float() * self.alphas[j, lo:hi]
        return out

    def add_to(self, weight, out=None):
        if not (self.cpu_kernels and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
            return super().add_to(weight, out)
        from .kernels import SIGNS, sign_add_bf16, sign_add_f32

        w = weight.reshape(self.rows, self.cols)
        out = _empty_like(w) if out is None else out.reshape(self.rows, self.cols)
        planes, alphas = self.planes.numpy(), self.alphas.numpy()
        if w.dtype == torch.float32:
            a, b, kernel = w.numpy(), out.numpy(), sign_add_f32
        else:
            a, b, kernel = w.view(torch.uint16).numpy(), out.view(torch.uint16).numpy(), sign_add_bf16
        _split(self.rows, self.rows * self.cols,
               lambda lo, hi: kernel(a[lo:hi], planes[:, lo:hi], alphas[:, lo:hi], SIGNS, b[lo:hi]))
        return out.reshape(weight.shape)


class CodebookOnDevice(DeviceDelta):
    """Packed signs, packed code planes and the magnitude table (multibit)."""

    def __init__(self, form: CodebookDelta, device: torch.device):
        super().__init__(form.shape)
        self.signs = torch.from_numpy(np.ascontiguousarray(form.signs)).to(device)
        codes = np.stack(form.codes) if form.codes else np.zeros((0, *form.signs.shape), np.uint8)
        self.codes = torch.from_numpy(np.ascontiguousarray(codes)).to(device)
        self.levels = torch.from_numpy(np.ascontiguousarray(form.levels, np.float32)).to(device)

    @property
    def device(self) -> torch.device:
        return self.signs.device

    @property
    def nbytes(self) -> int:
        return _nbytes(self.signs, self.codes, self.levels)

    def _decode(self, signs, codes):
        code = torch.zeros((signs.shape[0], self.cols), dtype=torch.int64, device=self.device)
        for p in range(codes.shape[0]):
            code |= _unpack(codes[p], self.cols).long() << p
        out = self.levels[code]
        return torch.where(_unpack(signs, self.cols), out, -out)

    def take(self, rows):
        return self._decode(self.signs[rows], self.codes[:, rows])

    def block(self, lo, hi):
        return self._decode(self.signs[lo:hi], self.codes[:, lo:hi])


class SignLists:
    """The sign deltas of a layer's batch as the kernel takes them: numba typed lists of their
    planes and alphas (building them costs microseconds an entry: the bank keeps one per layer
    for a whole generate call)."""

    def __init__(self, deltas: Sequence[SignOnDevice]):
        from numba.typed import List

        self.planes, self.alphas = List(), List()
        for d in deltas:
            self.planes.append(d.planes.numpy())
            self.alphas.append(d.alphas.numpy())


class DeltaJob:
    """A patched linear layer's whole delta for a mixed batch, float32 [m, rows]: row t is
    ``x[t] @ delta^T`` of the delta whose part serves token t (parts: the tokens a delta serves,
    None: all; the delta); tokens no part serves get zeros.

    The CPU sign deltas with at most LUT_MAX_TOKENS tokens each go through the lookup-table kernel
    (``lists`` builds, or recalls, their typed lists); every other part is its own product. The
    work is items (a token of the table kernel, or a part) that any number of threads take in
    turn through :meth:`run`: the bank's delta thread starts while torch computes the base
    product, and the calling thread joins in when that is done. With ``split``, the table
    kernel is one item split over torch.get_num_threads() threads instead (no base to overlap)."""

    def __init__(self, x: torch.Tensor, parts: Sequence[tuple[torch.Tensor | None, DeviceDelta]],
                 lists: Callable[[Sequence[SignOnDevice]], SignLists] = SignLists, split: bool = False):
        m = x.shape[0]
        shape = (m, parts[0][1].rows)  # numpy's zeros on the CPU: torch's fill wakes its thread pool
        self.out = torch.from_numpy(np.zeros(shape, np.float32)) if x.device.type == "cpu" else \
            torch.zeros(shape, dtype=torch.float32, device=x.device)
        self.x = x
        lut: list[tuple[torch.Tensor | None, SignOnDevice]] = []
        self.others: list[tuple[torch.Tensor | None, DeviceDelta]] = []
        for tokens, delta in parts:
            count = m if tokens is None else tokens.numel()
            if isinstance(delta, SignOnDevice) and delta.cpu_kernels and count <= LUT_MAX_TOKENS:
                lut.append((tokens, delta))
            else:
                self.others.append((tokens, delta))
        self.split = split
        self.lut_items = 0
        if lut:
            served = [np.arange(m) if t is None else t.numpy() for t, _ in lut]
            self.order = np.concatenate(served).astype(np.int64)
            self.which = np.repeat(np.arange(len(lut)), [len(t) for t in served])
            self.kept = lists([d for _, d in lut])
            self.xn = x.float().contiguous().numpy()
            self.groups = lut[0][1].planes.shape[-1]
            self.lut_items = 1 if split else len(self.order)
        self.items = self.lut_items + len(self.others)
        self._next = itertools.count()
        self._finished = 0
        self._error: BaseException | None = None
        self._done = threading.Condition()

    def run(self) -> None:
        """Take items until none is left (any thread, any number of times)."""
        table = np.empty((getattr(self, "groups", 0), 256), np.float32) if self.lut_items else None
        while (i := next(self._next)) < self.items:
            try:
                if i < self.lut_items:
                    self._lut(i, table)
                else:
                    self._part(*self.others[i - self.lut_items])
            except BaseException as e:  # noqa: BLE001 -- handed to result()
                self._error = e
            with self._done:
                self._finished += 1
                if self._finished == self.items:
                    self._done.notify_all()

    def result(self) -> torch.Tensor:
        """The delta, once every item is done (run() first, or another thread's)."""
        with self._done:
            self._done.wait_for(lambda: self._finished == self.items)
        if self._error is not None:
            raise self._error
        return self.out

    def _lut(self, i: int, table) -> None:
        from .kernels import sign_products

        on, rows = self.out.numpy(), self.out.shape[1]
        order, which, kept = self.order, self.which, self.kept
        if not self.split:
            sign_products(self.xn, order[i:i + 1], which[i:i + 1], kept.planes, kept.alphas, on, 0, rows, table)
            return
        work = len(order) * rows * self.groups
        if len(order) >= torch.get_num_threads():  # threads take tokens: each builds its own tables
            _split(len(order), work, lambda lo, hi: sign_products(
                self.xn, order[lo:hi], which[lo:hi], kept.planes, kept.alphas, on, 0, rows,
                np.empty((self.groups, 256), np.float32)))
        else:  # a token or two: threads take rows (and each tabulates the tokens)
            _split(rows, work, lambda lo, hi: sign_products(
                self.xn, order, which, kept.planes, kept.alphas, on, lo, hi, np.empty((self.groups, 256), np.float32)))

    def _part(self, tokens: torch.Tensor | None, delta: DeviceDelta) -> None:
        if tokens is None:
            self.out += delta.matmul(self.x).float()
        else:
            self.out[tokens] = delta.matmul(self.x.index_select(0, tokens)).float()


def linear_delta(x: torch.Tensor, parts: Sequence[tuple[torch.Tensor | None, DeviceDelta]],
                 lists: Callable[[Sequence[SignOnDevice]], SignLists] = SignLists) -> torch.Tensor:
    """DeltaJob's delta, computed here (the table kernel split over torch's thread count)."""
    job = DeltaJob(x, parts, lists, split=True)
    job.run()
    return job.result()


def to_device(form: ServingForm, device: torch.device, dtype: torch.dtype) -> DeviceDelta:
    """The device form of a method's serving form (dense values in the model's ``dtype``)."""
    if isinstance(form, SignDelta):
        return SignOnDevice(form, device)
    if isinstance(form, CodebookDelta):
        return CodebookOnDevice(form, device)
    if isinstance(form, SparseDelta):  # CSR while it is smaller than the dense delta (DARE's p above ~1/2)
        if form.index.size * 8 < np.prod(form.shape) * dtype.itemsize:
            return SparseOnDevice(form, device, dtype)
        form = DenseDelta(form.dense())
    if isinstance(form, DenseDelta):
        return DenseOnDevice(torch.from_numpy(np.ascontiguousarray(form.values)).to(device=device, dtype=dtype))
    raise TypeError(f"not a serving form: {type(form).__name__}")


def is_zero(form: ServingForm) -> bool:
    """A delta that changes nothing (an unchanged tensor stored exact): the bank keeps none."""
    if isinstance(form, DenseDelta):
        return not form.values.any()
    if isinstance(form, SparseDelta):
        return not form.values.any()
    if isinstance(form, SignDelta):
        return not form.alphas.any()
    return not form.levels.any()
