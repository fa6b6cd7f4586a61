"""Streaming rank thresholds (deltastream.ranks) equal a dense stable argsort, ties broken by
position, for any chunking, digit split and tree of folds; heavy ties split exactly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deltastream import ranks
from deltastream.methods.base import combine_partials


def chunk_bits(c):
    return ranks.magnitude_bits(c.copy())

def tree_fold(parts, fan_in=3):
    """Fold partials in order, in a tree like the engine's (associativity is part of the contract)."""
    while len(parts) > 1:
        parts = [_fold(parts[i:i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _fold(group):
    out = None
    for p in group:
        out = combine_partials(out, p)
    return out


def streamed(tensors, rank_fn, widths, chunk):
    """Run the passes over {name: float32 values} (in order) cut into chunks; return the search
    and each tensor's blocks."""
    chunks = [(name, i, v[s:s + chunk]) for name, v in tensors.items()
              for i, s in enumerate(range(0, max(1, v.size), chunk))]
    bits = chunk_bits
    search = None
    for level in range(len(widths)):
        hist = tree_fold([{"hist": ranks.histogram(bits(c), search)} for _, _, c in chunks])["hist"]
        if level == 0:
            n = int(hist.sum())
            search = ranks.new_search(n, rank_fn(n), widths)
        search = ranks.refine(search, hist)
    records = tree_fold([ranks.tie_partial(bits(c), search, (name, i)) for name, i, c in chunks])["ties_list"]
    offsets = ranks.tie_offsets(search, records)
    blocks = {name: [] for name in tensors}
    for name, i, c in chunks:
        blocks[name].append(ranks.assign(bits(c), search, offsets[name][i]))
    return search, {name: np.concatenate(b) for name, b in blocks.items()}


def dense(values, boundaries):
    """Reference: the rank of each element (stable argsort: ties by position), its block, and
    each boundary's (value, how many of its ties rank below it)."""
    bits = np.abs(values).view(np.uint32)
    order = np.argsort(bits, kind="stable")
    rank = np.empty(bits.size, np.int64)
    rank[order] = np.arange(bits.size)
    block = np.searchsorted(np.array(boundaries, np.int64), rank, side="right")
    sorted_bits = bits[order]
    found = [(int(sorted_bits[r]), r - int((bits < sorted_bits[r]).sum())) for r in boundaries if r < bits.size]
    return block, found


def equal_blocks(m):
    return lambda n: [b * n // (m + 1) for b in range(1, m + 1)]


def heavy_ties(rng, n, zeros=0.6):
    """Gaussian magnitudes with many exact zeros (spanning several boundaries) and a repeated value."""
    v = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    v[rng.random(n) < zeros] = 0
    v[rng.random(n) < 0.1] = np.float32(-1e-3)  # ties of a nonzero magnitude, either sign
    return v


CASES = [(m, chunk) for m in (1, 3, 7, 15, 31) for chunk in (29, 1000, 10**6)] + [(31, 3), (1, 5)]


@pytest.mark.parametrize("m,chunk", CASES)
def test_blocks_and_thresholds_equal_the_dense_reference(m, chunk):
    rng = np.random.default_rng(m)
    tensors = {"a": heavy_ties(rng, 700), "b": heavy_ties(rng, 333, zeros=0.3), "c": heavy_ties(rng, 5)}
    search, got = streamed(tensors, equal_blocks(m), ranks.digit_widths(m), chunk)
    whole = np.concatenate(list(tensors.values()))
    block, found = dense(whole, equal_blocks(m)(whole.size))
    assert np.array_equal(np.concatenate([got[k] for k in tensors]), block)
    values, below = ranks.thresholds(search)
    assert list(zip(values.tolist(), below)) == found
    sizes = np.diff([0, *equal_blocks(m)(whole.size), whole.size])
    assert np.bincount(block, minlength=m + 1).tolist() == sizes.tolist()


def test_both_digit_splits_agree():
    rng = np.random.default_rng(1)
    tensors = {"w": heavy_ties(rng, 2000)}
    fn = equal_blocks(7)
    assert ranks.digit_widths(7) == [16, 16] and ranks.digit_widths(15) == [16, 8, 8]
    s1, b1 = streamed(tensors, fn, [16, 16], 77)
    s2, b2 = streamed(tensors, fn, [16, 8, 8], 77)
    assert np.array_equal(b1["w"], b2["w"])
    assert ranks.thresholds(s1)[0].tolist() == ranks.thresholds(s2)[0].tolist()


@pytest.mark.parametrize("rank_fn", [lambda n: [0], lambda n: [n], lambda n: [0, 0, n, n], lambda n: [n // 2] * 3])
def test_boundaries_at_the_ends_and_repeated(rank_fn):
    rng = np.random.default_rng(2)
    tensors = {"w": heavy_ties(rng, 100)}
    _, got = streamed(tensors, rank_fn, [16, 16], 9)
    block, _ = dense(tensors["w"], rank_fn(100))
    assert np.array_equal(got["w"], block)


def test_an_empty_group_and_all_equal_values():
    _, got = streamed({"e": np.zeros(0, np.float32)}, equal_blocks(3), [16, 16], 4)
    assert got["e"].size == 0
    _, got = streamed({"z": np.zeros(10, np.float32)}, equal_blocks(3), [16, 16], 3)
    assert got["z"].tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # pure position order
    tied = ranks.tied_blocks(ranks.refine(ranks.refine(ranks.new_search(10, [2, 5, 7], [16, 16]),
                                                       np.eye(1, 1 << 16, dtype=np.int64) * 10),
                                          np.eye(1, 1 << 16, dtype=np.int64) * 10))
    assert tied == [(0, 0, 2), (0, 1, 3), (0, 2, 2), (0, 3, 3)]


def test_chunks_out_of_order_are_refused():
    search = ranks.new_search(4, [2], [16, 16])
    hist = np.zeros((1, 1 << 16), np.int64)
    hist[0, 0] = 4
    search = ranks.refine(ranks.refine(search, hist), hist)
    with pytest.raises(ValueError, match="out of order"):
        ranks.tie_offsets(search, [(("w", 1), (2,)), (("w", 0), (2,))])
    with pytest.raises(ValueError, match="different data"):
        ranks.tie_offsets(search, [(("w", 0), (1,))])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 400), chunk=st.integers(1, 450), m=st.integers(1, 20),
       split=st.sampled_from([[16, 16], [16, 8, 8]]))
def test_property_any_chunking(seed, n, chunk, m, split):
    rng = np.random.default_rng(seed)
    values = heavy_ties(rng, n, zeros=rng.random())
    values[rng.random(n) < 0.2] = np.float32(2e-3)  # more ties
    cut = int(rng.integers(0, n + 1))
    tensors = {"x": values[:cut], "y": values[cut:]}
    def rank_fn(total):
        return sorted(int(r) for r in np.random.default_rng(seed).integers(0, total + 1, m))

    search, got = streamed(tensors, rank_fn, split, chunk)
    block, found = dense(values, rank_fn(n))
    assert np.array_equal(np.concatenate([got["x"], got["y"]]), block)
    assert list(zip(ranks.thresholds(search)[0].tolist(), ranks.thresholds(search)[1])) == found


# --- tie-heavy inputs: bf16 fine-tunes' |delta| take a few values per exponent --------------------
def bf16_ulp_deltas(rng, n, ulps=4, exponents=3):
    """|delta| of a bf16 fine-tune 1..ulps ulps off its base: k * 2^e for a few exponents e, so
    nearly every element ties with thousands of others (the rank kernels' one-value and
    many-value paths both)."""
    k = rng.integers(1, ulps + 1, n).astype(np.float32)
    e = rng.integers(-14, -14 + exponents, n)
    return (k * np.exp2(e) * rng.choice(np.float32([-1, 1]), n)).astype(np.float32)


def streamed_on_threads(tensors, rank_fn, widths, chunk, workers):
    """``streamed`` with every pass's per-chunk partials computed on ``workers`` threads at once
    (the kernels release the GIL), then folded in order, as the engine does."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [(name, i, v[s:s + chunk]) for name, v in tensors.items()
              for i, s in enumerate(range(0, max(1, v.size), chunk))]
    bits = chunk_bits
    with ThreadPoolExecutor(workers) as pool:
        search = None
        for _ in range(len(widths)):
            parts = list(pool.map(lambda c, search=search: {"hist": ranks.histogram(bits(c[2]), search)}, chunks))
            hist = tree_fold(parts)["hist"]
            search = ranks.refine(search or ranks.new_search(int(hist.sum()), rank_fn(int(hist.sum())), widths), hist)
        records = tree_fold(list(pool.map(lambda c: ranks.tie_partial(bits(c[2]), search, c[:2]), chunks)))
        offsets = ranks.tie_offsets(search, records["ties_list"])
        blocks = list(pool.map(lambda c: ranks.assign(bits(c[2]), search, offsets[c[0]][c[1]]), chunks))
    return search, {name: np.concatenate([b for c, b in zip(chunks, blocks) if c[0] == name]) for name in tensors}


def TOP_HALF(n):  # noqa: N802 (a constant of the parametrisation below)
    return [n - n // 2]  # trim's one boundary (density 0.5)


@pytest.mark.parametrize("rank_fn", [TOP_HALF, lambda n: [n // 3, n // 3 + n // 2], equal_blocks(3), equal_blocks(40)],
                         ids=["trim", "two", "blocks4", "blocks41"])
def test_tie_heavy_blocks_equal_the_dense_reference_for_any_chunking_and_threads(rank_fn):
    rng = np.random.default_rng(5)
    tensors = {"embed": bf16_ulp_deltas(rng, 3001), "w": bf16_ulp_deltas(rng, 1999, exponents=1),
               "norm": bf16_ulp_deltas(rng, 17, ulps=1)}
    whole = np.concatenate(list(tensors.values()))
    block, found = dense(whole, rank_fn(whole.size))
    assert len(np.unique(np.abs(whole))) <= 12  # the case in point: a handful of values for 5017 elements
    results = [streamed(tensors, rank_fn, ranks.digit_widths(len(rank_fn(whole.size))), chunk)
               for chunk in (7, 256, 1000, 4096)]  # chunks cut runs of ties everywhere
    results += [streamed_on_threads(tensors, rank_fn, ranks.digit_widths(len(rank_fn(whole.size))), 333, w)
                for w in (2, 4)]
    for search, got in results:
        assert np.array_equal(np.concatenate([got[k] for k in tensors]), block)
        values, below = ranks.thresholds(search)
        assert list(zip(values.tolist(), below)) == found


def test_classify_and_tie_counts_match_numpy():
    rng = np.random.default_rng(9)
    bits = ranks.magnitude_bits(bf16_ulp_deltas(rng, 5000, exponents=12))  # ~26 values
    for m in (1, 2, 5, 17, 60):  # one threshold value, a few, more than the 16 of the counting passes
        search = ranks.new_search(bits.size, equal_blocks(m)(bits.size), ranks.digit_widths(m))
        search = ranks.refine(search, ranks.histogram(bits))
        while search["level"] < len(search["widths"]):
            search = ranks.refine(search, ranks.histogram(bits, search))
        cut = ranks.Cut(search)
        assert (cut.values.size == 1) == (m == 1) and (cut.values.size > 16) == (m == 60)
        below, tied, which = ranks.classify(bits, cut)
        assert np.array_equal(below, np.searchsorted(cut.t, bits, side="left"))
        want = np.flatnonzero(np.isin(bits, cut.values))
        assert np.array_equal(tied, want) and np.array_equal(cut.values[which], bits[want])
        counts = ranks.tie_partial(bits, search, ("w", 0))["ties_list"][0][1]
        assert list(counts) == [int((bits == v).sum()) for v in cut.values]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 600), chunk=st.integers(1, 700), m=st.integers(1, 24),
       ulps=st.integers(1, 4), exponents=st.integers(1, 5))
def test_property_tie_heavy_any_chunking(seed, n, chunk, m, ulps, exponents):
    rng = np.random.default_rng(seed)
    values = bf16_ulp_deltas(rng, n, ulps, exponents)
    values[rng.random(n) < 0.05] = 0  # elements that round away
    cut = int(rng.integers(0, n + 1))
    tensors = {"x": values[:cut], "y": values[cut:]}
    def rank_fn(total):
        return sorted(int(r) for r in np.random.default_rng(seed).integers(0, total + 1, m))

    search, got = streamed(tensors, rank_fn, ranks.digit_widths(m), chunk)
    block, found = dense(values, rank_fn(n))
    assert np.array_equal(np.concatenate([got["x"], got["y"]]), block)
    assert list(zip(ranks.thresholds(search)[0].tolist(), ranks.thresholds(search)[1])) == found
