"""Bad input: one readable line naming the file and tensor, a non-zero exit, nothing half-written."""

import json
import os
import struct

import numpy as np
import pytest

from common import error_line, make_pair, run_cli, write_checkpoint


@pytest.fixture
def pair(tmp_path):
    return make_pair(str(tmp_path), {"layers.0.w": ("BF16", (16, 8)), "norm": ("F32", (8,))})


def compress_fails(tmp_path, capsys, base, ft) -> str:
    out = tmp_path / "out.dsz"
    assert run_cli("compress", base, ft, "-o", out, "-q") == 2
    assert not out.exists() and not (tmp_path / "out.dsz.partial").exists()
    return error_line(capsys)


def rewrite_header(path, edit):
    """Apply edit(header_dict) to a safetensors file's header, keeping the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def test_truncated_file(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(ft, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "file truncated" in msg and "tensor 'norm'" in msg


def test_header_length_past_end_of_file(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(base, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 10**6))
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "header length 1000000 runs past the end of the file" in msg


def test_invalid_header_json(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(base, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "invalid header JSON" in msg


def test_data_offsets_outside_the_file(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(ft, "model.safetensors")
    rewrite_header(path, lambda h: h["norm"].update(data_offsets=[10**6, 10**6 + 32]))
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "'norm'" in msg


def test_overlapping_data_offsets(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(ft, "model.safetensors")

    def overlap(h):
        first, second = sorted(h.items(), key=lambda kv: kv[1].get("data_offsets", [0])[0])[-2:]
        b = first[1]["data_offsets"][0]
        second[1]["data_offsets"] = [b, b + second[1]["data_offsets"][1] - second[1]["data_offsets"][0]]
    rewrite_header(path, overlap)
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "overlap" in msg


def test_size_does_not_match_shape(tmp_path, capsys, pair):
    base, ft = pair
    path = os.path.join(ft, "model.safetensors")
    rewrite_header(path, lambda h: h["norm"].update(shape=[9]))
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert path in msg and "tensor 'norm'" in msg and "needs 36" in msg


def test_tensor_missing_from_fine_tune(tmp_path, capsys):
    w = np.zeros(16, np.uint8)
    base = write_checkpoint(str(tmp_path / "b"), {"a": ("U8", (16,), w), "gone": ("U8", (16,), w)})
    ft = write_checkpoint(str(tmp_path / "f"), {"a": ("U8", (16,), w)})
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert "tensor 'gone'" in msg and "missing from the fine-tune" in msg and ft in msg


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_shape_and_dtype_mismatch(tmp_path, capsys, what):
    w = np.zeros(16, np.uint8)
    base = write_checkpoint(str(tmp_path / "b"), {"a": ("U8", (16,), w)})
    other = ("U8", (4, 4), w) if what == "shape" else ("I8", (16,), w)
    ft = write_checkpoint(str(tmp_path / "f"), {"a": other})
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert "tensor 'a'" in msg and f"{what} " in msg and os.path.join(ft, "model.safetensors") in msg


def test_not_a_checkpoint(tmp_path, capsys, pair):
    base, _ = pair
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = compress_fails(tmp_path, capsys, base, str(empty))
    assert str(empty) in msg and "not a checkpoint folder" in msg
    msg = compress_fails(tmp_path, capsys, base, str(tmp_path / "nowhere"))
    assert "no such file" in msg


def test_wrong_base_at_apply_leaves_no_output(tmp_path, capsys, pair):
    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    capsys.readouterr()
    # a base of the same shapes but other contents: refused before any output exists
    other, _ = make_pair(str(tmp_path / "other"), {"layers.0.w": ("BF16", (16, 8)), "norm": ("F32", (8,))}, seed=9)
    out = tmp_path / "rebuilt"
    assert run_cli("apply", other, art, "-o", out, "-q") == 2
    msg = error_line(capsys)
    assert "wrong base" in msg and "tensor '" in msg and other in msg
    assert not out.exists() and not (tmp_path / "rebuilt.partial").exists()
    assert run_cli("verify", art, other) == 2
    assert "wrong base" in error_line(capsys)


def test_base_differing_deep_inside_is_caught_during_apply(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"w": ("F32", (256, 128))})  # 128 KiB: past the 64 KiB head check
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q", "--chunk-size", "16KiB") == 0
    path = os.path.join(base, "model.safetensors")
    with open(path, "r+b") as f:  # flip one bit of the last element
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    out = tmp_path / "rebuilt"
    assert run_cli("apply", base, art, "-o", out, "-q") == 2
    msg = error_line(capsys)
    assert "tensor 'w'" in msg and path in msg and "differs from the one the artifact was made from" in msg
    assert not out.exists() and not (tmp_path / "rebuilt.partial").exists()


def test_corrupt_artifact_chunk_is_reported_by_name(tmp_path, capsys, pair):
    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    chunk = art / "tensors" / "000000" / "delta" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli("verify", art) == 2
    msg = error_line(capsys)
    assert "corrupt artifact chunk" in msg and str(chunk) in msg and "tensor 'layers.0.w'" in msg
    out = tmp_path / "rebuilt"
    assert run_cli("apply", base, art, "-o", out, "-q") == 2
    assert str(chunk) in error_line(capsys)
    assert not out.exists()


def test_missing_artifact_chunk_is_reported(tmp_path, capsys, pair):
    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    chunk = art / "tensors" / "000000" / "delta" / "c" / "0"
    chunk.unlink()
    capsys.readouterr()
    assert run_cli("verify", art) == 2
    assert "corrupt artifact chunk (missing)" in error_line(capsys)
    assert run_cli("verify", art, base) == 2
    assert "tensor 'layers.0.w'" in error_line(capsys)


def test_not_an_artifact(tmp_path, capsys, pair):
    base, _ = pair
    assert run_cli("info", base) == 2
    assert "not a deltastream artifact" in error_line(capsys)


def test_output_exists_is_refused_without_overwrite(tmp_path, capsys, pair):
    base, ft = pair
    out = tmp_path / "a.dsz"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert run_cli("compress", base, ft, "-o", out, "-q") == 2
    assert "exists; pass --overwrite" in error_line(capsys)
    assert (out / "keep").read_text() == "mine"
    assert run_cli("compress", base, ft, "-o", out, "-q", "--overwrite") == 0
    assert not (out / "keep").exists()


def test_output_over_an_input_is_refused_even_with_overwrite(tmp_path, capsys, pair):
    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    capsys.readouterr()
    before = open(os.path.join(base, "model.safetensors"), "rb").read()
    assert run_cli("apply", base, art, "-o", base, "-q", "--overwrite") == 2
    assert "would overwrite the input" in error_line(capsys)
    assert open(os.path.join(base, "model.safetensors"), "rb").read() == before


def test_bad_sizes_are_clear(tmp_path, capsys, pair):
    base, ft = pair
    assert run_cli("compress", base, ft, "-o", tmp_path / "x.dsz", "--chunk-size", "lots") == 2
    assert "invalid chunk size 'lots'" in error_line(capsys)


def test_inputs_are_never_modified(tmp_path, capsys, pair):
    base, ft = pair
    snapshot = {p: open(os.path.join(d, p), "rb").read() for d in (base, ft) for p in os.listdir(d)}
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    assert run_cli("apply", base, art, "-o", tmp_path / "out", "-q") == 0
    assert snapshot == {p: open(os.path.join(d, p), "rb").read() for d in (base, ft) for p in os.listdir(d)}


def test_index_naming_a_missing_shard(tmp_path, capsys, pair):
    base, ft = pair
    with open(os.path.join(ft, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"norm": "model-00002-of-00002.safetensors"}}, f)
    msg = compress_fails(tmp_path, capsys, base, ft)
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


def test_full_disk_fails_before_the_heavy_work(tmp_path, capsys, pair, monkeypatch):
    import deltastream.checkpoint.writer as writer

    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    capsys.readouterr()

    class Full:
        f_bavail, f_frsize = 0, 4096
    monkeypatch.setattr(writer.os, "statvfs", lambda path: Full)
    out = tmp_path / "rebuilt"
    assert run_cli("apply", base, art, "-o", out, "-q") == 2
    msg = error_line(capsys)
    assert "not enough disk space for the output" in msg and str(out) in msg
    assert not out.exists() and not (tmp_path / "rebuilt.partial").exists()


def test_disk_filling_up_midway_names_file_and_tensor(tmp_path, capsys, pair, monkeypatch):
    import errno

    import deltastream.checkpoint.writer as writer

    base, ft = pair
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    capsys.readouterr()

    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.os, "pwrite", no_space)
    out = tmp_path / "rebuilt"
    assert run_cli("apply", base, art, "-o", out, "-q", "--workers", "1") == 2
    msg = error_line(capsys)
    assert "No space left on device" in msg and "tensor '" in msg and "model.safetensors" in msg
    assert not out.exists() and not (tmp_path / "rebuilt.partial").exists()
