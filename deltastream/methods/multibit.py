"""``multibit``: multi-bit BitDelta by magnitude blocks (the Unified-View paper, §5.3; METHODS.md §2.8, A.5).

Per tensor, sort |delta| and cut it into M = 2^bits equal-count blocks, block b holding the ranks
[floor(b*n/M), floor((b+1)*n/M)) (sizes differ by at most one); every magnitude becomes its
block's mean magnitude times ``scale``, and the sign is kept::

    edited = sign(delta) * levels[block(|delta|)],   levels[b] = scale * mean(|delta| in block b)

Ranks order equal magnitudes by position (flat index), so a tie spanning a block boundary (bf16
deltas hold many exact zeros) is split exactly and every block has its nominal count. The sign of
an exact zero is + (BitDelta's reference code). M = 1 would be plain BitDelta (``bitdelta``).
Artifacts written before this was its own method say ``{"id": "bitdelta", "bits": b >= 1}``;
``methods.method_from_config`` reads them as ``multibit`` (the stored arrays are the same).

Stored per chunk (preset "raw", np.packbits order): ``signs``, one bit per element (1: delta >= 0);
``codes``, the block index as ``bits`` packed bit planes, plane p = bit p of the index (least
significant first), planes one after the other. The codebook is ``levels`` in the state (JSON
floats, float32 values). A level is float32(total(exact block sum) / count * scale), 0 for an
empty block (n < M).

Passes (all before encoding, since an edit needs the levels up front): the rank search of
``deltastream.ranks`` (2 histogram passes, or 3 past 3 bits), then one pass that counts each
chunk's ties at the thresholds and sums the untied magnitudes per block exactly; tied elements
all have the threshold's value, so their share of each block's sum follows from the counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import kernels, ranks
from ..exact import from_parts, magnitude_sum, total
from ..params import check_range, field
from ..scratch import scratch
from .base import Encoding
from .packing import pack, packed_array, unpack
from .trim import RankPasses

__all__ = ["MultiBit"]


@dataclass(frozen=True)
class MultiBitParams:
    bits: int = field(1, "magnitude bits: 2^bits equal-count blocks of |delta| per tensor")
    scale: float = field(1.0, "multiple of each block's mean magnitude (1: the block mean)")

    def __post_init__(self):
        check_range("multibit", "bits", self.bits, 1, 8)
        check_range("multibit", "scale", self.scale, 0.0, None, low_open=True)


class MultiBit(RankPasses, Encoding):
    method_id = "multibit"
    Params = MultiBitParams
    summary = "signs and 2^bits equal-count magnitude blocks per tensor, each at its mean (multi-bit BitDelta)"
    examples = ({"bits": 2}, {"bits": 2, "scale": 1.25})

    def __init__(self, params: MultiBitParams | None = None, **values):
        super().__init__(params, **values)
        self.blocks = 1 << self.params.bits
        self.widths = ranks.digit_widths(self.blocks - 1)

    # --- passes: the rank search, then ties and exact block sums ------------------------------
    def boundaries(self, n):
        return [b * n // self.blocks for b in range(1, self.blocks)]

    def pre_stats(self, i, delta, ctx):
        bits, partial = self.search_pass(i, delta, ctx)
        if partial is not None:
            return partial
        cut = ranks.Cut(ctx.state["_search"])
        mag = bits.view(np.float32)
        ties = np.zeros(cut.values.size, np.int64)
        sums = np.zeros(self.blocks, object)  # exact sums (FixedSum ints) of the untied magnitudes
        for s, e in ranks.slices(bits.size):
            block, tied, value = ranks.classify(bits[s:e], cut)
            ties += np.bincount(value, minlength=ties.size)
            key = block.astype(np.uint16)
            key[tied] = self.blocks  # tied elements: counted from the totals in finalize_pre
            high, low, big = (np.zeros(self.blocks, np.int64) for _ in range(3))
            kernels.block_split_sums(bits[s:e], key, high, low, big)
            for b in range(self.blocks):  # a block with a huge magnitude takes the exact slow path
                sums[b] += magnitude_sum(mag[s:e][key == b]) if big[b] else from_parts(high[b], low[b])
        return {**ranks.tie_record((ctx.tensor, ctx.index), ties), "sums": sums}

    def finalize_pre(self, i, combined, state):
        refined = self.refine_search(i, combined, state)
        if refined is not None:
            return refined
        search = state["_search"]
        (offsets,) = ranks.tie_offsets(search, combined["ties_list"]).values()  # one tensor
        sums = [int(s) for s in combined["sums"]]
        for value, block, count in ranks.tied_blocks(search):
            sums[block] += count * magnitude_sum(np.array([value], np.uint32).view(np.float32))
        edges = [0] + search["ranks"] + [search["n"]]
        levels = [float(np.float32(total(s) / (hi - lo) * self.params.scale)) if hi > lo else 0.0
                  for s, lo, hi in zip(sums, edges, edges[1:])]
        return {**state, "levels": levels, "_tie_offsets": offsets}

    # --- the artifact form ----------------------------------------------------------------------
    def state_layout(self, shape):
        return {"levels": ("numbers", (2 ** self.params.bits,))}

    def stored_arrays(self, dtype, shape, chunk_elems, state):
        numel = math.prod(shape)
        return [packed_array("signs", chunk_elems, numel),
                packed_array("codes", chunk_elems, numel, planes=self.params.bits)]

    def encode_delta(self, delta, base, ft, ctx):
        signs = pack(delta >= 0)
        bits = ranks.magnitude_bits(delta, out=delta)
        code = ranks.assign(bits, ctx.state["_search"], ctx.state["_tie_offsets"][ctx.index],
                            out=scratch("blocks.code", delta.size, np.uint8))
        planes = [pack((code >> np.uint8(p)) & np.uint8(1)) for p in range(self.params.bits)]
        return {"signs": signs, "codes": np.concatenate(planes) if planes else np.zeros(0, np.uint8)}

    def decode_delta(self, stored, base, ctx):
        n, width = ctx.size, math.ceil(ctx.size / 8)
        code = scratch("blocks.code", n, np.uint8)
        code[...] = 0
        for p in range(self.params.bits):
            code |= unpack(stored["codes"][p * width:(p + 1) * width], n).view(np.uint8) << np.uint8(p)
        edited = scratch("blocks.edited", n, np.float32)
        np.take(np.asarray(ctx.state["levels"], np.float32), code, out=edited)
        np.negative(edited, out=edited, where=~unpack(stored["signs"], n))
        return edited

    def serving_form(self, chunks):
        """Packed signs and code planes as rows, and the magnitude table (never decoded)."""
        from ..serve.forms import CodebookDelta, packed_rows

        levels = np.asarray(chunks.context(0).state["levels"], np.float32)
        return CodebookDelta(chunks.shape, packed_rows(chunks, "signs"),
                             tuple(packed_rows(chunks, "codes", p) for p in range(self.params.bits)), levels)
