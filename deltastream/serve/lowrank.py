"""A PEFT LoRA adapter served as a variant: each targeted weight's delta kept as its two factors.

The adapter folder is read by :func:`deltastream.lora.adapter.open_adapter` (the reader compress,
apply, edit and merge use: names, ``lora_alpha / r`` or rslora's ``/ sqrt(r)``, ``rank_pattern``
/ ``alpha_pattern``, ``fan_in_fan_out``, ``modules_to_save``, and its one-line refusals: DoRA,
``lora_bias``, convolutions, an adapter of another base shape). Each targeted weight becomes a
:class:`LowRankOnDevice`: ``delta = L @ R * scale`` with ``L`` [rows, r] and ``R`` [r, cols],
float32 on the model's device (a linear layer's ``L = B``, ``R = A``; a transposed one,
``fan_in_fan_out`` and an embedding's ``lora_embedding_A/B``, ``L = A^T``, ``R = B^T``: PEFT's
``(B @ A)^T * scale``). Its product ``x @ delta^T = ((x @ R^T) @ L^T) * scale`` costs
``r * (rows + cols)`` multiply-adds per token and never forms the rows x cols delta.

Factors in float32, not the model's dtype: ``apply`` computes the delta from float32 A and B
(PEFT saves them in float32 by default even on a bf16 base), so ``use()``'s working copies are
``apply``'s bits only from float32 factors; they cost ``4 r (rows + cols)`` bytes, a few percent
of a bf16 dense delta at the ranks adapters use.

``modules_to_save`` tensors (full copies in the adapter) are dense deltas, ``f32(ft) - f32(base)``
in the model's dtype, as an artifact's exact tensors are.
"""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint, TensorInfo, read_bits
from ..dtypes import to_float32
from ..errors import MismatchError, escape, tensor_context
from ..lora.adapter import LoraTensor, open_adapter
from ..lora.kernels import lora_rows
from .layers import DenseOnDevice, DeviceDelta

__all__ = ["LowRankOnDevice", "adapter_deltas", "in_order"]


class LowRankOnDevice(DeviceDelta):
    """delta = left @ right * scale: left float32 [rows, r], right float32 [r, cols]."""

    def __init__(self, shape: tuple[int, ...], left: torch.Tensor, right: torch.Tensor, scale: float):
        super().__init__(shape)
        if left.shape != (self.rows, left.shape[1]) or right.shape != (left.shape[1], self.cols):
            raise ValueError(f"factors {list(left.shape)} x {list(right.shape)} do not make a {self.rows} x "
                             f"{self.cols} delta")
        self.left = left.float().contiguous()
        self.right = right.float().contiguous()
        self.scale = float(np.float32(scale))  # a Python float the float32 kernels take exactly

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def device(self) -> torch.device:
        return self.left.device

    @property
    def nbytes(self) -> int:
        return (self.left.numel() + self.right.numel()) * 4

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() @ self.right.T) @ self.left.T) * self.scale

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.left.index_select(0, rows) @ self.right) * self.scale

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the delta with apply's bits: the rank summed in order in float32, each
        product rounded and then added (lora_rows on the CPU, the same sums as torch ops elsewhere)."""
        if self.device.type == "cpu":
            return torch.from_numpy(lora_rows(self.left[lo:hi].numpy(), self.right.numpy(), self.scale))
        return in_order(self.left[lo:hi], self.right, self.scale)


def in_order(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """lora_rows in torch ops (any device): acc += left[:, j] * right[j] for j in order, each
    product rounded to float32 before the add (separate kernels: no FMA), then times scale."""
    out = torch.zeros((left.shape[0], right.shape[1]), dtype=torch.float32, device=left.device)
    for j in range(left.shape[1]):
        out += left[:, j:j + 1] * right[j:j + 1]
    return out.mul_(scale)


def _f32(info: TensorInfo) -> np.ndarray:
    return np.array(to_float32(read_bits(info, 0, info.numel), info.dtype), np.float32).reshape(info.shape)


def _dense(values: np.ndarray, param: torch.Tensor) -> DenseOnDevice:
    return DenseOnDevice(torch.from_numpy(values).to(device=param.device, dtype=param.dtype))


def adapter_deltas(path: str, base: Checkpoint, params: dict[str, torch.nn.Parameter],
                   canonical: dict[str, str]) -> dict[str, DeviceDelta]:
    """The adapter folder ``path`` over ``base`` (the checkpoint the model was loaded from) as the
    bank's deltas: model parameter name (``canonical``: the first of its tied names) -> delta on
    that parameter's device. Every changed tensor is checked against the model's parameter
    (MismatchError, one line); the adapter's recorded base_model_name_or_path is not compared (a
    folder moves): the reader's shape checks against ``base`` refuse an adapter of another shape."""
    opened = open_adapter(path, base)  # config and headers only; refusals and base shapes checked here
    deltas: dict[str, DeviceDelta] = {}
    for tname, info in opened.tensors.items():
        own = base.tensors.get(tname)
        if info is own:  # the base's own tensor: nothing changes
            continue
        where = tensor_context(info.path, tname)
        param = params.get(tname)
        if param is None:
            raise MismatchError(f"{where}: the model has no such parameter")
        if tuple(param.shape) != tuple(info.shape) or own is None:
            raise MismatchError(f"{where}: shape {list(info.shape)} is not the model's {list(param.shape)}")
        name = canonical[tname]
        if name in deltas:
            raise MismatchError(f"{where}: tied to '{escape(name)}', which the adapter changes too")
        if isinstance(info, LoraTensor):
            delta = _low_rank(info, own, param)
        else:  # modules_to_save: the adapter's full tensor in place of the base's
            values = _f32(info) - _f32(own)
            delta = _dense(values, param) if values.any() else None
        if delta is not None:
            deltas[name] = delta
    return deltas


def _low_rank(info: LoraTensor, own: TensorInfo, param: torch.Tensor) -> DeviceDelta | None:
    if info.base is not own and not np.array_equal(_f32(info.base), _f32(own)):
        # a LoRA over a tensor the adapter also saves whole, changed (an embedding PEFT saved with
        # its LoRA): the sum of both is served dense, the fine-tune's tensor minus the base's
        ft = to_float32(info.read(0, info.numel), info.dtype).reshape(info.shape)
        return _dense(np.asarray(ft, np.float32) - _f32(own), param)
    a, b = _f32(info.a), _f32(info.b)
    left, right = (a.T, b.T) if info.transposed else (b, a)
    if info.scale == 0 or not left.any() or not right.any():  # B = 0, PEFT's initial adapter: no change
        return None
    device = param.device
    return LowRankOnDevice(info.shape, torch.from_numpy(np.ascontiguousarray(left)).to(device),
                           torch.from_numpy(np.ascontiguousarray(right)).to(device), info.scale)
