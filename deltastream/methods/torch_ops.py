"""Torch steps more than one method's kernels share: packed bit planes and exact magnitude sums.

Each gives exactly what its numpy counterpart gives (np.packbits / np.unpackbits, most
significant bit first; ``deltastream.exact.magnitude_sum``'s integer in units of 2^-56).
torch is imported inside the functions: the methods import this module without it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "unpack", "fixed_sum", "scalar"]


def scalar(value, device):
    """A float32 0-d tensor on ``device`` (the value rounded to float32 first, as numpy does)."""
    import torch

    return torch.tensor(float(np.float32(value)), dtype=torch.float32, device=device)


def pack(bits) -> np.ndarray:
    """np.packbits on the device (most significant bit first), brought back as uint8."""
    import torch

    n = bits.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=bits.device)
    return (padded.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8).cpu().numpy()


def unpack(packed: np.ndarray, n: int, device):
    """np.unpackbits on the device: bool[n], most significant bit first."""
    import torch

    data = torch.from_numpy(np.ascontiguousarray(packed[: -(-n // 8)])).to(device)
    shifts = torch.arange(7, -1, -1, device=device, dtype=torch.uint8)
    return ((data[:, None] >> shifts) & 1).reshape(-1)[:n].bool()


def fixed_sum(values) -> int:
    """deltastream.exact.magnitude_sum on the device: the same integer (units of 2^-56)."""
    import torch

    from ..exact import HI_SHIFT, LO_SHIFT, magnitude_sum

    mag = values.abs()
    if mag.numel() == 0:
        return 0
    if not float(mag.max()) < 2.0 ** 16:  # the rare slow path: on the CPU
        return magnitude_sum(mag.cpu().numpy())
    wide = mag.to(torch.float64) * 2.0 ** HI_SHIFT
    high = torch.floor(wide)
    low = torch.floor((wide - high) * 2.0 ** (LO_SHIFT - HI_SHIFT))
    return (int(high.to(torch.int64).sum()) << (LO_SHIFT - HI_SHIFT)) + int(low.to(torch.int64).sum())
