"""A variant's deltas on the device, and the products the patched modules add per row.

Each serving form (:mod:`deltastream.serve.forms`) becomes a :class:`DeviceDelta` with:

- ``matmul(x)``: ``x @ delta^T`` for a float ``x [n, cols]`` (a linear layer's delta product);
- ``take(rows)``: the delta's rows (an embedding's lookup of token ids);
- ``add_to(weight)``: a working copy ``round(f32(weight) + delta)`` in the weight's dtype (``bank.use``);
- ``nbytes``: what it holds on the device.

Packed forms are decoded at most :data:`BLOCK_ELEMS` elements (a block of rows) at a time: a
product never holds a dense float copy of a matrix. On the CPU, BitDelta's signs multiply through
the lookup-table GEMV (serve/kernels.py) for a few tokens at a time (decoding), and a block-wise
unpack + BLAS otherwise (a prompt's many tokens are compute-bound, where BLAS wins).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .forms import CodebookDelta, DenseDelta, ServingForm, SignDelta, SparseDelta, rows_cols

__all__ = ["DeviceDelta", "DenseOnDevice", "SparseOnDevice", "SignOnDevice", "CodebookOnDevice", "to_device",
           "is_zero", "BLOCK_ELEMS", "LUT_MAX_TOKENS"]

#: elements of one decoded block of rows (16 MiB of float32)
BLOCK_ELEMS = 1 << 22
#: tokens up to which the CPU sign product runs the lookup-table kernel rather than unpack + BLAS
#: (4864 x 896, here: 7 ms vs 19 ms at 16 tokens, 0.5 ms vs 27 ms at 1)
LUT_MAX_TOKENS = 48
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [..., ceil(cols/8)] (np.packbits order) -> bool [..., cols]."""
    shifts = _SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _SHIFTS[packed.device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], packed.shape[-1] * 8)[..., :cols].bool()


_POOL: list[ThreadPoolExecutor] = []
#: rows below which a kernel runs on the calling thread alone
SPLIT_ROWS = 2048


def _by_rows(rows: int, kernel) -> None:
    """kernel(lo, hi) over [0, rows) in torch.get_num_threads() slices on threads (the numba
    kernels release the GIL; numba's own parallel loops fought torch's OpenMP threads here)."""
    threads = torch.get_num_threads()
    if threads <= 1 or rows < SPLIT_ROWS:
        kernel(0, rows)
        return
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(threads, thread_name_prefix="deltastream-bank"))
    step = -(-rows // threads)
    for f in [_POOL[0].submit(kernel, lo, min(rows, lo + step)) for lo in range(0, rows, step)]:
        f.result()


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

    def add_to(self, weight: torch.Tensor) -> torch.Tensor:
        """A new tensor: round(f32(weight) + delta) in weight's dtype (weight is not changed)."""
        w = weight.reshape(self.rows, self.cols)
        out = torch.empty_like(w)
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

    def _decode(self, planes, alphas, mask):
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

    def _cpu_kernels(self) -> bool:
        return self.device.type == "cpu" and self.mask is None

    def matmul(self, x):
        if not (self._cpu_kernels() and x.shape[0] <= LUT_MAX_TOKENS):
            return super().matmul(x)
        from .kernels import sign_gemv

        xn = x.float().contiguous().numpy()
        out = torch.zeros((x.shape[0], self.rows), dtype=torch.float32)
        part = np.empty((x.shape[0], self.rows), np.float32)
        for j in range(self.planes.shape[0]):
            planes = self.planes[j].numpy()
            _by_rows(self.rows, lambda lo, hi, planes=planes: sign_gemv(xn, planes[lo:hi], part[:, lo:hi]))
            out += torch.from_numpy(part) * self.alphas[j]
        return out

    def add_to(self, weight):
        if not (self._cpu_kernels() and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
            return super().add_to(weight)
        from .kernels import sign_add_bf16, sign_add_f32

        w = weight.reshape(self.rows, self.cols)
        out = torch.empty_like(w)
        planes, alphas = self.planes.numpy(), self.alphas.numpy()
        if w.dtype == torch.float32:
            a, b, kernel = w.numpy(), out.numpy(), sign_add_f32
        else:
            a, b, kernel = w.view(torch.uint16).numpy(), out.view(torch.uint16).numpy(), sign_add_bf16
        _by_rows(self.rows, lambda lo, hi: kernel(a[lo:hi], planes[:, lo:hi], alphas[:, lo:hi], b[lo:hi]))
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
