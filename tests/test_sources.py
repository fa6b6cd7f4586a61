"""Chunk sources: any [start, stop) of any tensor, read from a checkpoint or decoded from base +
artifact, equals the bits of the checkpoint apply rebuilds; a wrong base is refused; apply records
what made the checkpoint it writes."""

import json
import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.checkpoint import open_checkpoint
from deltastream.dtypes import DTYPES
from deltastream.errors import MismatchError, WrongBaseError
from deltastream.methods import METHODS
from deltastream.sources import ArtifactSource, CheckpointSource, open_model

from common import perturb, random_bits, read_raw, write_checkpoint

SPECS = {"model.embed_tokens.weight": ("BF16", (20, 16)), "model.layers.0.mlp.w": ("BF16", (24, 20)),
         "model.layers.0.norm": ("BF16", (20,)), "model.layers.1.attn.w": ("F32", (16, 12)),
         "model.pos": ("I32", (6,))}
MULTIBIT = ("multibit", {"bits": 2}) if "multibit" in METHODS else ("bitdelta", {"bits": 2})
CASES = {"lossless": ("lossless", {}), "dare": ("dare", {"p": 0.5}), "bitdelta": ("bitdelta", {}),
         "bits2": MULTIBIT, "lowrank": ("lowrank", {"rank_fraction": 0.3})}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base, and a fine-tune whose vocabulary grew and which has a tensor the base lacks."""
    tmp = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(21)
    base = {n: (d, s, random_bits(rng, d, s)) for n, (d, s) in SPECS.items()}
    ft = {n: (d, s, perturb(rng, d, raw)) for n, (d, s, raw) in base.items()}
    embed = ft["model.embed_tokens.weight"][2]
    ft["model.embed_tokens.weight"] = ("BF16", (23, 16), np.concatenate([embed, random_bits(rng, "BF16", (3, 16))]))
    ft["model.new.w"] = ("BF16", (8, 16), random_bits(rng, "BF16", (8, 16)))
    write_checkpoint(str(tmp / "base"), base)
    write_checkpoint(str(tmp / "ft"), ft, metadata={"format": "pt", "origin": "trainer"})
    return tmp


def _bits(raw: tuple) -> np.ndarray:
    dtype, _, data = raw
    return np.frombuffer(data, DTYPES[dtype].bits)


def _ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """Whole, empty, single elements, chunk-aligned, and ranges straddling chunk boundaries."""
    out = [(0, n), (0, 0), (n - 1, n), (0, 1), (min(chunk, n), min(2 * chunk, n))]
    out += [(max(0, b - 3), min(n, b + 5)) for b in range(chunk, n, chunk)]
    out += [(1, n - 1), (chunk // 2, min(n, chunk * 2 + chunk // 2))]
    return [(a, b) for a, b in out if 0 <= a <= b <= n]


@pytest.mark.parametrize("case", CASES)
def test_artifact_sources_read_any_range_as_apply_rebuilds_it(pair, case):
    method, params = CASES[case]
    base = str(pair / "base")
    art = ds.compress(base, str(pair / "ft"), str(pair / f"{case}.dsz"), method, chunk_size=100,
                      include=("*.w",) if method != "lossless" else (), overwrite=True, **params)
    rebuilt = read_raw(ds.apply(base, art, str(pair / f"{case}-out"), overwrite=True))
    model = open_model(art, open_checkpoint(base))
    assert sorted(model.tensors) == sorted(rebuilt)
    for name, source in model.tensors.items():
        assert isinstance(source, ArtifactSource)
        expected = _bits(rebuilt[name])
        assert (source.dtype.name, source.shape) == rebuilt[name][:2]
        for a, b in _ranges(expected.size, source.entry.chunk_elems):
            got = source.read(a, b)
            assert got.dtype == expected.dtype and np.array_equal(got, expected[a:b]), (name, a, b)


def test_checkpoint_sources_and_a_crop(pair):
    model = open_model(str(pair / "ft"))
    raw = read_raw(str(pair / "ft"))
    for name, source in model.tensors.items():
        assert isinstance(source, CheckpointSource)
        bits = _bits(raw[name])
        for a, b in _ranges(bits.size, 7):
            assert np.array_equal(source.read(a, b), bits[a:b])
    embed = model.tensors["model.embed_tokens.weight"].cropped((20, 16))
    assert embed.shape == (20, 16) and np.array_equal(embed.read(0, 320), _bits(raw["model.embed_tokens.weight"])[:320])
    assert model.metadata["origin"] == "trainer" and str(pair / "ft" / "model.safetensors") in model.files


def test_a_wrong_or_missing_base_is_refused(pair, tmp_path):
    art = ds.compress(str(pair / "base"), str(pair / "ft"), str(tmp_path / "a.dsz"))
    with pytest.raises(WrongBaseError, match="wrong base"):
        open_model(art, open_checkpoint(str(pair / "ft")))
    with pytest.raises(MismatchError, match="give the base"):
        open_model(art)


def test_a_corrupt_base_chunk_is_refused_on_read(pair, tmp_path):
    """A base that differs past the 64 KiB checked up front is refused on the chunk read."""
    import shutil

    shutil.copytree(pair / "base", tmp_path / "base")
    art = ds.compress(str(tmp_path / "base"), str(pair / "ft"), str(tmp_path / "a.dsz"), chunk_size=100)
    source = open_model(art, open_checkpoint(str(tmp_path / "base"))).tensors["model.layers.0.mlp.w"]
    with open(source.base.path, "r+b") as f:  # the tensor's last byte, past its first chunk
        f.seek(source.base.offset + source.base.nbytes - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    source.read(0, 10)
    with pytest.raises(WrongBaseError, match="the base differs"):
        source.read(0, source.entry.numel)


def _metadata(folder: str) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        return f.metadata()


def test_apply_records_what_made_a_lossy_rebuild(pair):
    base = str(pair / "base")
    art = ds.compress(base, str(pair / "ft"), str(pair / "prov.dsz"), "dare", p=0.7, seed=9, overwrite=True)
    meta = _metadata(ds.apply(base, art, str(pair / "prov-out"), overwrite=True))
    assert meta["deltastream_method"] == "dare" and meta["deltastream_seed"] == "9"
    assert json.loads(meta["deltastream_params"]) == {"id": "dare", "p": 0.7, "rescale": "inverse", "k": 0.0}
    assert meta["deltastream_artifact"] == ds.info(art)["manifest_sha256"]
    assert meta["origin"] == "trainer" and meta["format"] == "pt"


def test_a_lossless_rebuild_is_the_fine_tune_metadata_included(pair):
    base = str(pair / "base")
    art = ds.compress(base, str(pair / "ft"), str(pair / "prov-l.dsz"), overwrite=True)
    out = ds.apply(base, art, str(pair / "prov-l-out"), overwrite=True)
    assert read_raw(out) == read_raw(str(pair / "ft"))  # the tensors, bit for bit
    assert _metadata(out) == _metadata(str(pair / "ft"))  # and nothing added to the header
