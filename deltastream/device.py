"""Per-chunk offload of lossy edits to a torch device (a CUDA GPU), with the CPU's bits.

``edit --device cuda`` (or ``auto``, which picks CUDA when torch sees one) runs each chunk's
edit on the GPU: the chunk's base and fine-tune bit patterns are copied in (from pinned staging
buffers, non-blocking), widened, edited and rounded there, and copied back. Every kernel below is
the numpy method's arithmetic in the same order, in float32, with the same element RNG
(``rng.uniform_u32_torch``) and round-to-nearest-even casts, so the output bits equal the CPU's;
tests run this same code with torch on the CPU (``torch:cpu``), and benchmarks/gpu_check.py
checks it on a GPU.

Methods with a kernel here: dare, biased, extrapolate, bitdelta (1-bit, per tensor or row, zero
plus or keep, no residual levels). Others run on the CPU path, chunk by chunk as usual.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["resolve_device", "has_kernel", "has_decoder", "has_encoder", "edit_on_device", "decode_on_device",
           "encode_on_device"]

_TORCH_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_local = threading.local()


def resolve_device(device: str | None) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'torch:cpu' runs the torch kernels on
    the CPU (the tests' way to run this module's code without a GPU)."""
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


def has_kernel(method, dtype_name: str) -> bool:
    p = getattr(method, "params", None)
    if dtype_name not in _TORCH_DTYPE:
        return False
    if method.method_id == "bitdelta":
        return p.bits == 0 and p.residual == 0
    return method.method_id in ("dare", "biased", "extrapolate")


def has_decoder(method, dtype_name: str) -> bool:
    """Whether apply can decode this method's chunks on the device (the compact forms with a kernel)."""
    return has_kernel(method, dtype_name) and method.method_id in ("dare", "bitdelta")


def has_encoder(method, dtype_name: str) -> bool:
    """Whether compress can encode this method's chunks on the device (per-row scales: CPU)."""
    return has_decoder(method, dtype_name) and not (method.method_id == "bitdelta" and method.params.per == "row")


def _staging(n: int, pinned: bool):
    """This thread's pinned host buffers for one chunk in and out (reused: pinning is slow)."""
    import torch

    bufs = getattr(_local, "bufs", None)
    if bufs is None or bufs[0].numel() < n:
        kw = {"pin_memory": True} if pinned else {}
        bufs = _local.bufs = tuple(torch.empty(max(n, 1), dtype=torch.int16, **kw) for _ in range(3))
    return bufs


def edit_on_device(method, base: np.ndarray, ft: np.ndarray, ctx, device: str) -> np.ndarray:
    """The chunk's output bit patterns, computed with torch on ``device``."""
    import torch

    torch_device = torch.device("cpu" if device == "torch:cpu" else device)
    cuda = torch_device.type == "cuda"
    n = ft.size
    dtype = getattr(torch, _TORCH_DTYPE[ctx.dtype.name])
    if ctx.dtype.itemsize != 2:  # F32: no staging, the chunk is its own float32 view
        b = torch.from_numpy(base.view(np.float32).copy()).to(torch_device)
        f = torch.from_numpy(ft.view(np.float32).copy()).to(torch_device)
        return (b + _kernel(method, f - b, ctx, torch_device)).cpu().numpy().view(ctx.dtype.bits)
    host_b, host_f, host_out = _staging(n, pinned=cuda)
    host_b.numpy()[:n] = base.view(np.int16)  # the mmap view -> this thread's pinned buffer
    host_f.numpy()[:n] = ft.view(np.int16)
    stream = _stream(torch_device) if cuda else None
    with torch.cuda.stream(stream) if cuda else _no_stream():
        # each worker thread has its own stream: one chunk's copies overlap another's compute
        b = host_b[:n].to(torch_device, non_blocking=True).view(dtype).to(torch.float32)
        f = host_f[:n].to(torch_device, non_blocking=True).view(dtype).to(torch.float32)
        out = (b + _kernel(method, f - b, ctx, torch_device)).to(dtype)
        host_out[:n].copy_(out.view(torch.int16), non_blocking=cuda)
        if cuda:
            stream.synchronize()  # the pinned buffers are reused by this thread's next chunk
    return host_out[:n].numpy().view(ctx.dtype.bits).copy()


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


def _kernel(method, delta, ctx, device):
    import torch

    from .rng import threshold_u32, uniform_u32_torch

    p = method.params
    f32 = torch.float32
    if method.method_id == "extrapolate":
        return delta * float(np.float32(1.0 + p.alpha))
    if method.method_id == "biased":
        pos = float(np.float32((1 - p.k * p.p) / (1 - p.p)))
        return delta * torch.where(delta < 0, torch.tensor(float(np.float32(p.k)), dtype=f32, device=device),
                                   torch.tensor(pos, dtype=f32, device=device))
    if method.method_id == "dare":
        keep = uniform_u32_torch(ctx.rng_key, ctx.start, ctx.stop, device=device) >= min(threshold_u32(p.p), 2**32 - 1)
        return _dare_edit(method, delta, keep, ctx, device)
    # bitdelta, 1-bit
    edited = _bitdelta_edit(method, delta >= 0, ctx, device)
    if p.zero == "keep":
        edited = torch.where(delta != 0, edited, torch.zeros((), dtype=f32, device=device))
    return edited


def _dare_edit(method, delta, keep, ctx, device):
    import torch

    p, f32 = method.params, torch.float32
    if p.k == 0:
        delta = delta * float(method.factor(ctx))
        return torch.where(keep, delta, torch.zeros((), dtype=f32, device=device))
    kept = float(np.float32((1 - p.k * p.p) / (1 - p.p)))
    return delta * torch.where(keep, torch.tensor(kept, dtype=f32, device=device),
                               torch.tensor(float(np.float32(p.k)), dtype=f32, device=device))


def _bitdelta_edit(method, positive, ctx, device):
    """+-alpha by sign: alpha per tensor, or per row of the chunk's elements."""
    import torch

    alpha = ctx.state["alpha"][0]
    if method.params.per == "tensor":
        scale = torch.tensor(float(np.float32(alpha)), dtype=torch.float32, device=device)
    else:
        rows = np.asarray(alpha, np.float32)[np.arange(ctx.start, ctx.stop) // ctx.row_len]
        scale = torch.from_numpy(rows).to(device)
    return torch.where(positive, scale, -scale)


def decode_on_device(method, base: np.ndarray, stored: dict, ctx, device: str) -> np.ndarray:
    """apply's decode of one chunk with torch on ``device``: the output bit patterns."""
    import torch

    torch_device = torch.device("cpu" if device == "torch:cpu" else device)
    n, width = ctx.size, 8 * ctx.dtype.itemsize
    signed = {16: torch.int16, 32: torch.int32}[width]
    fdtype = getattr(torch, _TORCH_DTYPE[ctx.dtype.name])
    base_bits = torch.from_numpy(base.astype(np.int64)).to(torch_device)
    b = base_bits.to(signed).view(fdtype).to(torch.float32)  # the int64 -> int16/32 cast wraps
    p = method.params
    if method.method_id == "dare":
        from .rng import threshold_u32, uniform_u32_torch

        keep = uniform_u32_torch(ctx.rng_key, ctx.start, ctx.stop, device=torch_device) >= \
            min(threshold_u32(p.p), 2**32 - 1)
        if p.k == 0:
            zz = torch.zeros(n, dtype=torch.int64, device=torch_device)
            kept = stored["kept"][: int(keep.sum())]
            zz[keep] = torch.from_numpy(kept.astype(np.int64)).to(torch_device)
        else:
            zz = torch.from_numpy(stored["delta"][:n].astype(np.int64)).to(torch_device)
        difference = (zz >> 1) ^ -(zz & 1)  # un-zigzag (values below 2^width: no sign to drag)
        ft = ((base_bits + difference) & ((1 << width) - 1)).to(signed).view(fdtype).to(torch.float32)
        edited = _dare_edit(method, ft - b, keep, ctx, torch_device)
    else:  # 1-bit bitdelta
        positive = _unpack(stored["signs0"], n, torch_device)
        edited = _bitdelta_edit(method, positive, ctx, torch_device)
        if p.zero == "keep":
            edited = torch.where(_unpack(stored["nonzero"], n, torch_device), edited,
                                 torch.zeros((), dtype=torch.float32, device=torch_device))
    return (b + edited).to(fdtype).view(signed).cpu().numpy().view(ctx.dtype.bits)


def _unpack(packed: np.ndarray, n: int, device):
    """np.unpackbits on the device: bool[n], most significant bit first."""
    import torch

    data = torch.from_numpy(np.ascontiguousarray(packed[: -(-n // 8)])).to(device)
    shifts = torch.arange(7, -1, -1, device=device, dtype=torch.uint8)
    return ((data[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def encode_on_device(method, base: np.ndarray, ft: np.ndarray, ctx, device: str) -> tuple[dict, dict | None]:
    """compress's encode of one chunk with torch on ``device``: (stored arrays, post statistics),
    the same as the numpy method's, statistics exact (``deltastream.exact``'s fixed point)."""
    import torch

    torch_device = torch.device("cpu" if device == "torch:cpu" else device)
    width = 8 * ctx.dtype.itemsize
    signed = {16: torch.int16, 32: torch.int32}[width]
    fdtype = getattr(torch, _TORCH_DTYPE[ctx.dtype.name])
    base_bits = torch.from_numpy(base.astype(np.int64)).to(torch_device)
    ft_bits = torch.from_numpy(ft.astype(np.int64)).to(torch_device)
    b = base_bits.to(signed).view(fdtype).to(torch.float32)
    delta = ft_bits.to(signed).view(fdtype).to(torch.float32) - b
    p = method.params
    if method.method_id == "dare":
        from .rng import threshold_u32, uniform_u32_torch

        keep = uniform_u32_torch(ctx.rng_key, ctx.start, ctx.stop, device=torch_device) >= \
            min(threshold_u32(p.p), 2**32 - 1)
        difference = (ft_bits - base_bits) & ((1 << width) - 1)  # mod 2^width, as unsigned
        signed_diff = difference - ((difference >> (width - 1)) << width)  # two's complement value
        zz = (signed_diff << 1) ^ (signed_diff >> (width - 1))  # zigzag: small magnitudes, small codes
        zz = zz & ((1 << width) - 1)
        stored = {"kept": zz[keep]} if p.k == 0 else {"delta": zz}
        stored = {k: v.cpu().numpy().astype(ctx.dtype.bits) for k, v in stored.items()}
        post = None
        if p.rescale == "l1":
            post = {"abs": _fixed_sum(delta), "abs_kept": _fixed_sum(delta[keep])}
        return stored, post
    # 1-bit bitdelta, one scale per tensor
    stored = {"signs0": _pack(delta >= 0)}
    nonzero = delta != 0 if p.zero == "keep" else None
    if nonzero is not None:
        stored["nonzero"] = _pack(nonzero)
    post = {"abs": _fixed_sum(delta if nonzero is None else delta[nonzero]),
            "count": int(delta.numel() if nonzero is None else int(nonzero.sum()))}
    return stored, post


def _pack(bits) -> np.ndarray:
    """np.packbits on the device (most significant bit first), brought back as uint8."""
    import torch

    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=bits.device)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8).cpu().numpy()


def _fixed_sum(values) -> int:
    """deltastream.exact.magnitude_sum on the device: the same integer (units of 2^-56)."""
    import torch

    from .exact import HI_SHIFT, LO_SHIFT, magnitude_sum

    mag = values.abs()
    if mag.numel() == 0:
        return 0
    if not float(mag.max()) < 2.0 ** 16:  # the rare slow path: on the CPU
        return magnitude_sum(mag.cpu().numpy())
    wide = mag.to(torch.float64) * 2.0 ** HI_SHIFT
    high = torch.floor(wide)
    low = torch.floor((wide - high) * 2.0 ** (LO_SHIFT - HI_SHIFT))
    return (int(high.to(torch.int64).sum()) << (LO_SHIFT - HI_SHIFT)) + int(low.to(torch.int64).sum())
