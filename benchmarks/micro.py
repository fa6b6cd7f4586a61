"""The small measurements the code's comments quote, reproducible in one run.

    python benchmarks/micro.py

- CRC-32C (the crc32c package) GB/s, on one thread and on two;
- the element RNG: the fused kernel (rng.uniform_u32) against the same hash as whole-array numpy;
- first touch of a fresh 256 MiB buffer against writing into a reused one;
- 1 GiB of 4 MiB pwrites into a sparse file against a posix_fallocate'd one;
- one lossless compress chunk written through zarr's setitem against deltastream's direct encoding;
- compress's steps: map + CRC of cached input, bitdelta's and dare's encode of a chunk on one
  core, a dare chunk's kept entries compressed with and without their padding, and numpy's
  where of two scalars against kernels.select.

Writes benchmarks/results/micro.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from deltastream.checksum import crc32c
from deltastream.kernels import M1 as _M1
from deltastream.kernels import M2 as _M2
from deltastream.rng import tensor_key, uniform_u32

MB = 1e6


def timed(fn, repeat: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def whole_array_hash(key, n):
    """The RNG as plain numpy expressions on the whole range (how it was first written)."""
    h = np.arange(n, dtype=np.uint32) ^ np.uint32(key[0])
    for r in range(2):
        h ^= h >> np.uint32(16)
        h *= np.uint32(_M1)
        h ^= h >> np.uint32(15)
        h *= np.uint32(_M2)
        h ^= h >> np.uint32(16)
        if r == 0:
            h ^= np.uint32(key[1])
    return h


def chunk_pair(n: int):
    """A bf16 base and fine-tune chunk with weight- and delta-like values."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    d = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    to_bf16 = lambda x: (x.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    return to_bf16(w), to_bf16(w + d)


def kernel_rows(folder: str) -> list[tuple[str, str]]:
    """The per-step rates docs/benchmarks.md quotes for compress: reading (map + CRC), each
    method's encode on one core, the kept entries' padding, and numpy's scalar where."""
    from deltastream.artifact.codecs import PRESETS, encode_chunk
    from deltastream.checkpoint.header import TensorInfo
    from deltastream.checkpoint.reader import read_bits
    from deltastream.dtypes import DTYPES
    from deltastream.kernels import select
    from deltastream.methods.base import ChunkContext
    from deltastream.methods.bitdelta import BitDelta
    from deltastream.methods.dare import Dare

    rows = []
    # a shard of the 1B pair when there is one (make_checkpoints.py): a file just written here
    # maps about twice as fast as a checkpoint that came into the cache by reading
    path = os.path.join("bench-data", "1B", "ft", "model-00001-of-00003.safetensors")
    if not os.path.exists(path):
        path = os.path.join(folder, "shard")
        with open(path, "wb") as f:
            f.write(np.random.default_rng(4).integers(0, 255, 1 << 30, dtype=np.uint8))
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    step = 16 << 20  # elements: 32 MiB views, as compress maps them
    n = os.path.getsize(path) // 2 // step * step
    info = TensorInfo("w", path, DTYPES["BF16"], (n,), 0, 2 * n)

    def map_and_crc():
        for s in range(0, n, step):
            crc32c(read_bits(info, s, s + step))
    rows.append((f"map + CRC-32C of cached {path}, 32 MiB views, one core",
                 f"{2 * n / timed(map_and_crc) / 1e9:.1f} GB/s"))

    n = 16 << 20
    base, ft = chunk_pair(n)
    ctx = ChunkContext("w", DTYPES["BF16"], (n // 4096, 4096), 0, n, seed=1)
    for name, method in (("bitdelta", BitDelta()), ("dare p=0.9", Dare(p=0.9))):
        t = timed(lambda method=method: method.encode_with_stats(base, ft, ctx))
        rows.append((f"{name} encode of a 16M-element bf16 chunk, one core", f"{n / t / 1e9:.2f} G elements/s"))

    kept = Dare(p=0.9).encode_with_stats(base, ft, ctx)[0]["kept"].copy()
    padded = np.zeros(n, np.uint16)
    padded[: kept.size] = kept
    whole = timed(lambda: encode_chunk(padded, PRESETS["delta"]))
    alone = timed(lambda: encode_chunk(kept, PRESETS["delta"]))
    rows.append(("dare kept entries of that chunk, blosc: padded to the chunk / alone",
                 f"{whole * 1e3:.1f} ms / {alone * 1e3:.1f} ms"))

    mask = np.random.default_rng(5).random(n) < 0.5
    out = np.empty(n, np.float32)
    numpy_where = timed(lambda: np.where(mask, np.float32(1), np.float32(-1))) / n * 1e9
    kernel = timed(lambda: select(mask, np.float32(1), np.float32(-1), out)) / n * 1e9
    rows.append(("np.where(random mask, 1, -1) / kernels.select", f"{numpy_where:.2f} / {kernel:.2f} ns an element"))
    return rows


def main() -> None:
    rows = []
    data = np.random.default_rng(0).integers(0, 255, 256 << 20, dtype=np.uint8)
    one = data.nbytes / timed(lambda: crc32c(data)) / 1e9
    with ThreadPoolExecutor(2) as pool:
        two = 2 * data.nbytes / timed(lambda: list(pool.map(crc32c, [data, data]))) / 1e9
    rows.append(("CRC-32C, 256 MiB", f"{one:.1f} GB/s on one thread, {two:.1f} GB/s on two"))

    key, n = tensor_key(0, "w"), 16 << 20
    assert np.array_equal(uniform_u32(key, 0, n), whole_array_hash(key, n))
    fused = n / timed(lambda: uniform_u32(key, 0, n)) / MB
    whole = n / timed(lambda: whole_array_hash(key, n)) / MB
    rows.append(("element RNG, fused kernel (uniform_u32)", f"{fused:.0f} M draws/s"))
    rows.append(("element RNG, whole-array numpy", f"{whole:.0f} M draws/s ({fused / whole:.1f}x slower)"))

    reused = np.empty(256 << 20, np.uint8)
    fresh = (256 << 20) / timed(lambda: np.ones(256 << 20, np.uint8)) / 1e9
    again = (256 << 20) / timed(lambda: reused.fill(1)) / 1e9
    rows.append(("256 MiB: fresh buffer (first touch)", f"{fresh:.2f} GB/s; reused buffer {again:.2f} GB/s"))

    folder = tempfile.mkdtemp(dir=os.environ.get("MICRO_DIR", "bench-data" if os.path.isdir("bench-data") else None))
    try:
        block = np.random.default_rng(1).integers(0, 255, 4 << 20, dtype=np.uint8)
        for how in ("sparse", "fallocate"):
            path = os.path.join(folder, how)

            def write(path=path, how=how):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                if how == "fallocate":
                    os.posix_fallocate(fd, 0, 1 << 30)
                else:
                    os.ftruncate(fd, 1 << 30)
                for off in range(0, 1 << 30, 4 << 20):
                    os.pwrite(fd, block, off)
                os.close(fd)
            rows.append((f"1 GiB of pwrites into a {how} file", f"{(1 << 30) / timed(write, 2) / 1e9:.2f} GB/s"))

        import zarr

        from deltastream.artifact.codecs import PRESETS
        from deltastream.artifact.store import create_arrays, write_chunk
        from deltastream.methods import StoredArray

        chunk = (np.random.default_rng(2).integers(0, 64, 8 << 20) ).astype(np.uint16)
        spec = StoredArray("delta", np.dtype(np.uint16), chunk.size, chunk.size * 8, "delta")
        root = os.path.join(folder, "a.zarr")
        create_arrays(root, "t", [spec])
        array = zarr.open_array(store=root, path="t/delta", mode="r+").with_config({"write_empty_chunks": True})
        via_zarr = timed(lambda: array.__setitem__(slice(0, chunk.size), chunk))
        direct = timed(lambda: write_chunk(root, "t", spec, 1, chunk))
        rows.append(("16 MiB chunk, zarr setitem", f"{chunk.nbytes / via_zarr / 1e9:.2f} GB/s"))
        rows.append(("16 MiB chunk, direct encode + write", f"{chunk.nbytes / direct / 1e9:.2f} GB/s "
                     f"({via_zarr / direct:.1f}x faster); preset {PRESETS['delta'].blosc}"))
        rows += kernel_rows(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = "# Micro-measurements\n\n```\npython benchmarks/micro.py\n```\n\n| what | measured |\n|---|---|\n" + \
        "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/micro.md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
