"""Which tensors a method edits, and which are stored losslessly (METHODS.md, Part A.6).

Defaults: a lossy method edits float tensors of two or more dimensions; embeddings, lm_head and
1-D tensors (norms, biases) are kept exact, because edits there damage special-token rows and
norm gains. ``include`` patterns put tensors back under the method, ``exclude`` patterns take
them out (shell-style globs on the tensor name; exclude wins). A tensor whose vocabulary grew in
the fine-tune is always kept exact (its new rows have no base to be a delta from), and a tensor
new in the fine-tune is stored whole. A dtype a lossy method cannot compute on (fp8, complex,
integers: ``DType.computable``) is kept exact, and an ``include`` that puts one under the method
is refused: nothing that cannot be decoded is ever encoded.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .checkpoint import TensorInfo
from .dtypes import COMPUTABLE
from .errors import ParameterError, escape, tensor_context
from .methods import Method

__all__ = ["Policy", "DEFAULT_KEEP_EXACT", "LOSSLESS", "NEW", "GROWN"]

#: names stored losslessly unless included: token embeddings and output heads
DEFAULT_KEEP_EXACT = ("*embed_tokens*", "*lm_head*", "*wte*", "*wpe*", "*word_embeddings*",
                      "*embed_in*", "*embed_out*", "*shared.weight")

LOSSLESS, NEW, GROWN = "lossless", "new", "grown"


@dataclass(frozen=True)
class Policy:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def assign(self, tensor: TensorInfo, method: Method, base_shape: tuple[int, ...] | None) -> str:
        """The policy of one tensor: the method's id, or lossless / new / grown (stored exact)."""
        name, shape = tensor.name, tensor.shape
        if base_shape is None:
            return NEW
        if base_shape != shape:
            return GROWN
        if not method.lossy or _matches(name, self.exclude):
            return LOSSLESS
        if not tensor.dtype.computable:
            self._refuse_include(tensor, method)
            return LOSSLESS
        if _matches(name, self.include):
            return method.method_id if method.accepts(shape) else LOSSLESS
        if len(shape) < 2 or _matches(name, DEFAULT_KEEP_EXACT) or not method.accepts(shape):
            return LOSSLESS
        return method.method_id

    def _refuse_include(self, tensor: TensorInfo, method: Method) -> None:
        """An include pattern naming a tensor of a dtype the method cannot compute on is an error."""
        pattern = next((p for p in self.include if fnmatch.fnmatchcase(tensor.name, p)), None)
        if pattern is not None:
            raise ParameterError(f"{tensor_context(tensor.path, tensor.name)}: --include '{escape(pattern)}' puts "
                                 f"it under method '{method.method_id}', which cannot compute on dtype "
                                 f"{tensor.dtype.name} (only {COMPUTABLE}); keep it exact with "
                                 f"--exclude '{escape(tensor.name)}'")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
