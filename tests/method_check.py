"""check_method: what every method must satisfy, checked in one call from each method's tests.

* config: get_config is JSON, from_config rebuilds an equal method, describe works;
* dense reference: the method's numpy code run on each whole tensor in one piece (its passes,
  then edit_bits, every fast path off) gives the chunked ``edit`` job's bytes; for a compact
  method ``compress`` + ``apply`` gives them too;
* invariance: chunk sizes that cut rows in different places, workers 1 and 2, schedulers sync
  and threads: the same bytes (and the same artifact chunks);
* fast paths: every registered numba and torch implementation that applies (methods/backends.py)
  gives the numpy bytes ("torch:cpu" runs the torch code here);
* zarr: every array of the artifact opens with plain ``zarr.open_array`` and has the length the
  method's ``stored_arrays`` advertises.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
import zarr

import deltastream as ds
from deltastream.dtypes import dtype_by_name
from deltastream.methods import Method, backends
from deltastream.methods.base import ChunkContext, combine_partials
from deltastream.methods.lossless import Lossless

from common import make_pair, read_raw

__all__ = ["SPECS", "check_method", "dense_edit", "numpy_only", "artifact_chunks"]

SPECS = {"layers.0.mlp.w": ("BF16", (24, 40)), "layers.0.attn.w": ("F16", (16, 30)),
         "layers.1.mlp.w": ("F32", (12, 50)), "layers.0.norm": ("BF16", (40,))}
CHUNK = 97  # elements: cuts rows of every tensor above at different places
RUNS = [(333, 1, "sync"), (64, 2, "threads"), (None, 2, "threads"), (CHUNK, 2, "sync")]


@contextlib.contextmanager
def numpy_only(backend: str | None = None):
    """Every registered fast path (of one backend) off: the methods run their numpy reference."""
    original = backends.find

    def find(method, role, device, dtype_name):
        return None if backend in (None, backends.backend_of(device)) else original(method, role, device, dtype_name)
    backends.find = find
    try:
        yield
    finally:
        backends.find = original


def _bits(raw: bytes, dtype: str) -> np.ndarray:
    return np.frombuffer(raw, np.uint8).view(dtype_by_name(dtype).bits).copy()


def dense_edit(method: Method, base: str, ft: str, seed: int) -> dict[str, bytes]:
    """Each tensor's output bytes from the method's numpy code on the whole tensor as one chunk."""
    b_raw, f_raw = read_raw(base), read_raw(ft)
    out = {name: raw for name, (_, _, raw) in f_raw.items()}
    edited = {name: (dtype_by_name(dt), shape) for name, (dt, shape, _) in f_raw.items()
              if len(shape) >= 2 and method.lossy and method.accepts(shape)}
    states = {name: method.initial_state(shape) for name, (_, shape) in edited.items()}

    def ctx(name):
        dtype, shape = edited[name]
        return ChunkContext(tensor=name, dtype=dtype, shape=shape, start=0, stop=math.prod(shape), seed=seed,
                            rng_name=name, state=states[name])

    def delta(name):
        return method.delta(_bits(b_raw[name][2], f_raw[name][0]), _bits(f_raw[name][2], f_raw[name][0]),
                            ctx(name)).copy()
    with numpy_only():
        for i in range(max([method.pre_passes(shape) for _, shape in edited.values()], default=0)):
            names = [n for n, (_, shape) in edited.items() if i < method.pre_passes(shape)]
            groups: dict = {}
            for name in names:
                group = method.stats_group(i, name)
                groups[group] = combine_partials(groups.get(group), method.pre_stats(i, delta(name), ctx(name)))
            for name in names:
                states[name] = method.finalize_pre(i, groups[method.stats_group(i, name)], states[name])
        for name in edited:
            post = method.post_stats(delta(name), ctx(name)) if method.has_post_stats else None
            states[name] = method.finalize_post(post, states[name])
            dt = f_raw[name][0]
            bits = method.edit_bits(_bits(b_raw[name][2], dt), _bits(f_raw[name][2], dt), ctx(name))
            out[name] = np.ascontiguousarray(bits).tobytes()
    return out


def artifact_chunks(art: str) -> dict[str, bytes]:
    """The stored chunk files of an artifact (not its manifest, which records dates)."""
    out = {}
    for folder, _, files in os.walk(art):
        for f in files:
            if f != "zarr.json":
                with open(os.path.join(folder, f), "rb") as fh:
                    out[os.path.relpath(os.path.join(folder, f), art)] = fh.read()
    return out


def check_zarr(method: Method, art: str) -> None:
    """Every stored array opens with plain zarr and has the advertised length."""
    with open(os.path.join(art, "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["deltastream"]
    for entry in manifest["tensors"]:
        under = method if entry["policy"] == method.method_id else Lossless()
        shape, dtype = tuple(entry["shape"]), dtype_by_name(entry["dtype"])
        expected = {a.role: a.total_len for a in under.stored_arrays(dtype, shape, entry["chunk_elems"],
                                                                     entry["state"])}
        group = zarr.open_group(os.path.join(art, entry["key"]), mode="r")
        found = {name: zarr.open_array(os.path.join(art, entry["key"], name), mode="r") for name, _ in group.arrays()}
        assert set(expected) <= set(found), (entry["name"], sorted(found))
        for role, length in expected.items():
            assert found[role].shape == (length,) and found[role][:].size == length, (entry["name"], role)


def _fast_roles(method: Method, backend: str) -> list[str]:
    device = "cpu" if backend == "numba" else "torch:cpu"
    return [role for role in backends.ROLES
            if any(backends.find(method, role, device, d) is not None for d in ("BF16", "F16", "F32", "F64"))]


def check_method(method: Method, tmp: str, seed: int = 3, specs: dict = SPECS) -> dict[str, bytes]:
    """Run every check above on ``method`` in folder ``tmp``; returns the edit's tensor bytes."""
    config = method.get_config()
    assert json.loads(json.dumps(config)) == config
    assert type(method).from_config(config) == method and config["id"] == method.method_id
    json.dumps(type(method).describe())
    base, ft = make_pair(tmp, specs, seed=seed)

    def edit(tag, chunk=CHUNK, workers=1, scheduler="sync", device="cpu"):
        out = ds.edit(base, ft, os.path.join(tmp, tag), method, chunk_size=chunk, seed=seed, workers=workers,
                      scheduler=scheduler, device=device, overwrite=True)
        return {name: raw for name, (_, _, raw) in read_raw(out).items()}

    def compress(tag, chunk=CHUNK, workers=1, scheduler="sync", device="cpu"):
        return ds.compress(base, ft, os.path.join(tmp, f"{tag}.dsz"), method, chunk_size=chunk, seed=seed,
                           workers=workers, scheduler=scheduler, device=device, overwrite=True)

    def apply(art, tag, device="cpu"):
        out = ds.apply(base, art, os.path.join(tmp, tag), overwrite=True, device=device)
        return {name: raw for name, (_, _, raw) in read_raw(out).items()}

    edited = edit("edit")
    assert edited == dense_edit(method, base, ft, seed), "edit differs from the dense numpy reference"
    for chunk, workers, scheduler in RUNS:
        assert edit(f"edit-{chunk}-{workers}", chunk, workers, scheduler) == edited, (chunk, workers, scheduler)
    if method.compact:
        art = compress("art")
        check_zarr(method, art)
        assert apply(art, "applied") == edited, "apply of the artifact differs from edit"
        assert artifact_chunks(compress("art-2", workers=2, scheduler="threads")) == artifact_chunks(art)
        assert apply(compress("art-333", chunk=333), "applied-333") == edited
    for backend in ("numba", "torch"):
        roles = _fast_roles(method, backend)
        if not roles:
            continue
        device = "cpu" if backend == "numba" else "torch:cpu"
        with numpy_only(backend):
            reference_art = compress(f"ref-{backend}") if method.compact else None
        if "edit" in roles or "encode" in roles or "decode" in roles:
            assert edit(f"fast-{backend}", device=device) == edited, f"{backend} edit"
        if method.compact:
            art = compress(f"fast-{backend}", device=device)
            assert artifact_chunks(art) == artifact_chunks(reference_art), f"{backend} encode"
            assert apply(reference_art, f"fast-{backend}-applied", device=device) == edited, f"{backend} decode"
    return edited
