"""TIES trim keeps exactly round(density * n) of the largest |delta| (per tensor, or over every
trimmed tensor), ties at the threshold broken by position (later kept), and equals a dense
reference bit for bit for any chunking and worker count."""

import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.errors import ParameterError

from common import check_edit_matches, make_pair, read_raw, tensor_f32, write_checkpoint

SPECS = {"model.embed_tokens.weight": ("BF16", (32, 8)), "layers.0.mlp.w": ("BF16", (48, 40)),
         "layers.0.attn.w": ("F32", (33, 17)), "layers.0.norm": ("BF16", (40,)),
         "layers.1.mlp.w": ("F16", (16, 64))}
TRIMMED = ["layers.0.mlp.w", "layers.0.attn.w", "layers.1.mlp.w"]  # checkpoint order; >= 2-D, not embeddings


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("trim"))
    return tmp, *make_pair(tmp, SPECS, seed=7)


def keep_mask(deltas, density):
    """Reference: rank (|delta|, position) over the concatenated deltas by a stable argsort and
    keep the k = round(density * n) highest ranks."""
    flat = np.concatenate([d.reshape(-1) for d in deltas])
    order = np.argsort(np.abs(flat).view(np.uint32), kind="stable")
    k = round(density * flat.size)
    keep = np.zeros(flat.size, bool)
    keep[order[flat.size - k:]] = True
    return np.split(keep, np.cumsum([d.size for d in deltas])[:-1])


def deltas(pair, names):
    _, base, ft = pair
    return [tensor_f32(ft, n) - tensor_f32(base, n) for n in names]


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("density", [0.2, 0.55, 1.0])
def test_trim_equals_the_dense_reference(pair, scope, density):
    tmp, base, ft = pair
    out = ds.edit(base, ft, os.path.join(tmp, f"{scope}-{density}"), "trim", density=density, scope=scope,
                  chunk_size=256)
    ds_ = deltas(pair, TRIMMED)
    masks = keep_mask(ds_, density) if scope == "global" else [keep_mask([d], density)[0] for d in ds_]
    if scope == "global" and density < 1:  # the whole-model top-k is not the per-tensor one
        assert any(not np.array_equal(m, keep_mask([d], density)[0]) for m, d in zip(masks, ds_))
    for name, d, keep in zip(TRIMMED, ds_, masks):
        check_edit_matches(tmp, base, ft, out, name, np.where(keep.reshape(d.shape), d, np.float32(0)), SPECS[name][0])
    raw, fraw = read_raw(out), read_raw(ft)
    for name in ("layers.0.norm", "model.embed_tokens.weight"):  # 1-D and embeddings: exact by default
        assert raw[name] == fraw[name]


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_identical_bits_for_any_chunk_size_and_worker_count(pair, scope):
    tmp, base, ft = pair
    outs = [read_raw(ds.edit(base, ft, os.path.join(tmp, f"inv-{scope}-{c}-{w}"), "trim", density=0.3, scope=scope,
                             chunk_size=c, workers=w))
            for c, w in [(None, 1), (64, 1), (64, 2), (1024, 2), (None, 2)]]
    assert all(o == outs[0] for o in outs[1:])


def test_exact_kept_count_and_the_tie_rule(tmp_path):
    # base zero, so the output is the edited delta itself; heavy ties and exact zeros
    rng = np.random.default_rng(0)
    shapes = {"a.w": (20, 30), "b.w": (7, 11)}
    base, ft = {}, {}
    for name, shape in shapes.items():
        v = rng.choice(np.float32([-3e-3, -1e-3, 0, 1e-3, 2e-3, 3e-3]), size=shape, p=[.1, .3, .2, .2, .1, .1])
        base[name] = ("F32", shape, np.zeros(shape, np.float32).view(np.uint8).reshape(-1))
        ft[name] = ("F32", shape, v.astype(np.float32).view(np.uint8).reshape(-1))
    b = write_checkpoint(str(tmp_path / "b"), base)
    f = write_checkpoint(str(tmp_path / "f"), ft)
    for scope in ("tensor", "global"):
        for density in (0.1, 0.37, 0.5, 0.9):
            out = ds.edit(b, f, str(tmp_path / f"{scope}{density}"), "trim", density=density, scope=scope,
                          chunk_size=100)
            got = [tensor_f32(out, n).reshape(-1) for n in shapes]
            full = [tensor_f32(f, n).reshape(-1) for n in shapes]
            sizes = [v.size for v in full]
            groups = [[0, 1]] if scope == "global" else [[0], [1]]
            for g in groups:
                kept = np.concatenate([got[i] != 0 for i in g])
                mags = np.abs(np.concatenate([full[i] for i in g]))
                k = round(density * sum(sizes[i] for i in g))
                assert kept.sum() == min(k, (mags != 0).sum())  # exactly k (zeros are kept as zeros)
                if k and kept.any():
                    t = mags[kept].min()  # the threshold magnitude: all above kept, none below
                    assert kept[mags > t].all() and not kept[mags < t].any()
                    tied = np.flatnonzero(mags == t)
                    kept_tied = tied[kept[tied]]
                    assert np.array_equal(kept_tied, tied[tied.size - kept_tied.size:])  # the later ones
            for g, o in zip(full, got):
                assert np.array_equal(np.where(o != 0, g, 0), o)  # kept values are unchanged


def test_parameters_and_no_compact_form(pair, tmp_path):
    _, base, ft = pair
    for params, message in [({"density": 0.0}, "density=0.0 is out of range"),
                            ({"density": 1.5}, "density=1.5 is out of range"),
                            ({"scope": "layer"}, "must be one of tensor, global")]:
        with pytest.raises(ParameterError, match=message):
            ds.edit(base, ft, str(tmp_path / "never"), "trim", **params)
    with pytest.raises(ParameterError, match="no compact form"):
        ds.compress(base, ft, str(tmp_path / "x.dsz"), "trim")
    assert not (tmp_path / "never").exists()
