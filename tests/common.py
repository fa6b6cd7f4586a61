"""The shared test kit: tiny checkpoints written independently of deltastream's own writer,
raw readers to compare outputs byte for byte, and the round-trip check every method reuses."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

import deltastream as ds
from deltastream.cli import main as cli_main

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
            "F8_E5M2FNUZ": 1, "F8_E8M0": 1, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
            "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def random_bits(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random contents of a tensor as raw bytes (uint8), realistic for floats."""
    n = math.prod(shape)
    if dtype == "BF16":
        w = (rng.standard_normal(n) * 0.02).astype(np.float32)
        return (w.view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    if dtype in ("F32", "F64", "F16"):
        np_dtype = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}[dtype]
        return (rng.standard_normal(n) * 0.02).astype(np_dtype).view(np.uint8)
    if dtype == "BOOL":
        return rng.integers(0, 2, n, dtype=np.uint8)
    return rng.integers(0, 256, n * ITEMSIZE[dtype], dtype=np.uint8)


def perturb(rng: np.random.Generator, dtype: str, raw: np.ndarray) -> np.ndarray:
    """A fine-tune of ``raw``: small changes for floats, some flipped values for the rest."""
    if dtype == "BF16":
        w = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        w = w + (rng.standard_normal(w.size) * 1e-3).astype(np.float32)
        return (w.view(np.uint32) >> 16).astype("<u2").view(np.uint8)  # truncation: any rounding will do
    if dtype in ("F32", "F64", "F16"):
        np_dtype = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}[dtype]
        w = raw.view(np_dtype)
        return (w + (rng.standard_normal(w.size) * 1e-3).astype(np_dtype)).astype(np_dtype).view(np.uint8)
    out = raw.copy()
    flip = rng.random(out.size) < 0.1
    out[flip] = rng.integers(0, 2 if dtype == "BOOL" else 256, int(flip.sum()), dtype=np.uint8)
    return out


def write_safetensors(path: str, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """A minimal independent safetensors writer: {name: (dtype, shape, raw uint8 bytes)}."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + raw.size]}
        offset += raw.size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, raw in tensors.values():
            f.write(raw.tobytes())


def write_checkpoint(folder: str, tensors: dict, shards: int = 1, metadata: dict | None = None,
                     side_files: dict[str, str] | None = None) -> str:
    """A checkpoint folder: model.safetensors, or `shards` files with an HF index."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors, metadata)
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(os.path.join(folder, fname), {n: tensors[n] for n in part}, metadata)
            weight_map.update({n: fname for n in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t[2].size for t in tensors.values())},
                       "weight_map": weight_map}, f)
    for name, text in (side_files or {}).items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def make_pair(tmp: str, specs: dict[str, tuple[str, tuple[int, ...]]], seed: int = 0, shards: int = 1,
              side_files: dict[str, str] | None = None) -> tuple[str, str]:
    """A base and a fine-tune checkpoint with the given {name: (dtype, shape)}."""
    rng = np.random.default_rng(seed)
    base, ft = {}, {}
    for name, (dtype, shape) in specs.items():
        raw = random_bits(rng, dtype, shape)
        base[name] = (dtype, shape, raw)
        ft[name] = (dtype, shape, perturb(rng, dtype, raw))
    return (write_checkpoint(os.path.join(tmp, "base"), base, shards),
            write_checkpoint(os.path.join(tmp, "ft"), ft, shards, metadata={"format": "pt"},
                             side_files=side_files))


def read_raw(folder: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a checkpoint folder as (dtype, shape, bytes), parsed independently."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
        header.pop("__metadata__", None)
        for t, e in header.items():
            b, end = e["data_offsets"]
            out[t] = (e["dtype"], tuple(e["shape"]), data[b:end])
    return out


def run_cli(*argv: str) -> int:
    return cli_main([str(a) for a in argv])


def error_line(capsys) -> str:
    """The one line a failed command printed on stderr: no traceback, no warning."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("deltastream: error: ")
    return lines[0]


def tree_digest(*folders) -> dict[str, str]:
    """Every entry under the folders: a file by its sha256, a link by its target (not followed),
    a folder or special file by its kind. Equal before and after: the inputs were untouched."""
    out = {}
    for top in folders:
        top = os.fspath(top)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(root, name)
                if os.path.islink(path):
                    out[path] = "link:" + os.readlink(path)
                elif os.path.isdir(path):
                    out[path] = "folder"
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        out[path] = hashlib.sha256(f.read()).hexdigest()
                else:
                    out[path] = "special"
    return out


def check_roundtrip(tmp: str, base: str, ft: str, method: str = "lossless", **kwargs) -> str:
    """compress + apply, assert the rebuild equals the fine-tune bit for bit; return the artifact."""
    tag = f"{method}-{abs(hash(tuple(sorted(kwargs.items())))) % 10**8}"
    art = ds.compress(base, ft, os.path.join(tmp, f"{tag}.dsz"), method, overwrite=True, **kwargs)
    apply_kwargs = {k: v for k, v in kwargs.items() if k in ("workers", "scheduler", "client")}
    out = ds.apply(base, art, os.path.join(tmp, f"{tag}-out"), overwrite=True, **apply_kwargs)
    assert read_raw(out) == read_raw(ft)
    return art


# --- lossy methods: dense references ----------------------------------------------------------

def tensor_f32(folder: str, name: str) -> np.ndarray:
    """One tensor of a checkpoint folder as float32, shaped, via deltastream's exact widening."""
    from deltastream.dtypes import DTYPES, to_float32

    dtype, shape, raw = read_raw(folder)[name]
    bits = np.frombuffer(raw, DTYPES[dtype].bits)
    return to_float32(bits, DTYPES[dtype]).reshape(shape)


def round_like(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to a dtype and widened back (the reference's output rounding)."""
    from deltastream.dtypes import DTYPES, from_float32, to_float32

    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    return to_float32(from_float32(flat, DTYPES[dtype]), DTYPES[dtype]).reshape(values.shape)


def check_edit_matches(tmp: str, base: str, ft: str, out: str, name: str, edited_ref: np.ndarray,
                       dtype: str, exact: bool = True) -> None:
    """The edit's output tensor equals round(base + reference edited delta)."""
    expected = round_like(tensor_f32(base, name) + edited_ref, dtype)
    got = tensor_f32(out, name)
    if exact:
        assert np.array_equal(got, expected), f"{name}: {np.abs(got - expected).max()}"
    else:  # sums in another order: equal to fp32 rounding, so at most one output ulp apart
        ulp = np.abs(round_like(expected * np.float32(1 + 2**-7), dtype) - expected) + 1e-30
        assert (np.abs(got - expected) <= ulp).all(), f"{name}: {np.abs(got - expected).max()}"
        assert np.mean(got == expected) > 0.99
