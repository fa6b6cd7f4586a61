"""Multi-bit BitDelta by magnitude blocks (the method multibit): 2^b equal-count blocks of |delta| per
tensor, each at its exact mean magnitude, signs kept. It equals a dense reference bit for bit, its
error falls with b, apply of its artifact equals edit, and chunking does not matter."""

import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.exact import magnitude_sum, total
from deltastream.methods import BitDelta, get_method, method_from_config
from deltastream.methods.multibit import MultiBit

from common import check_edit_matches, make_pair, read_raw, tensor_f32, write_checkpoint

SPECS = {"layers.0.mlp.w": ("BF16", (48, 40)), "layers.0.attn.w": ("F32", (33, 17)),
         "layers.1.mlp.w": ("F16", (16, 64)), "layers.0.norm": ("BF16", (40,))}
EDITED = [n for n, (_, shape) in SPECS.items() if len(shape) == 2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("multibit"))
    return tmp, *make_pair(tmp, SPECS, seed=11)


def reference(d, bits, scale=1.0):
    """The formula on a whole tensor: stable argsort ranks (ties by position), blocks of ranks
    [floor(b n / M), floor((b+1) n / M)), each magnitude -> its block's exact mean * scale."""
    flat = d.reshape(-1)
    n, m = flat.size, 2**bits
    mag = np.abs(flat)
    rank = np.empty(n, np.int64)
    rank[np.argsort(mag.view(np.uint32), kind="stable")] = np.arange(n)
    block = np.searchsorted([b * n // m for b in range(1, m)], rank, side="right")
    levels = np.array([np.float32(total(magnitude_sum(mag[block == b])) / (block == b).sum() * scale)
                       if (block == b).any() else 0 for b in range(m)], np.float32)
    return (np.where(flat >= 0, np.float32(1), np.float32(-1)) * levels[block]).reshape(d.shape), levels


def run(pair, method, tag, **kw):
    tmp, base, ft = pair
    return ds.edit(base, ft, os.path.join(tmp, tag), method, overwrite=True, **kw)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_equals_the_dense_reference(pair, bits):
    tmp, base, ft = pair
    out = run(pair, MultiBit(bits=bits, scale=1.25 if bits == 2 else 1.0), f"ref{bits}", chunk_size=200)
    for name in EDITED:
        d = tensor_f32(ft, name) - tensor_f32(base, name)
        check_edit_matches(tmp, base, ft, out, name, reference(d, bits, 1.25 if bits == 2 else 1.0)[0], SPECS[name][0])
    assert read_raw(out)["layers.0.norm"] == read_raw(ft)["layers.0.norm"]
    # by name, from the registry
    assert read_raw(run(pair, "multibit", f"reg{bits}", bits=bits, scale=1.25 if bits == 2 else 1.0)) == read_raw(out)


def zero_base_pair(tmp, values):
    """A base of zeros and a fine-tune of ``values`` (F32): the output is the edited delta itself."""
    base = {k: ("F32", v.shape, np.zeros(v.shape, np.float32).view(np.uint8).reshape(-1)) for k, v in values.items()}
    ft = {k: ("F32", v.shape, v.astype(np.float32).view(np.uint8).reshape(-1)) for k, v in values.items()}
    return write_checkpoint(os.path.join(tmp, "b"), base), write_checkpoint(os.path.join(tmp, "f"), ft)


def test_distinct_magnitudes_exact_block_counts_and_falling_error(tmp_path):
    rng = np.random.default_rng(3)
    gauss = (rng.standard_normal((64, 50)) * 1e-3).astype(np.float32)
    tied = gauss.copy()
    tied[rng.random(tied.shape) < 0.45] = 0  # exact zeros spanning several block boundaries
    b, f = zero_base_pair(str(tmp_path), {"g.w": gauss, "t.w": tied})
    errors = []
    for bits in range(0, 5):
        method = MultiBit(bits=bits) if bits else "bitdelta"
        out = ds.edit(b, f, str(tmp_path / f"o{bits}"), method, chunk_size=512)
        g = tensor_f32(out, "g.w")
        if bits:
            assert np.unique(np.abs(g)).size == 2**bits
            expected, levels = reference(tied, bits)
            got = tensor_f32(out, "t.w")
            assert np.array_equal(got, expected)
            for level in range(2**bits):  # each block has floor((b+1)n/M) - floor(bn/M) elements
                count = ((got == levels[level]) | (got == -levels[level])).sum()
                if np.unique(levels).size == levels.size:
                    assert count == (level + 1) * tied.size // 2**bits - level * tied.size // 2**bits
        errors.append(float(np.linalg.norm((g - gauss).astype(np.float64)) / np.linalg.norm(gauss.astype(np.float64))))
    assert all(a > c for a, c in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("bits", [1, 3, 4])
def test_apply_of_the_artifact_equals_edit(pair, bits):
    tmp, base, ft = pair
    method = MultiBit(bits=bits)
    art = ds.compress(base, ft, os.path.join(tmp, f"mb{bits}.dsz"), method, chunk_size=300, overwrite=True)
    applied = ds.apply(base, art, os.path.join(tmp, f"mb{bits}-applied"), overwrite=True)
    assert read_raw(applied) == read_raw(run(pair, method, f"mb{bits}-edited", chunk_size=1000))
    ds.verify(art, base)
    entry = next(t for t in ds.info(art)["tensors"] if t["name"] == "layers.0.mlp.w")
    n = 48 * 40
    assert entry["stored_bytes"] <= (bits + 1) * n / 8 + 4096  # signs + bits planes, raw


@pytest.mark.parametrize("bits", [2, 4])
def test_identical_bits_for_any_chunk_size_and_worker_count(pair, bits):
    outs = [read_raw(run(pair, MultiBit(bits=bits), f"inv{bits}-{c}-{w}", chunk_size=c, workers=w))
            for c, w in [(None, 1), (64, 1), (64, 2), (1024, 2), (333, 2)]]
    assert all(o == outs[0] for o in outs[1:])


def test_parameters_are_checked():
    from deltastream.errors import ParameterError

    for kw, message in [({"bits": 0}, "bits=0 is out of range"), ({"bits": 9}, "bits=9 is out of range"),
                        ({"bits": 2, "scale": 0.0}, "scale=0.0 is out of range")]:
        with pytest.raises(ParameterError, match=message):
            MultiBit(**kw)
    m = MultiBit(bits=3, scale=0.5)
    assert m.get_config() == {"id": "multibit", "bits": 3, "scale": 0.5}
    assert MultiBit.from_config(m.get_config()) == m


def test_bitdelta_bits_is_refused_and_legacy_configs_read_as_multibit():
    from deltastream.errors import ParameterError

    with pytest.raises(ParameterError, match="multibit -p bits=2"):
        get_method("bitdelta", bits=2)
    # manifests written before multibit had its own id: bits >= 1 is multibit, bits 0 plain bitdelta
    legacy = {"id": "bitdelta", "scale": 0.5, "per": "tensor", "bits": 3, "residual": 0, "zero": "plus"}
    assert method_from_config(legacy) == MultiBit(bits=3, scale=0.5)
    assert method_from_config({**legacy, "bits": 0}) == BitDelta(scale=0.5)
