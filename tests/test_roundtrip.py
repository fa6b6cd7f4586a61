"""Lossless round trips are bit-exact for every dtype, layout and odd shape, for any chunking."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltastream as ds

from common import ITEMSIZE, check_roundtrip, make_pair, read_raw

ODD_SHAPES = {"matrix": (37, 19), "vector": (101,), "scalar": (), "empty": (0, 5), "cube": (3, 4, 5)}


@pytest.mark.parametrize("dtype", sorted(ITEMSIZE))
@pytest.mark.parametrize("shards", [1, 3])
def test_every_dtype_round_trips_bit_exact(tmp_path, dtype, shards):
    specs = {f"{dtype}.{k}": (dtype, shape) for k, shape in ODD_SHAPES.items()}
    base, ft = make_pair(str(tmp_path), specs, shards=shards)
    check_roundtrip(str(tmp_path), base, ft, chunk_size=64)  # 64 B: many chunks, none aligned


def test_side_files_and_metadata_travel(tmp_path):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (8, 8))},
                         side_files={"config.json": '{"a": 1}', "tokenizer.json": "{}",
                                     "chat_template.jinja": "{{ x }}"})
    art = check_roundtrip(str(tmp_path), base, ft)
    out = ds.apply(base, art, str(tmp_path / "again"))
    assert sorted(f for f in os.listdir(out) if not f.endswith(".safetensors")) == [
        "chat_template.jinja", "config.json", "tokenizer.json"]
    assert open(os.path.join(out, "config.json")).read() == '{"a": 1}'
    assert ds.info(art)["side_files"] == ["chat_template.jinja", "config.json", "tokenizer.json"]


def test_unchanged_tensor_is_recorded_not_stored(tmp_path):
    base, ft = make_pair(str(tmp_path), {"w": ("F32", (64, 64))})
    art = check_roundtrip(str(tmp_path), base, base)
    entry = ds.info(art)["tensors"][0]
    assert entry["unchanged"]
    assert os.listdir(os.path.join(art, "tensors", "000000", "delta", "c")) == []


def test_tensor_new_in_fine_tune_is_stored_whole(tmp_path):
    from common import write_checkpoint

    rng = np.random.default_rng(1)
    w = rng.integers(0, 255, 64, dtype=np.uint8)
    base = write_checkpoint(str(tmp_path / "b"), {"w": ("U8", (64,), w)})
    ft = write_checkpoint(str(tmp_path / "f"), {"w": ("U8", (64,), w), "extra": ("F32", (4,), w[:16])})
    art = check_roundtrip(str(tmp_path), base, ft)
    assert {t["name"]: t["policy"] for t in ds.info(art)["tensors"]}["extra"] == "new"


def test_unsafe_tensor_names_round_trip_inside_the_store(tmp_path):
    names = ["../x", "/abs", "a" * 5000, "ünïcødé.权重", "..", "c/0", "zarr.json"]
    base, ft = make_pair(str(tmp_path / "in"), {n: ("F16", (3, 2)) for n in names})
    art = check_roundtrip(str(tmp_path / "in"), base, ft)
    outside = set(os.listdir(tmp_path))
    assert outside == {"in"}  # nothing written beside the inputs' folder
    for _folder, dirs, files in os.walk(art):
        for f in dirs + files:
            assert f.isascii() and len(f) < 20  # only index-derived paths in the store
    assert {t["name"] for t in ds.info(art)["tensors"]} == set(names)



@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=2, max_value=3000), workers=st.integers(min_value=1, max_value=3),
       scheduler=st.sampled_from(["threads", "sync"]))
def test_output_is_identical_for_any_chunk_size_and_worker_count(tmp_path_factory, chunk, workers, scheduler):
    tmp = str(tmp_path_factory.mktemp("inv"))
    base, ft = make_pair(tmp, {"w": ("BF16", (33, 17)), "b": ("F32", (7,)), "i": ("I8", (50,))}, seed=3)
    check_roundtrip(tmp, base, ft, chunk_size=chunk, workers=workers, scheduler=scheduler)


def test_same_inputs_give_the_same_artifact_chunks(tmp_path):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (64, 64))})
    a = ds.compress(base, ft, str(tmp_path / "a.dsz"), chunk_size=1024, workers=1)
    b = ds.compress(base, ft, str(tmp_path / "b.dsz"), chunk_size=1024, workers=2)

    def chunks(p):
        return {f: open(os.path.join(p, "tensors/000000/delta/c", f), "rb").read()
                for f in os.listdir(os.path.join(p, "tensors/000000/delta/c"))}
    assert chunks(a) == chunks(b)
    assert read_raw(ft)  # sanity: the fixture is non-empty
