"""An artifact is untrusted input (issue 9, cases 5, 6, 19, 21, 23): every manifest field and
array metadata file is checked before any output exists, the manifest carries its own sha256,
every stored chunk (lossy ones too) and side file a checksum, and only regular files of a
bounded size are read. Every bad artifact gives one line naming the file (and tensor), leaves
the inputs byte-identical and no output behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tracemalloc

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltastream as ds
from deltastream.artifact import store
from deltastream.artifact.codecs import PRESETS, encode_chunk
from deltastream.artifact.manifest import FORMAT_VERSION, manifest_digest
from deltastream.dtypes import DTYPES
from deltastream.errors import ParameterError, WrongBaseError
from deltastream.jobs.compress import compress
from deltastream.methods import get_method, method_from_config

from common import error_line, make_pair, read_raw, run_cli, tree_digest, write_checkpoint

SIDE = {"config.json": '{"model_type": "llama"}', "tokenizer.json": '{"version": "1.0", "model": {}}'}
SPECS = {"layers.0.w": ("BF16", (16, 8)), "norm": ("F32", (8,))}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, a fine-tune and two artifacts of it (lossless, bitdelta), 4 chunks per matrix."""
    tmp = tmp_path_factory.mktemp("made")
    base, ft = make_pair(str(tmp), SPECS, side_files=SIDE)
    arts = {}
    for method in ("lossless", "bitdelta"):
        arts[method] = str(tmp / f"{method}.dsz")
        assert run_cli("compress", base, ft, "-o", arts[method], "-q", "--chunk-size", "64", "--method", method) == 0
    rebuilt = str(tmp / "bitdelta-out")
    assert run_cli("apply", base, arts["bitdelta"], "-o", rebuilt, "-q") == 0
    return {"base": base, "ft": ft, "arts": arts, "lossy_out": read_raw(rebuilt)}


@pytest.fixture
def art(made, tmp_path, request):
    """A fresh copy of one of the artifacts (lossless unless the test is parametrized with 'method')."""
    method = getattr(request, "param", "lossless")
    path = str(tmp_path / "a.dsz")
    shutil.copytree(made["arts"][method], path, symlinks=True)
    return path


def manifest_of(art: str) -> dict:
    with open(os.path.join(art, "zarr.json")) as f:
        return json.load(f)["attributes"]["deltastream"]


def edit_manifest(art: str, edit, reseal: bool = True) -> None:
    """edit(manifest) in place; ``reseal``: recompute manifest_sha256 as a forger would, so
    that the field checks themselves are what is tested."""
    path = os.path.join(art, "zarr.json")
    with open(path) as f:
        root = json.load(f)
    edit(root["attributes"]["deltastream"])
    if reseal:
        doc = root["attributes"]["deltastream"]
        try:
            doc["manifest_sha256"] = manifest_digest(doc)
        except ValueError:  # NaN: no digest can be computed
            pass
    with open(path, "w") as f:
        json.dump(root, f)


def refused(capsys, tmp_path, base, art, fragment, commands=("info", "verify", "verify-base", "apply")) -> list[str]:
    """Each command exits 2 with one line holding ``fragment``; inputs unchanged; no output."""
    before = tree_digest(base, art)
    out = tmp_path / "out"
    messages = []
    for command in commands:
        argv = {"info": ["info", art], "verify": ["verify", art], "verify-base": ["verify", art, base],
                "apply": ["apply", base, art, "-o", out, "-q"]}[command]
        capsys.readouterr()
        assert run_cli(*argv) == 2, command
        line = error_line(capsys)
        assert fragment in line, (command, line)
        messages.append(line)
    assert tree_digest(base, art) == before
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return messages


def w0(doc) -> dict:
    return doc["tensors"][0]


# --- case 5/19: every manifest field is checked -------------------------------------------------

FIELD_CASES = {
    "chunk_elems -5": (lambda d: w0(d).update(chunk_elems=-5), "'chunk_elems' is -5, not an integer in [1, 128]"),
    "chunk_elems 0": (lambda d: w0(d).update(chunk_elems=0), "'chunk_elems' is 0, not an integer"),
    "chunk_elems true": (lambda d: w0(d).update(chunk_elems=True), "'chunk_elems' is true, not an integer"),
    "chunk_elems cuts rows": (lambda d: w0(d).update(chunk_elems=12), "'chunk_elems' 12 cuts rows of 8 elements"),
    "negative shape": (lambda d: w0(d).update(shape=[-16, 8]), "'shape[0]' is -16, not an integer"),
    "string shape": (lambda d: w0(d).update(shape="16x8"), "'shape' is \"16x8\", not a list of dimensions"),
    "shape 10**12": (lambda d: w0(d).update(shape=[10**12]), "'shape' [1000000000000] is over 1099511627776 bytes"),
    "same-size shape": (lambda d: w0(d).update(shape=[8, 16]), "'base.shape' [16, 8] does not fit shape [8, 16]"),
    "BF16 to F16": (lambda d: w0(d).update(dtype="F16"), "'base.dtype' \"BF16\" is not F16"),
    "unknown dtype": (lambda d: w0(d).update(dtype="Q4"), "'dtype' \"Q4\" is not a safetensors dtype"),
    "metadata value": (lambda d: d["fine_tune_metadata"].update(format=5),
                       "'fine_tune_metadata.format' is 5, not a string"),
    "missing created": (lambda d: d.pop("created"), "'created' is missing"),
    "created a number": (lambda d: d.update(created=7), "'created' is 7, not a string"),
    "short crc list": (lambda d: w0(d)["ft_chunk_crc32c"].pop(), "'ft_chunk_crc32c' has 3 entries, expected 4"),
    "crc over 32 bits": (lambda d: w0(d)["ft_chunk_crc32c"].__setitem__(1, 2**32),
                         "'ft_chunk_crc32c[1]' is 4294967296"),
    "short stored list": (lambda d: w0(d)["stored_chunks"].pop(), "'stored_chunks' has 3 entries, expected 4"),
    "stored not bool": (lambda d: w0(d)["stored_chunks"].__setitem__(0, 1),
                        "'stored_chunks' holds a value that is not"),
    "base crc list": (lambda d: w0(d)["base"]["chunk_crc32c"].append(1),
                      "'base.chunk_crc32c' has 5 entries, expected 4"),
    "stored crc list": (lambda d: w0(d)["stored_crc32c"]["delta"].pop(), "'stored_crc32c.delta' has 3 entries"),
    "stored crc role": (lambda d: w0(d).update(stored_crc32c={}), "'stored_crc32c' names [], expected [\"delta\"]"),
    "policy": (lambda d: w0(d).update(policy="pickle"), "'policy' 'pickle' is not one of 'lossless', 'new', 'grown'"),
    "new with a base": (lambda d: w0(d).update(policy="new"), "'base' is given for policy 'new'"),
    "key": (lambda d: w0(d).update(key="tensors/../../x"), "'key' is \"tensors/../../x\", expected 'tensors/000000'"),
    "repeated key": (lambda d: d["tensors"][1].update(key="tensors/000000"), "expected 'tensors/000001'"),
    "repeated name": (lambda d: d["tensors"][1].update(name="layers.0.w"), "the name is repeated"),
    "reserved name": (lambda d: w0(d).update(name="__metadata__"), "the name '__metadata__' is safetensors' own key"),
    "seed": (lambda d: d.update(seed="abc"), "'seed' is \"abc\", not an integer"),
    "seed bool": (lambda d: d.update(seed=False), "'seed' is false, not an integer"),
    "method": (lambda d: d.update(method={"id": "lossless", "transform": "rot13"}), "'method': method 'lossless'"),
    "method id": (lambda d: d.update(method={"id": 5}), "'method.id' is 5, not a string"),
    "state key": (lambda d: w0(d).update(state={"alpha": [1.0]}), "'state' has [\"alpha\"], expected []"),
    "side file name": (lambda d: d["side_files"].update({"../evil.py": "sidefiles/009"}),
                       "side file name '../evil.py' is not a side file"),
    "side file key": (lambda d: d["side_files"].update({"config.json": "../../etc"}), "has an invalid or repeated key"),
    "side digest": (lambda d: d["side_file_digests"].pop("config.json"), "'side_file_digests' does not name the same"),
    "side bytes": (lambda d: d["side_file_digests"]["config.json"].update(bytes=2**40), ".bytes' is 1099511627776"),
    "head_bytes": (lambda d: d.update(head_bytes=0), "'head_bytes' is 0, not an integer"),
    "tensors": (lambda d: d.update(tensors={"a": 1}), "'tensors' is {\"a\": 1}, not a list"),
}


#: the cases about one tensor entry: the message names the tensor
TENSOR_CASES = {"chunk_elems -5", "chunk_elems 0", "chunk_elems true", "chunk_elems cuts rows", "negative shape",
                "string shape", "shape 10**12", "same-size shape", "BF16 to F16", "unknown dtype", "short crc list",
                "crc over 32 bits", "short stored list", "stored not bool", "base crc list", "stored crc list",
                "stored crc role", "policy", "new with a base", "key", "state key", "repeated name", "repeated key"}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_every_manifest_field_is_checked(made, art, tmp_path, capsys, case):
    edit, fragment = FIELD_CASES[case]
    edit_manifest(art, edit)
    for line in refused(capsys, tmp_path, made["base"], art, fragment):
        assert "malformed manifest" in line and os.path.join(art, "zarr.json") in line
        named = "tensor 'norm'" if case == "repeated key" else "tensor 'layers.0.w'"
        assert (named in line) == (case in TENSOR_CASES)


@pytest.mark.parametrize("art", ["bitdelta"], indirect=True)
@pytest.mark.parametrize("state, fragment", [
    ({"alpha": []}, "'state.alpha' has 0 entries, expected 1"),
    ({"alpha": ["x"]}, "'state.alpha[0]' is \"x\", not a finite number"),
    ({"alpha": [0.1], "evil": 1}, "'state' has [\"alpha\", \"evil\"], expected [\"alpha\"]"),
])
def test_state_has_the_kinds_the_method_declares(made, art, tmp_path, capsys, state, fragment):
    edit_manifest(art, lambda d: w0(d).update(state=state))
    refused(capsys, tmp_path, made["base"], art, fragment)


def _text_edit(rel: str, old: str, new: str):
    """An edit of a JSON file's text, for what json.dump cannot write (a repeated key)."""
    def edit(art):
        path = os.path.join(art, rel)
        with open(path) as f:
            text = f.read()
        assert old in text, (rel, old)
        with open(path, "w") as f:
            f.write(text.replace(old, new, 1))
    return edit


STRICT_JSON_CASES = {
    # json.loads keeps the last: deltastream read a 1.0 artifact (no digest check), another reader 1.1
    "repeated key": (_text_edit("zarr.json", '"format_version": "1.1"',
                                '"format_version": "1.1", "format_version": "1.0"'), "duplicate key 'format_version'"),
    "repeated key in array metadata": (_text_edit("tensors/000000/delta/zarr.json", '"shape": [',
                                                  '"shape": [1], "shape": ['), "duplicate key 'shape'"),
    "NaN": (lambda art: edit_manifest(art, lambda d: d.update(seed=float("nan"))), "NaN is not a finite JSON number"),
    "-Infinity": (lambda art: edit_manifest(art, lambda d: w0(d)["ft_chunk_crc32c"].__setitem__(0, float("-inf"))),
                  "-Infinity is not a finite JSON number"),
    "1e999": (_text_edit("zarr.json", '"chunk_bytes": 64', '"chunk_bytes": 1e999'),
              "1e999 is not a finite JSON number"),
    "surrogate name": (lambda art: edit_manifest(art, lambda d: w0(d).update(name="w\ud800")),
                       "the string 'w\\ud800' holds a lone surrogate escape"),
}


@pytest.mark.parametrize("case", sorted(STRICT_JSON_CASES))
def test_metadata_json_is_parsed_strictly(made, art, tmp_path, capsys, case):
    """A repeated key (deltastream and another zarr reader could see different values), NaN, an
    infinity or a lone surrogate is refused when the file is parsed: one line naming the file."""
    edit, fragment = STRICT_JSON_CASES[case]
    edit(art)
    where = os.path.join(art, "tensors/000000/delta/zarr.json" if "array" in case else "zarr.json")
    for line in refused(capsys, tmp_path, made["base"], art, fragment):
        assert f"file '{where}'" in line and "invalid metadata" in line


def test_a_tampered_manifest_is_reported_not_obeyed(made, art, tmp_path, capsys):
    """chunk_elems -5 made verify say ok and apply rebuild zeros; unsealed, the digest says so."""
    edit_manifest(art, lambda d: w0(d).update(chunk_elems=-5), reseal=False)
    refused(capsys, tmp_path, made["base"], art, "the manifest does not match its manifest_sha256")


@pytest.mark.parametrize("edit", [
    lambda d: w0(d).update(shape=[8, 16]),  # same size: rebuilt before, and passed verify
    lambda d: [t.update(dtype="F16") or t["base"].update(dtype="F16") for t in d["tensors"][:1]],
    lambda d: d["side_files"].update({"config.json": "sidefiles/001", "tokenizer.json": "sidefiles/000"}),
    lambda d: d["fine_tune_metadata"].update(format="tf"),
])
def test_silent_changes_are_caught_by_the_digest(made, art, tmp_path, capsys, edit):
    edit_manifest(art, edit, reseal=False)
    refused(capsys, tmp_path, made["base"], art, "does not match its manifest_sha256")


def test_array_metadata_must_be_the_planned_one(made, art, tmp_path, capsys):
    meta_path = os.path.join(art, "tensors", "000000", "delta", "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    differs = "array layout differs from the method's plan (it records "
    for field, value, fragment in [
            ("data_type", "uint32", differs + "dtype <u4 where this version's method plans <u2"),
            ("shape", [10**12], differs + f"length {10**12} where"),
            ("chunk_grid", {"name": "regular", "configuration": {"chunk_shape": [7]}},
             differs + "chunk length 7 where"),
            ("codecs", [{"name": "bytes"}], "array metadata is not an array deltastream writes (its codec chain"),
            ("data_type", "bfloat16", "array metadata is not an array deltastream writes (its data_type \"bfloat16\""),
            ("fill_value", 1, "array metadata does not match the manifest (fill_value is 1, expected 0)")]:
        with open(meta_path, "w") as f:
            json.dump({**meta, field: value}, f)
        msgs = refused(capsys, tmp_path, made["base"], art, fragment)
        assert all(meta_path in m and "tensor 'layers.0.w'" in m for m in msgs)
    with open(meta_path, "w") as f:
        f.write("[" * 100000)
    msg = refused(capsys, tmp_path, made["base"], art,
                  "unreadable array metadata (invalid metadata JSON: nested deeper than 127 levels)")
    assert meta_path in msg[0] and "tensor 'layers.0.w'" in msg[0]


def test_state_array_metadata_and_data_are_checked(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (16, 8))})
    art = str(tmp_path / "row.dsz")
    assert run_cli("compress", base, ft, "-o", art, "-q", "--method", "bitdelta", "-p", "per=row") == 0
    folder = os.path.join(art, "tensors", "000000", "state.alpha")
    meta_path = os.path.join(folder, "zarr.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:  # 16 scales read as another shape of the same size
        json.dump({**meta, "attributes": {"shape": [16, 1]}}, f)
    refused(capsys, tmp_path, base, art, "array metadata does not match the manifest (attributes is",
            ("verify", "verify-base", "apply"))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    chunk = os.path.join(folder, "c", "0")
    data = bytearray(open(chunk, "rb").read())
    data[0] ^= 1  # another scale, with the zarr CRC redone
    data[-4:] = crc32c.crc32c(bytes(data[:-4])).to_bytes(4, "little")
    open(chunk, "wb").write(bytes(data))
    refused(capsys, tmp_path, base, art, "does not match the CRC-32C the manifest records",
            ("verify", "verify-base", "apply"))


@pytest.mark.parametrize("art", ["bitdelta"], indirect=True)
def test_a_lossy_chunk_swapped_for_other_valid_data_is_caught(made, art, tmp_path, capsys):
    """Chunk 1 of the signs replaced by chunk 0 (valid data, valid zarr CRC): passed verify ART BASE."""
    folder = os.path.join(art, "tensors", "000000", "signs0", "c")
    shutil.copyfile(os.path.join(folder, "0"), os.path.join(folder, "1"))
    msgs = refused(capsys, tmp_path, made["base"], art, "does not match the CRC-32C the manifest records",
                   ("verify", "verify-base", "apply"))
    assert all(os.path.join(folder, "1") in m and "tensor 'layers.0.w'" in m for m in msgs)


def test_swapped_side_files_are_caught(made, art, tmp_path, capsys):
    side = os.path.join(art, "sidefiles")
    os.rename(os.path.join(side, "000"), os.path.join(side, "tmp"))
    os.rename(os.path.join(side, "001"), os.path.join(side, "000"))
    os.rename(os.path.join(side, "tmp"), os.path.join(side, "001"))
    msgs = refused(capsys, tmp_path, made["base"], art, "side file 'config.json'", ("verify", "verify-base", "apply"))
    assert all("array metadata does not match" in m or "sha256 the manifest records" in m for m in msgs)


def test_side_files_of_equal_size_swapped_are_caught(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), SPECS, side_files={"config.json": '{"a": 1}', "tokenizer.json": '{"b": 2}'})
    art = str(tmp_path / "a.dsz")
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    side = os.path.join(art, "sidefiles")
    os.rename(os.path.join(side, "000"), os.path.join(side, "tmp"))
    os.rename(os.path.join(side, "001"), os.path.join(side, "000"))
    os.rename(os.path.join(side, "tmp"), os.path.join(side, "001"))
    refused(capsys, tmp_path, base, art, "side file 'config.json' in file", ("verify", "verify-base", "apply"))
    refused(capsys, tmp_path, base, art, "do not match the sha256 the manifest records", ("verify",))


# --- case 6: only regular files of a known, bounded size are read -------------------------------


@pytest.mark.parametrize("kind, fragment", [
    ("devzero", "is a symbolic link (only regular files inside the artifact are read)"),
    ("fifo", "not a regular file"),
    ("huge", "bytes, more than the"),
])
def test_chunk_files_must_be_regular_and_bounded(made, art, tmp_path, capsys, no_hang, kind, fragment):
    chunk = os.path.join(art, "tensors", "000000", "delta", "c", "1")
    os.remove(chunk)
    if kind == "devzero":
        os.symlink("/dev/zero", chunk)
    elif kind == "fifo":
        os.mkfifo(chunk)
    else:
        with open(chunk, "wb") as f:
            f.truncate(10 << 20)
    msgs = refused(capsys, tmp_path, made["base"], art, fragment, ("verify", "verify-base", "apply"))
    assert all(chunk in m and "tensor 'layers.0.w'" in m and "corrupt artifact chunk" in m for m in msgs)


@pytest.mark.parametrize("where", ["zarr.json", "tensors/000000/delta/zarr.json", "sidefiles/000/zarr.json",
                                   "sidefiles/000/c/0"])
def test_metadata_and_side_files_must_be_regular(made, art, tmp_path, capsys, no_hang, where):
    path = os.path.join(art, where)
    os.remove(path)
    os.mkfifo(path)
    commands = ("info", "verify", "verify-base", "apply") if "side" not in where else ("verify", "verify-base", "apply")
    msgs = refused(capsys, tmp_path, made["base"], art, "not a regular file", commands)
    assert all(path in m for m in msgs)


def test_a_chunk_of_another_length_is_refused(made, art, tmp_path, capsys):
    """A valid blosc chunk (valid zarr CRC) of 4 elements where 32 are planned: it decoded
    without error before, leaving the rest of the buffer as the previous chunk left it."""
    chunk = os.path.join(art, "tensors", "000000", "delta", "c", "2")
    with open(chunk, "wb") as f:
        f.write(b"".join(bytes(p) for p in encode_chunk(np.zeros(4, np.uint16), PRESETS["delta"])))
    refused(capsys, tmp_path, made["base"], art, f"in file '{chunk}': corrupt artifact chunk (chunk does not hold "
            "the 64 bytes of its planned length)", ("verify", "verify-base", "apply"))



def test_a_missing_stored_chunk_is_one_wording(made, art, tmp_path, capsys):
    """verify ART checked for the file itself first, in words of its own; read_chunk says it."""
    chunk = os.path.join(art, "tensors", "000000", "delta", "c", "1")
    os.remove(chunk)
    refused(capsys, tmp_path, made["base"], art, f"tensor 'layers.0.w' in file '{chunk}': corrupt artifact chunk "
            "(missing)", ("verify", "verify-base", "apply"))


def test_compress_never_plans_a_chunk_readers_refuse(made, tmp_path):
    with pytest.raises(ParameterError, match="over the artifact format's limit of 1073741824 bytes per chunk"):
        compress(made["base"], made["ft"], str(tmp_path / "a.dsz"), get_method("lossless"), chunk_bytes=2 << 30)
    assert not (tmp_path / "a.dsz").exists()


def test_a_linked_folder_inside_the_artifact_is_refused(made, art, tmp_path, capsys):
    folder = os.path.join(art, "tensors", "000000", "delta", "c")
    shutil.move(folder, str(tmp_path / "elsewhere"))
    os.symlink(str(tmp_path / "elsewhere"), folder)
    refused(capsys, tmp_path, made["base"], art, f"'{folder}' is not a folder of the artifact")


def test_a_manifest_larger_than_the_bound_is_refused(made, art, tmp_path, capsys):
    with open(os.path.join(art, "zarr.json"), "ab") as f:
        f.truncate(65 << 20)
    refused(capsys, tmp_path, made["base"], art, "more than the 67108864 it can hold")


def test_verify_of_a_huge_shape_does_not_allocate_it(made, art, tmp_path, capsys):
    """shape [10**12] made verify allocate until the memory limit."""
    tracemalloc.start()
    edit_manifest(art, lambda d: w0(d).update(shape=[10**12], chunk_elems=10**12))
    refused(capsys, tmp_path, made["base"], art, "is over 1099511627776 bytes", ("verify", "verify-base"))
    assert tracemalloc.get_traced_memory()[1] < 64 << 20
    tracemalloc.stop()



def test_a_state_array_over_the_chunk_bound_is_refused_before_reading(tmp_path, capsys):
    """A state array is one chunk of the length its method declares: lowrank's vt, r x k floats,
    is 25.6 GiB for a declared shape [2**18, 2**18] (matching zarr.json files, digest resealed),
    and verify ART allocated it: a MemoryError traceback, or the memory."""
    base, ft = make_pair(str(tmp_path), {"w": ("F32", (64, 64))})
    art = str(tmp_path / "a.dsz")
    assert run_cli("compress", base, ft, "-o", art, "-q", "--method", "lowrank") == 0
    doc = manifest_of(art)
    method, entry = method_from_config(doc["method"]), w0(doc)
    side, chunk_elems = 1 << 18, 1 << 28
    n = side * side // chunk_elems
    arrays = method.stored_arrays(DTYPES["F32"], (side, side), chunk_elems, entry["state"])
    _, vt_shape = method.state_layout((side, side))["vt"]
    assert math.prod(vt_shape) * 4 > 25 << 30
    for spec in arrays:
        store._write_array(os.path.join(art, entry["key"], spec.role), spec)
    vt = store._state_spec("vt", math.prod(vt_shape))
    store._write_array(os.path.join(art, entry["key"], vt.role), vt, {"shape": list(vt_shape)})

    def grow(d):
        w0(d).update(shape=[side, side], chunk_elems=chunk_elems, ft_chunk_crc32c=[0] * n, stored_chunks=[False] * n,
                     stored_crc32c={**{a.role: [0] * n for a in arrays}, "state.vt": [0]})
        w0(d)["base"].update(shape=[side, side], chunk_crc32c=[0] * n)
    edit_manifest(art, grow)
    tracemalloc.start()
    try:
        msgs = refused(capsys, tmp_path, base, art, f"malformed manifest: state array 'vt' of shape {list(vt_shape)} "
                       f"is {math.prod(vt_shape) * 4} bytes, over the 1073741824-byte limit of a chunk")
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()
    assert all(f"tensor 'w' in file '{os.path.join(art, 'zarr.json')}'" in m for m in msgs)


def test_a_chunk_that_cannot_be_allocated_is_one_line(made, art, tmp_path, capsys, monkeypatch):
    """The backstop behind the bounds: a MemoryError reading a chunk is a corrupt-chunk line."""
    def no_memory(*args):
        raise MemoryError("Unable to allocate 25.6 GiB for an array")
    monkeypatch.setattr(store, "scratch", no_memory)
    msgs = refused(capsys, tmp_path, made["base"], art, "corrupt artifact chunk (its planned length of",
                   ("verify", "verify-base", "apply"))
    assert all("bytes cannot be allocated)" in m and "tensor '" in m and "/c/" in m for m in msgs), msgs


# --- the format: 1.1 digest exposed, 1.0 still read ---------------------------------------------

def test_info_exposes_the_manifest_digest_to_pin(made, art, capsys):
    digest = hashlib.sha256(json.dumps({k: v for k, v in manifest_of(art).items() if k != "manifest_sha256"},
                                       sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert manifest_of(art)["format_version"] == FORMAT_VERSION == "1.1"
    assert manifest_of(art)["manifest_sha256"] == digest
    capsys.readouterr()
    assert run_cli("info", art, "--json") == 0
    assert json.loads(capsys.readouterr().out)["manifest_sha256"] == digest
    assert run_cli("info", art) == 0
    assert f"sha256 {digest}" in capsys.readouterr().out


@pytest.mark.parametrize("art", ["lossless", "bitdelta"], indirect=True)
def test_a_format_1_0_artifact_is_still_read(made, art, tmp_path, capsys):
    def downgrade(d):
        d.update(format_version="1.0")
        for key in ("manifest_sha256", "side_file_digests"):
            d.pop(key)
        for t in d["tensors"]:
            t.pop("stored_crc32c")
    edit_manifest(art, downgrade, reseal=False)
    out = tmp_path / "out"
    assert run_cli("verify", art, made["base"]) == 0
    assert run_cli("apply", made["base"], art, "-o", out, "-q") == 0
    expected = read_raw(made["ft"]) if "lossless" in manifest_of(art)["method"]["id"] else made["lossy_out"]
    assert read_raw(str(out)) == expected
    assert (out / "config.json").read_text() == SIDE["config.json"]



@pytest.mark.parametrize("digests", [[], "junk", {"config.json": {"bytes": "x", "sha256": 1}},
                                     {"config.json": {"bytes": 3, "sha256": "0" * 64}}])
def test_a_format_1_0_manifest_ignores_its_1_1_fields(made, art, tmp_path, capsys, digests):
    """side_file_digests is checked from 1.1 only, but a 1.0 manifest's was used: an AttributeError
    or TypeError traceback from verify and apply. 1.0 ignores it, as stored_crc32c (docs/format.md 1)."""
    def downgrade(d):
        d.update(format_version="1.0", side_file_digests=digests)
        d.pop("manifest_sha256")
    edit_manifest(art, downgrade, reseal=False)
    out = tmp_path / "out"
    for argv in (["info", art], ["verify", art], ["verify", art, made["base"]],
                 ["apply", made["base"], art, "-o", out, "-q"]):
        capsys.readouterr()
        assert run_cli(*argv) == 0, capsys.readouterr().err
    assert (out / "config.json").read_text() == SIDE["config.json"]
    assert read_raw(str(out)) == read_raw(made["ft"])


# --- case 21: info escapes names from the artifact ----------------------------------------------

def test_info_escapes_names_and_json_stays_exact(tmp_path, capsys):
    name = "\x1b[31mred\nnext\u202eline"
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, 32, dtype=np.uint8)
    base = write_checkpoint(str(tmp_path / "base"), {name: ("F32", (8,), raw)})
    ft = write_checkpoint(str(tmp_path / "ft"), {name: ("F32", (8,), raw[::-1].copy())})
    art = str(tmp_path / "a.dsz")
    assert run_cli("compress", base, ft, "-o", art, "-q") == 0
    capsys.readouterr()
    assert run_cli("info", art) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\\x1b[31mred\\x0anext\\u202eline" in out
    assert len(out.splitlines()) == 11  # no name breaks a line
    assert run_cli("info", art, "--json") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and json.loads(out)["tensors"][0]["name"] == name



def test_wrong_base_messages_escape_the_artifact_path(made, tmp_path, capsys):
    """check_base put the artifact's path into its messages raw (a newline, an ANSI escape)."""
    art = str(tmp_path / "a\x1b[31m\nb.dsz")
    shutil.copytree(made["arts"]["lossless"], art)
    with pytest.raises(WrongBaseError) as exc:
        ds.verify(art, made["ft"])
    message = str(exc.value)
    assert "\n" not in message and "\x1b" not in message
    assert "wrong base for '" + str(tmp_path) + "/a\\x1b[31m\\x0ab.dsz'" in message
    capsys.readouterr()
    assert run_cli("apply", made["ft"], art, "-o", tmp_path / "out", "-q") == 2
    assert error_line(capsys) == f"deltastream: error: {message}"


# --- fuzz: random mutations of the manifest and array metadata ----------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**32, 10**12])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["\ud800", "../x", "BF16", "F16", "lossless", "new", "tensors/000001", "sidefiles/000"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def _paths(obj, prefix=()):
    """Every (container, key) place in a JSON document."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from _paths(value, prefix + (key,))


def _mutate(doc, path, action, value):
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "replace":
        parent[key] = value
    elif isinstance(parent[key], list):  # "grow": a list one longer, or a field added
        parent[key].append(value)
    elif isinstance(parent[key], dict):
        parent[key]["extra"] = value
    else:
        parent[key] = [parent[key]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["lossless", "bitdelta"]), target=st.sampled_from(["manifest", "array"]),
       pick=st.integers(0, 10**6), action=st.sampled_from(["replace", "delete", "grow"]), value=JSON_VALUES,
       reseal=st.booleans())
def test_fuzz_manifest_mutations(made, tmp_path_factory, method, target, pick, action, value, reseal):
    tmp = tmp_path_factory.mktemp("fuzz")
    art = str(tmp / "a.dsz")
    shutil.copytree(made["arts"][method], art, symlinks=True)
    if target == "manifest":
        doc = manifest_of(art)
        paths = list(_paths(doc))
        edit_manifest(art, lambda d: _mutate(d, paths[pick % len(paths)], action, value), reseal=reseal)
    else:
        metas = sorted(os.path.join(f, "zarr.json") for f, _, files in os.walk(art) if "zarr.json" in files)
        meta_path = metas[pick % len(metas)]
        with open(meta_path) as f:
            meta = json.load(f)
        paths = list(_paths(meta))
        _mutate(meta, paths[(pick // 7) % len(paths)], action, value)
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    before = tree_digest(made["base"], art)
    out = tmp / "out"
    expected = read_raw(made["ft"]) if method == "lossless" else made["lossy_out"]
    tracemalloc.start()
    try:
        for argv in (["verify", art, made["base"]], ["info", art, "--json"],
                     ["apply", made["base"], art, "-o", out, "-q"]):
            capture = _Capture()
            with capture:
                rc = run_cli(*argv)
            assert rc in (0, 2), (argv, capture.err)
            if rc == 2:
                lines = capture.err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("deltastream: error: "), capture.err
            elif argv[0] == "apply":
                rebuilt = read_raw(str(out))  # a valid checkpoint in every case
                # sealed (or lossless: its rebuild proves itself), it is exactly the artifact's rebuild;
                # a resealed lossy manifest is another artifact (docs/format.md, security model)
                if not reseal or method == "lossless" or target == "array":
                    assert rebuilt == expected
        assert tracemalloc.get_traced_memory()[1] < 256 << 20
    finally:
        tracemalloc.stop()
    if rc == 2:  # apply's
        assert not out.exists() and not (tmp / "out.partial").exists()
    assert tree_digest(made["base"], art) == before


class _Capture:
    """stdout/stderr of one in-process CLI call (capsys cannot be reset between examples)."""

    def __enter__(self):
        self._out, self._err = io.StringIO(), io.StringIO()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(contextlib.redirect_stdout(self._out))
        self._stack.enter_context(contextlib.redirect_stderr(self._err))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self.err = self._err.getvalue()
        return False


def test_info_on_an_ascii_terminal_escapes_names_it_cannot_show(tmp_path):
    w = np.zeros(16, np.uint8)
    base = write_checkpoint(str(tmp_path / "b"), {"emb\U0001f600": ("U8", (16,), w)})
    ft = write_checkpoint(str(tmp_path / "f"), {"emb\U0001f600": ("U8", (16,), w + 1)})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    proc = subprocess.run([sys.executable, "-m", "deltastream.cli", "info", art], capture_output=True, text=True,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0 and proc.stderr == ""
    assert "emb\\U0001f600" in proc.stdout
