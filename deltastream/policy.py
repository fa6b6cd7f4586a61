"""Which tensors a method edits, and which are stored losslessly (METHODS.md, Part A.6).

Defaults: a lossy method edits float tensors of two or more dimensions; embeddings, lm_head and
1-D tensors (norms, biases) are kept exact, because edits there damage special-token rows and
norm gains. ``include`` patterns put tensors back under the method, ``exclude`` patterns take
them out (shell-style globs on the tensor name; exclude wins). A tensor whose vocabulary grew in
the fine-tune is always kept exact (its new rows have no base to be a delta from), and a tensor
new in the fine-tune is stored whole.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

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

    def assign(self, name: str, shape: tuple[int, ...], is_float: bool, method: Method,
               base_shape: tuple[int, ...] | None) -> str:
        """The policy of one tensor: the method's id, or lossless / new / grown (stored exact)."""
        if base_shape is None:
            return NEW
        if base_shape != shape:
            return GROWN
        if not method.lossy or not is_float or _matches(name, self.exclude):
            return LOSSLESS
        if _matches(name, self.include):
            return method.method_id if method.accepts(shape) else LOSSLESS
        if len(shape) < 2 or _matches(name, DEFAULT_KEEP_EXACT) or not method.accepts(shape):
            return LOSSLESS
        return method.method_id


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
