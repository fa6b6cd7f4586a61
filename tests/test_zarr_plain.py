"""Every stored array of an artifact, of every compact method, read with plain zarr and
numcodecs (no deltastream code reads them): the format promises any zarr v3 reader can."""

from __future__ import annotations

import json
import os

import crc32c
import numcodecs
import numpy as np
import pytest
import zarr

import deltastream as ds
from deltastream.methods import METHODS

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN_CASES = sorted(n[:-4] for n in os.listdir(os.path.join(GOLDEN, "artifacts")))
COMPACT = sorted(name for name, cls in METHODS.items() if cls.compact)


def numcodecs_chain(meta: dict) -> list:
    """The numcodecs codecs for the compressors of a zarr.json (bytes and crc32c done by hand)."""
    out = []
    for codec in meta["codecs"]:
        config = codec.get("configuration", {})
        if codec["name"] == "blosc":
            shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
            out.append(numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"], shuffle=shuffle))
        elif codec["name"] == "zstd":
            out.append(numcodecs.Zstd(level=config["level"]))
        else:
            assert codec["name"] in ("bytes", "crc32c") and config.get("endian", "little") == "little"
    return out


def check_plain(art: str) -> int:
    """Open every array the manifest names with zarr.open_array, decode each chunk file with
    numcodecs, and compare both with the CRC-32C the manifest records; returns arrays seen."""
    with open(os.path.join(art, "zarr.json")) as f:
        doc = json.load(f)["attributes"]["deltastream"]
    seen = 0
    for t in doc["tensors"]:
        for role, crcs in t["stored_crc32c"].items():
            folder = os.path.join(art, t["key"], role)
            array = zarr.open_array(folder, mode="r")
            with open(os.path.join(folder, "zarr.json")) as f:
                meta = json.load(f)
            assert array.ndim == 1 and array.dtype == np.dtype(meta["data_type"])
            assert array.dtype.kind in "uif" and array.shape == tuple(meta["shape"])
            if role.startswith("state."):  # one chunk of float32 scales, of the shape the attributes give
                assert array.dtype == np.float32 and array.size == np.prod(array.attrs["shape"], dtype=int)
            (chunk_len,) = array.chunks
            data = array[:]  # zarr checks each chunk's CRC-32C
            for i, crc in enumerate(crcs):
                valid = data[i * chunk_len:(i + 1) * chunk_len]
                path = os.path.join(folder, "c", str(i))
                if not os.path.exists(path):  # an unchanged chunk: nothing stored, zarr reads zeros
                    assert not valid.any()
                    continue
                raw = open(path, "rb").read()
                assert crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little")
                decoded = raw[:-4]
                for codec in reversed(numcodecs_chain(meta)):
                    decoded = codec.decode(decoded)
                chunk = np.frombuffer(decoded, array.dtype)
                assert chunk.size == chunk_len and (chunk[:valid.size] == valid).all()
                assert crc32c.crc32c(np.ascontiguousarray(valid).view(np.uint8)) == crc
            seen += 1
    for key in doc["side_files"].values():
        assert zarr.open_array(os.path.join(art, key), mode="r").dtype == np.uint8
    return seen


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_artifact_arrays_are_plain_zarr(case):
    assert check_plain(os.path.join(GOLDEN, "artifacts", f"{case}.dsz")) >= 5


@pytest.mark.parametrize("method", COMPACT)
def test_fresh_artifact_arrays_are_plain_zarr(tmp_path, method, golden_pair):
    art = ds.compress(*golden_pair, str(tmp_path / "a.dsz"), method, chunk_size=1024, workers=1)
    assert check_plain(art) >= 5
