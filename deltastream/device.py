"""Transport to a torch device (a CUDA GPU): which device, staging buffers, streams, copies.

``--device cuda`` (or ``auto``, CUDA when torch sees one) runs a method's registered "torch"
implementations (``methods/backends.py``) on each chunk. This module is only how a chunk gets
there and back: its bit patterns are copied in (through this thread's pinned staging buffers,
non-blocking, on this thread's own stream), widened to float32, handed to the method's kernel,
rounded to the tensor's dtype to nearest even and copied back. The kernels themselves live in
the methods' modules and do the numpy method's arithmetic in the same order, so the bits are the
CPU's; the tests run the same code with torch on the CPU (``torch:cpu``), and
benchmarks/gpu_check.py checks it on a GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

__all__ = ["resolve_device", "TORCH_DTYPES", "torch_device", "edit_on_device", "load_bits", "as_values",
           "store_output"]

#: the dtypes the torch kernels compute on (float64 stays on the CPU)
TORCH_DTYPES = ("BF16", "F16", "F32")
_TORCH_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_local = threading.local()


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'torch:cpu' runs the torch kernels on
    the CPU (the tests' way to run the device code without a GPU)."""
    from .errors import ParameterError

    device = device or "cpu"
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    if device not in ("cpu", "cuda", "torch:cpu") and not device.startswith("cuda:"):
        raise ParameterError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ParameterError(f"--device {device}: torch sees no CUDA device here")
    return device


def torch_device(device: str):
    """The torch.device of a --device name ('torch:cpu' is torch on the CPU)."""
    import torch

    return torch.device("cpu" if device == "torch:cpu" else device)


def _float_dtype(ctx):
    import torch

    return getattr(torch, _TORCH_NAME[ctx.dtype.name])


def _signed(ctx):
    import torch

    return {16: torch.int16, 32: torch.int32}[8 * ctx.dtype.itemsize]


def _staging(n: int, pinned: bool):
    """This thread's pinned host buffers for one chunk in and out (reused: pinning is slow)."""
    import torch

    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        bufs = _local.bufs = tuple(torch.empty(max(n, 1), dtype=torch.int16, pin_memory=pinned) for _ in range(3))
    return bufs


def _stream(device):
    import torch

    stream = getattr(_local, "stream", None)
    if stream is None:
        stream = _local.stream = torch.cuda.Stream(device=device)
    return stream


class _no_stream:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def edit_on_device(base: np.ndarray, ft: np.ndarray, ctx, device: str, edit: Callable) -> np.ndarray:
    """The chunk's output bit patterns: round(f32(base) + edit(delta, ctx, torch_device)), with
    the chunk copied through pinned buffers on this thread's stream (2-byte dtypes)."""
    import torch

    dev = torch_device(device)
    cuda = dev.type == "cuda"
    n = ft.size
    dtype = _float_dtype(ctx)
    if ctx.dtype.itemsize != 2:  # F32: no staging, the chunk is its own float32 view
        b = torch.from_numpy(base.view(np.float32).copy()).to(dev)
        f = torch.from_numpy(ft.view(np.float32).copy()).to(dev)
        return (b + edit(f - b, ctx, dev)).cpu().numpy().view(ctx.dtype.bits)
    host_b, host_f, host_out = _staging(n, pinned=cuda)
    host_b.numpy()[:n] = base.view(np.int16)  # the mmap view -> this thread's pinned buffer
    host_f.numpy()[:n] = ft.view(np.int16)
    stream = _stream(dev) if cuda else None
    with torch.cuda.stream(stream) if cuda else _no_stream():
        # each worker thread has its own stream: one chunk's copies overlap another's compute
        b = host_b[:n].to(dev, non_blocking=True).view(dtype).to(torch.float32)
        f = host_f[:n].to(dev, non_blocking=True).view(dtype).to(torch.float32)
        out = (b + edit(f - b, ctx, dev)).to(dtype)
        host_out[:n].copy_(out.view(torch.int16), non_blocking=cuda)
        if stream is not None:  # cuda: the pinned buffers are reused by this thread's next chunk
            stream.synchronize()
    return host_out[:n].numpy().view(ctx.dtype.bits).copy()


def load_bits(bits: np.ndarray, ctx, dev):
    """A chunk's bit patterns on the device: (int64 tensor of the unsigned patterns, float32 values)."""
    import torch

    wide = torch.from_numpy(bits.astype(np.int64)).to(dev)
    return wide, as_values(wide, ctx)


def as_values(wide, ctx):
    """float32 values of bit patterns held in an int64 tensor (the int64 -> int16/32 cast wraps)."""
    import torch

    return wide.to(_signed(ctx)).view(_float_dtype(ctx)).to(torch.float32)


def store_output(values, ctx) -> np.ndarray:
    """float32 values on the device -> the tensor dtype's bit patterns on the host, to nearest even."""
    return values.to(_float_dtype(ctx)).view(_signed(ctx)).cpu().numpy().view(ctx.dtype.bits)
