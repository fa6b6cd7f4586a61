"""The reader trusts nothing and the streaming writer's files load everywhere."""

import json
import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.checkpoint import CheckpointWriter, OutputTensor, open_checkpoint, plan_shards, read_bits
from deltastream.checkpoint.writer import write_at
from deltastream.errors import CheckpointError
from deltastream.plan import chunk_elements, chunk_ranges

from common import make_pair, read_raw, write_safetensors


def test_reader_parses_headers_only_and_chunks_are_mmap_views(tmp_path):
    raw = np.arange(40, dtype="<u2").view(np.uint8)
    write_safetensors(str(tmp_path / "m.safetensors"), {"a": ("BF16", (4, 10), raw)}, {"k": "v"})
    ckpt = open_checkpoint(str(tmp_path / "m.safetensors"))
    info = ckpt.tensors["a"]
    assert (info.shape, info.dtype.name, info.nbytes, ckpt.metadata) == ((4, 10), "BF16", 80, {"k": "v"})
    chunk = read_bits(info, 13, 27)
    assert chunk.base is not None and not chunk.flags.owndata  # a view, not a copy
    assert chunk.tolist() == list(range(13, 27))


def test_reader_rejects_trailing_bytes_and_gaps(tmp_path):
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"a": ("U8", (4,), np.zeros(4, np.uint8))})
    with open(path, "ab") as f:
        f.write(b"xx")
    with pytest.raises(CheckpointError, match="2 bytes after the last tensor"):
        open_checkpoint(path)


def test_unknown_dtype_is_named(tmp_path):
    path = str(tmp_path / "m.safetensors")
    write_safetensors(path, {"a": ("Q4", (4,), np.zeros(4, np.uint8))})
    with pytest.raises(CheckpointError, match=r"tensor 'a' in file '.*m.safetensors': unknown dtype 'Q4'"):
        open_checkpoint(path)


def test_index_and_shards_must_agree(tmp_path):
    base, _ = make_pair(str(tmp_path), {"a": ("F32", (3,)), "b": ("F32", (3,)), "c": ("F32", (3,))}, shards=2)
    index = os.path.join(base, "model.safetensors.index.json")
    doc = json.load(open(index))
    doc["weight_map"]["b"] = doc["weight_map"]["a"] if doc["weight_map"]["b"] != doc["weight_map"]["a"] else \
        doc["weight_map"]["c"]
    json.dump(doc, open(index, "w"))
    with pytest.raises(CheckpointError, match="tensor 'b'"):
        open_checkpoint(base)


def test_chunks_are_whole_rows_when_a_row_fits():
    assert chunk_elements((100, 30), 2, 200) == 90  # 100 elements fit, 3 rows of 30
    assert chunk_elements((10, 30), 2, 500) == 150  # 2 chunks of 5 rows, not 8 + 2
    assert chunk_elements((100, 300), 2, 200) == 100  # a row does not fit: flat ranges
    assert chunk_elements((1000,), 4, 1000) == 250
    assert chunk_elements((1001,), 4, 1000) == 201  # 5 balanced chunks, not 4 x 250 + 1
    assert chunk_elements((7, 3), 4, 1 << 20) == 21  # a small tensor is one chunk of its own size
    assert chunk_elements((0, 3), 4, 1 << 20) == 1
    assert chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_ranges(0, 4) == [(0, 0)]


def test_shards_follow_hugging_face_names_and_index(tmp_path):
    tensors = [OutputTensor(f"t{i}", "F32", (10,)) for i in range(5)]  # 40 B each
    assert [len(s) for s in plan_shards(tensors, 100)] == [2, 2, 1]
    writer = CheckpointWriter(str(tmp_path), tensors, 100)
    writer.create()
    for i, t in enumerate(tensors):
        path, offset = writer.location(t.name)
        write_at(path, offset, np.full(10, i, np.float32))
    assert sorted(os.listdir(tmp_path)) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        "model.safetensors.index.json"]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 200 and index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model-00002-of-00003.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("t3").tolist() == [3.0] * 10


def test_rebuilt_model_loads_with_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      torch_dtype="bfloat16")
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    base_model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in base_model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    base_model.save_pretrained(tmp_path / "ft")
    art = ds.compress(str(tmp_path / "base"), str(tmp_path / "ft"), str(tmp_path / "a.dsz"))
    out = ds.apply(str(tmp_path / "base"), art, str(tmp_path / "out"), max_shard_size="40KB")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.bfloat16)
    expected = base_model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert read_raw(str(tmp_path / "ft")) == read_raw(out)
