"""Write the golden artifacts of tests/golden/ (format 1.1) -- ONCE, with the code of that format.

These files pin the artifact format: tests/test_golden.py decodes them with the current code and
checks the rebuilt tensors' sha256s (expected.json), and re-compresses the stored inputs to check
every stored array file is byte-identical. Rerunning this script with newer code would make the
tests agree with whatever that code does, which defeats them: do it only for a deliberate format
change (a new format version), and say so in the commit.

They were written with the code before issue 10 (format 1.1; the issue says "1.0", which predates
the 1.1 bump) by::

    cd tests/golden && PYTHONPATH=/tmp/head python make_golden.py

The inputs are generated here (numpy, a fixed seed, a minimal safetensors writer) by
:func:`write_inputs`, which the tests call again (tests/golden_inputs.py checks the bytes against
their recorded sha256): no checkpoint is stored, and nothing depends on deltastream.synthetic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK_SIZE = 1024  # bytes: every 2-D tensor has several chunks, cut at whole rows
SEED = 7
#: name -> (method, params): every compact method and its main variants
CASES: dict[str, tuple[str, dict]] = {
    "lossless": ("lossless", {}),
    "lossless_xor": ("lossless", {"transform": "xor"}),
    "dare": ("dare", {"p": 0.9}),
    "dare_k": ("dare", {"p": 0.9, "k": 0.5}),
    "dare_l1": ("dare", {"p": 0.9, "rescale": "l1"}),
    "bitdelta": ("bitdelta", {}),
    "bitdelta_row": ("bitdelta", {"per": "row"}),
    "bitdelta_keep": ("bitdelta", {"zero": "keep"}),
    "bitdelta_residual": ("bitdelta", {"residual": 1}),
    "bitdelta_bits2": ("bitdelta", {"bits": 2}),  # multi-bit: the method `multibit` after issue 10
    "dare_bitdelta": ("dare_bitdelta", {"p": 0.9}),
    "lowrank": ("lowrank", {"rank_fraction": 0.25}),
}


def _bf16(w: np.ndarray) -> np.ndarray:
    return (w.astype(np.float32).view(np.uint32) >> 16).astype("<u2")


def make_tensors() -> tuple[dict, dict]:
    """{name: (dtype, shape, raw bytes)} of the base and the fine-tune."""
    rng = np.random.default_rng(20240610)

    def normal(shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = normal((40, 24))  # bf16, 2-D: 1024-byte chunks hold 21 whole rows -> 2 chunks
    norm = 1.0 + normal((24,))
    half = normal((12, 20))
    emb = normal((30, 16))
    base = {
        "layers.0.mlp.weight": ("BF16", (40, 24), _bf16(w)),
        "layers.0.norm.weight": ("F32", (24,), norm.astype("<f4")),
        "layers.0.attn.weight": ("F16", (12, 20), half.astype("<f2")),
        "embed.weight": ("BF16", (30, 16), _bf16(emb)),
    }
    emb_ft = np.concatenate([emb + normal(emb.shape, 1e-3), normal((6, 16))])
    ft = {
        "layers.0.mlp.weight": ("BF16", (40, 24), _bf16(w + normal(w.shape, 1e-3))),
        "layers.0.norm.weight": ("F32", (24,), (norm + normal(norm.shape, 1e-3)).astype("<f4")),
        "layers.0.attn.weight": ("F16", (12, 20), (half + normal(half.shape, 1e-3)).astype("<f2")),
        "embed.weight": ("BF16", (36, 16), _bf16(emb_ft)),  # grown by 6 rows
        "head.bias": ("F32", (10,), normal((10,)).astype("<f4")),  # new in the fine-tune
    }
    return base, ft


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        nbytes = raw.nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, _, raw in tensors.values():
            f.write(raw.tobytes())


def tensor_sha256(folder: str) -> dict[str, str]:
    """sha256 of every tensor's bytes in a checkpoint folder (parsed independently)."""
    out = {}
    for fname in sorted(os.listdir(folder)):
        if fname.endswith(".safetensors"):
            with open(os.path.join(folder, fname), "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                data = f.read()
            header.pop("__metadata__", None)
            for name, e in header.items():
                b, end = e["data_offsets"]
                out[name] = hashlib.sha256(data[b:end]).hexdigest()
    return dict(sorted(out.items()))


def write_inputs(folder: str) -> tuple[str, str]:
    """The base and fine-tune the golden artifacts were made from, under ``folder`` (the tests
    write them again rather than store them: the same bytes, checked against INPUT_SHA256)."""
    base, ft = make_tensors()
    write_safetensors(os.path.join(folder, "base", "model.safetensors"), base)
    write_safetensors(os.path.join(folder, "ft", "model.safetensors"), ft, {"format": "pt"})
    with open(os.path.join(folder, "ft", "config.json"), "w") as f:
        f.write('{"architectures": ["Tiny"], "hidden_size": 24}\n')
    return os.path.join(folder, "base"), os.path.join(folder, "ft")


def main() -> None:
    import deltastream as ds

    if ds.artifact.FORMAT_VERSION != "1.1":
        sys.exit(f"this script writes format 1.1; this deltastream writes {ds.artifact.FORMAT_VERSION}")
    os.chdir(HERE)  # relative paths: the manifests' `source` fields do not name this machine
    for folder in ("inputs", "artifacts"):  # inputs: scratch, not committed
        shutil.rmtree(folder, ignore_errors=True)
    write_inputs("inputs")
    expected = {"format_version": "1.1", "library_version": ds.__version__, "chunk_size": CHUNK_SIZE,
                "seed": SEED, "cases": {}}
    for case, (method, params) in CASES.items():
        art = f"artifacts/{case}.dsz"
        ds.compress("inputs/base", "inputs/ft", art, method, chunk_size=CHUNK_SIZE, seed=SEED, workers=1, **params)
        rebuilt = os.path.join("/tmp", f"golden-rebuild-{os.getpid()}-{case}")
        ds.apply("inputs/base", art, rebuilt, workers=1, overwrite=True)
        expected["cases"][case] = {"method": method, "params": params, "tensor_sha256": tensor_sha256(rebuilt)}
        shutil.rmtree(rebuilt)
    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
