"""TIES-Merging's trim (Yadav et al. 2023) as an edit: keep the k largest |delta|, zero the rest.

::

    edited = delta where (|delta|, position) is among the k largest, else 0;  k = round(density * n)

``scope: tensor`` (default) ranks each tensor on its own, as mergekit does; ``scope: global`` ranks
every tensor the policy gives to trim together, as the official TIES code's whole-model top-k
(n is then the group's element count). ``density`` is the keep fraction (TIES's K = 20%:
0.2); ``round`` is Python's (half to even).

Ties at the threshold: the official code keeps every |delta| >= the k-th value, which keeps more
than k when values tie (common in bf16, pitfall 8). Here elements are ranked by (|delta|, then
position: the tensor's place in the checkpoint, then the flat index), so exactly k are kept: among
elements whose |delta| equals the threshold, those at LATER positions are kept and the earlier
ones dropped. The result is the same for any chunking or worker count.

Passes (``deltastream.ranks``): two histogram passes find the threshold value and how many of its
ties fall below rank n - k; a third counts each chunk's ties so that a chunk knows its place in
them. No compact form: use ``edit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import kernels, ranks
from ..params import check_range, field
from ..scratch import scratch
from .base import Edit

__all__ = ["Trim", "GLOBAL_GROUP"]

#: the stats group of every tensor under ``scope: global`` (no tensor name starts with NUL)
GLOBAL_GROUP = "\x00trim:global"


@dataclass(frozen=True)
class TrimParams:
    density: float = field(0.2, "fraction of entries kept: the round(density * n) largest |delta| (TIES's K=20%)")
    scope: str = field("tensor", "top-k per tensor (mergekit) or over every trimmed tensor together (official TIES)",
                       choices=("tensor", "global"))

    def __post_init__(self):
        check_range("trim", "density", self.density, 0.0, 1.0, low_open=True)


class RankPasses:
    """The passes of an exact rank search (``deltastream.ranks``) as method hooks, shared by the
    methods that cut |delta| at ranks: they give ``widths`` (the search's digits) and
    ``boundaries(n)``, and do their own last pass (ties) and its finalize."""

    widths: list[int]

    def boundaries(self, n: int) -> list[int]:
        raise NotImplementedError

    def pre_passes(self, shape):
        return len(self.widths) + 1

    def search_pass(self, i, delta, ctx):
        """(|delta| as uint32 bits, in delta's memory; pass i's histogram, or None at the tie pass)."""
        bits = ranks.magnitude_bits(delta, out=delta)  # in place: delta is not used again
        if i < len(self.widths):
            return bits, {"hist": ranks.histogram(bits, ctx.state["_search"] if i else None)}
        return bits, None

    def refine_search(self, i, combined, state) -> dict | None:
        """The state after histogram pass i, or None after the tie pass (the caller's own)."""
        if i == 0:
            n = int(combined["hist"].sum())
            return {**state, "_search": ranks.refine(ranks.new_search(n, self.boundaries(n), self.widths),
                                                     combined["hist"])}
        if i < len(self.widths):
            return {**state, "_search": ranks.refine(state["_search"], combined["hist"])}
        return None


class Trim(RankPasses, Edit):
    method_id = "trim"
    Params: ClassVar[type] = TrimParams  # declared: the merge sparsifiers derived from Trim have their own
    summary = "TIES trim: keep exactly the top-k |delta| (k = density * n) per tensor or over the model, zero the rest"
    examples = ({"density": 0.3}, {"density": 0.3, "scope": "global"})
    widths = ranks.digit_widths(1)

    def stats_group(self, i, tensor):
        return GLOBAL_GROUP if self.params.scope == "global" else tensor

    def boundaries(self, n: int) -> list[int]:
        """The ranks that cut the n magnitudes; the elements kept are those ranked from the first
        boundary up to the second (or the end). Subclasses (the merge sparsifiers) redefine it."""
        return [n - round(self.params.density * n)]

    def pre_stats(self, i, delta, ctx):
        bits, partial = self.search_pass(i, delta, ctx)
        if partial is not None:
            return partial
        return ranks.tie_partial(bits, ctx.state["_search"], (ctx.tensor, ctx.index))

    def finalize_pre(self, i, combined, state):
        refined = self.refine_search(i, combined, state)
        if refined is not None:
            return refined
        # every tensor of the group gets every tensor's offsets: finalize_pre is not told its tensor
        return {**state, "_tie_offsets": ranks.tie_offsets(state["_search"], combined["ties_list"])}

    def edit_delta(self, delta, ctx):
        bits = ranks.magnitude_bits(delta, out=scratch("trim.mag", delta.size, np.float32))
        block = ranks.assign(bits, ctx.state["_search"], ctx.state["_tie_offsets"][ctx.tensor][ctx.index],
                             out=scratch("trim.block", delta.size, np.uint8))
        kernels.zero_outside_block(delta, block, 1)  # block 1: the ranks between the first two boundaries
        return delta
