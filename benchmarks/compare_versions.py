"""Byte comparison of this checkout against another version of deltastream, method by method.

    python benchmarks/compare_versions.py BEFORE_PYTHONPATH [--dir DIR]

Writes one small synthetic bf16 Llama-shaped pair (deltastream.synthetic), then runs, once with
``PYTHONPATH=BEFORE_PYTHONPATH`` and once with this checkout, ``compress`` and ``edit`` of every
case below with a chunk size that splits rows, and compares: every file of each artifact except
its manifest byte for byte, the manifests with the fields that record the run (dates, version,
paths, digest) removed and bitdelta's former ``bits: 0`` dropped, and each edited checkpoint's tensors byte for byte
(its metadata shown when it differs). A case whose method was renamed (multi-bit BitDelta: ``bitdelta -p bits=2``
before, ``multibit -p bits=2`` now) is run under each version's name; its manifest may differ in
the method config and tensor policies only. Exits 1 on any other difference.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: label -> (method before, method now, params)
CASES = {
    "dare-p0.9": ("dare", "dare", {"p": 0.9}), "dare-k0.5": ("dare", "dare", {"p": 0.5, "k": 0.5}),
    "dare-l1": ("dare", "dare", {"p": 0.6, "rescale": "l1"}), "biased": ("biased", "biased", {}),
    "bitdelta": ("bitdelta", "bitdelta", {}), "bitdelta-row": ("bitdelta", "bitdelta", {"per": "row"}),
    "bitdelta-keep": ("bitdelta", "bitdelta", {"zero": "keep"}),
    "bitdelta-residual1": ("bitdelta", "bitdelta", {"residual": 1}),
    "multibit-2": ("bitdelta", "multibit", {"bits": 2}), "dare_bitdelta": ("dare_bitdelta", "dare_bitdelta", {}),
    "extrapolate": ("extrapolate", "extrapolate", {}), "trim": ("trim", "trim", {}),
    "trim-global": ("trim", "trim", {"scope": "global"}), "lowrank": ("lowrank", "lowrank", {}),
    "lossless": ("lossless", "lossless", {}),
}
CHUNK = 3000  # elements: rows are 128 or 344 long, so chunks end inside rows
VARYING = ("library_version", "created", "source", "manifest_sha256")


def worker(out: str, which: int, base: str, ft: str) -> None:
    """Run every case with the deltastream on sys.path (which: 0 before, 1 now)."""
    import deltastream as ds
    from deltastream.methods import METHODS

    for label, spec in CASES.items():
        name, params = spec[which], spec[2]
        if METHODS[name].compact:
            ds.compress(base, ft, os.path.join(out, f"{label}.dsz"), name, chunk_size=CHUNK, seed=5, **params)
        if name != "lossless":
            ds.edit(base, ft, os.path.join(out, f"{label}.edit"), name, chunk_size=CHUNK, seed=5, workers=2,
                    **params)


def files(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def manifest(raw: bytes, renamed: tuple[str, str] | None) -> dict:
    doc = json.loads(raw)["attributes"]["deltastream"]
    for key in VARYING:
        doc.pop(key, None)
    if doc["method"]["id"] == "bitdelta" and doc["method"].get("bits") == 0:
        del doc["method"]["bits"]  # BitDelta lost its bits parameter (0 before: the same method)
    if renamed:  # the old and new configs are each checked by the tests; compare the rest
        doc.pop("method")
        for t in doc["tensors"]:
            t["policy"] = "renamed" if t["policy"] in renamed else t["policy"]
    return doc


def tensors(raw: bytes) -> tuple[dict, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {k: (e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]) for k, e in header.items()}
    return tensors, meta


def compare(before: str, now: str) -> list[str]:
    problems = []
    for label, (old, new, _) in CASES.items():
        renamed = (old, new) if old != new else None
        art_b, art_n = os.path.join(before, f"{label}.dsz"), os.path.join(now, f"{label}.dsz")
        if os.path.isdir(art_b):
            fb, fn = files(art_b), files(art_n)
            mb, mn = fb.pop("zarr.json"), fn.pop("zarr.json")
            if fb != fn:
                differ = sorted(k for k in fb.keys() | fn.keys() if fb.get(k) != fn.get(k))[:5]
                problems.append(f"{label}: artifact files differ: {differ}")
            elif manifest(mb, renamed) != manifest(mn, renamed):
                problems.append(f"{label}: manifests differ beyond the run's own fields")
            else:
                config = (json.loads(mb)["attributes"]["deltastream"]["method"],
                          json.loads(mn)["attributes"]["deltastream"]["method"])
                note = f" (method config {config[0]} -> {config[1]})" if config[0] != config[1] else ""
                print(f"{label}: artifact stored files identical ({len(fb)} files){note}")
        edit_b, edit_n = os.path.join(before, f"{label}.edit"), os.path.join(now, f"{label}.edit")
        if os.path.isdir(edit_b):
            fb, fn = files(edit_b), files(edit_n)
            for name in sorted(k for k in fb if k.endswith(".safetensors")):
                (tb, meta_b), (tn, meta_n) = tensors(fb[name]), tensors(fn[name])
                if tb != tn:
                    problems.append(f"{label}: edited tensors differ in {name}")
                elif meta_b != meta_n:
                    differ = {k: (meta_b.get(k), meta_n.get(k))
                              for k in meta_b.keys() | meta_n.keys() if meta_b.get(k) != meta_n.get(k)}
                    print(f"{label}: edit {name}: tensors identical; metadata differs: {differ}")
                else:
                    print(f"{label}: edit {name}: identical")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", help="PYTHONPATH of the version to compare with (e.g. a git worktree)")
    ap.add_argument("--dir", default=None, help="work folder (default: a new temporary one)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        out, which, base, ft = args.worker
        worker(out, int(which), base, ft)
        return 0
    folder = args.dir or tempfile.mkdtemp(prefix="compare-versions-")
    sys.path.insert(0, HERE)
    from deltastream.synthetic import LlamaShape, write_pair

    base, ft = write_pair(os.path.join(folder, "pair"), LlamaShape(128, 344, 2, 4, 2, 512, note="compare"), seed=1)
    runs = {}
    for which, path in ((0, os.path.abspath(args.before)), (1, HERE)):
        out = runs[which] = os.path.join(folder, ("before", "now")[which])
        os.makedirs(out, exist_ok=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), args.before, "--worker", out, str(which), base, ft],
                       check=True, env={**os.environ, "PYTHONPATH": path}, cwd=folder)
    problems = compare(runs[0], runs[1])
    for p in problems:
        print("DIFFERENT:", p)
    print("all identical" if not problems else f"{len(problems)} differences", f"({folder})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
