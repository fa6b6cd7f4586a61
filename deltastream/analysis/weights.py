"""Weights streamed between the checkpoints on disk and the model in memory.

The model holds W_POST (loaded once); the edited checkpoint stays on disk. dW~ = W_EDIT - W_POST
is never held whole: every use (setting W_POST + t dW~, an inner product with a gradient) reads
both checkpoints a chunk at a time, so analyze holds one model and its gradients, not three.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo
from ..checkpoint.reader import read_bits
from ..dtypes import to_float32
from ..errors import MismatchError, tensor_context

__all__ = ["EditedTensor", "changed_tensors", "layer_of", "float_values", "CHUNK_ELEMS"]

CHUNK_ELEMS = 1 << 22  # elements per read: 16 MiB of float32, 32 MiB of the float64 products
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer block a tensor belongs to (``model.layers.3.mlp...`` -> 3), else None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def float_values(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    if not info.dtype.computable:
        raise MismatchError(f"{tensor_context(info.path, info.name)}: dtype {info.dtype.name} is not a float")
    return to_float32(read_bits(info, start, stop), info.dtype)


@dataclass(frozen=True)
class EditedTensor:
    """A tensor the edit changes: its post-trained and edited versions on disk."""

    post: TensorInfo
    edited: TensorInfo
    norm2: float  # ||dW~||^2, float64

    @property
    def name(self) -> str:
        return self.post.name

    @property
    def numel(self) -> int:
        return self.post.numel

    def chunks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.numel, CHUNK_ELEMS):
            yield start, min(start + CHUNK_ELEMS, self.numel)

    def post_values(self, start: int, stop: int) -> np.ndarray:
        return float_values(self.post, start, stop)

    def edited_values(self, start: int, stop: int) -> np.ndarray:
        return float_values(self.edited, start, stop)

    def change(self, start: int, stop: int) -> np.ndarray:
        """dW~ over elements [start, stop), float64 (exact for float32 and narrower inputs)."""
        return self.edited_values(start, stop).astype(np.float64) - self.post_values(start, stop)

    def at(self, t: float, start: int, stop: int) -> np.ndarray:
        """W_POST + t dW~ over elements [start, stop), float32; exactly W_POST at t = 0 and
        exactly W_EDIT at t = 1 (not the rounding of post + 1.0 x change)."""
        if t == 0:
            return self.post_values(start, stop)
        if t == 1:
            return self.edited_values(start, stop)
        return (self.post_values(start, stop) + t * self.change(start, stop)).astype(np.float32)


def changed_tensors(post: Checkpoint, edited: Checkpoint) -> list[EditedTensor]:
    """Every tensor whose values the edit changes, after checking that the edited checkpoint has
    exactly the fine-tune's tensors and shapes (another architecture is one clear error)."""
    missing = sorted(set(post.tensors) - set(edited.tensors))
    extra = sorted(set(edited.tensors) - set(post.tensors))
    if missing or extra:
        name, what = (missing[0], "lacks") if missing else (extra[0], "has a tensor the fine-tune lacks:")
        more = len(missing) + len(extra) - 1
        raise MismatchError(f"{tensor_context(edited.path, name)}: the edited checkpoint {what} this tensor"
                            f"{f' (and {more} more)' if more else ''}: not an edit of this fine-tune")
    out = []
    for name, info in post.tensors.items():
        other = edited.tensors[name]
        if tuple(other.shape) != tuple(info.shape):
            raise MismatchError(f"{tensor_context(other.path, name)}: shape {list(other.shape)} in the edited "
                                f"checkpoint, {list(info.shape)} in the fine-tune: not an edit of this fine-tune")
        norm2 = 0.0  # one pass: a chunk of equal bits costs a compare, a changed one its norm
        for start in range(0, info.numel, CHUNK_ELEMS):
            stop = min(start + CHUNK_ELEMS, info.numel)
            same_dtype = other.dtype == info.dtype
            if same_dtype and np.array_equal(read_bits(info, start, stop), read_bits(other, start, stop)):
                continue
            d = float_values(other, start, stop).astype(np.float64) - float_values(info, start, stop)
            norm2 += float(np.dot(d, d))
        if norm2 > 0 or math.isnan(norm2):
            out.append(EditedTensor(info, other, norm2))
    return out

