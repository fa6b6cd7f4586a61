"""On a CUDA machine: do the GPU building blocks give the CPU's bits, and how fast are they?

    python benchmarks/gpu_check.py            # needs torch with CUDA; numpy; nothing else

The GPU offload (issue 5) rests on three facts, checked here on 1B-shaped tensors (a 5632 x 2048
MLP matrix and a 32000 x 2048 embedding, bf16) made on the spot:

1. the element RNG (deltastream/rng.py) gives the same 32-bit draws on CUDA as numpy on the CPU;
2. float32 -> bf16 rounding on CUDA (``tensor.to(torch.bfloat16)``) gives the bits of deltastream's
   numpy rounding (round to nearest even), and bf16 -> float32 widening is exact on both;
3. a DARE edit (mask from the RNG, rescale, round) and a BitDelta encode (signs, exact mean
   magnitude) computed with torch on the GPU equal the numpy computation bit for bit;

and it measures GB/s of bf16 input for the DARE and BitDelta kernels on the GPU (including the
host-to-device copy of the chunk and the copy back, from pinned memory), and on the CPU with numpy.
It loads rng.py by path, so it runs where deltastream's other dependencies are not installed.
Where deltastream imports (its dependencies carried as wheels), it also runs the real jobs on a
1B-shaped pair: ``compress`` (bitdelta, dare) and ``edit``/``apply`` with ``--device cuda``
against the CPU, checking the bits and timing both (``--pair DIR`` reuses a pair).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("ds_rng", os.path.join(HERE, "..", "deltastream", "rng.py"))
rng = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rng)


def bf16_round_np(x: np.ndarray) -> np.ndarray:
    """deltastream.dtypes.from_float32 for BF16 (finite values): round to nearest even."""
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def widen_np(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def synthetic(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    base = (g.standard_normal((rows, cols), dtype=np.float32) * 0.02)
    ft = base + g.standard_normal((rows, cols), dtype=np.float32) * 3e-4
    return bf16_round_np(base.ravel()), bf16_round_np(ft.ravel())


def dare_np(base_bits, ft_bits, key, p):
    base, ft = widen_np(base_bits), widen_np(ft_bits)
    keep = rng.uniform_u32(key, 0, base.size) >= np.uint32(rng.threshold_u32(p))
    delta = (ft - base) * np.float32(1 / (1 - p))
    delta[~keep] = 0
    return bf16_round_np(base + delta)


def dare_torch(base_bits, ft_bits, key, p, device):
    b = base_bits.view(torch.bfloat16).to(torch.float32)  # exact widening
    f = ft_bits.view(torch.bfloat16).to(torch.float32)
    keep = rng.uniform_u32_torch(key, 0, b.numel(), device=device) >= rng.threshold_u32(p)
    delta = (f - b) * float(np.float32(1 / (1 - p)))
    delta = torch.where(keep, delta, torch.zeros((), device=device))
    return (b + delta).to(torch.bfloat16).view(torch.int16)


def bitdelta_np(base_bits, ft_bits):
    delta = widen_np(ft_bits) - widen_np(base_bits)
    signs = np.packbits(delta >= 0)
    return signs, np.abs(delta).astype(np.float64).sum()


def bitdelta_torch(base_bits, ft_bits):
    delta = ft_bits.view(torch.bfloat16).to(torch.float32) - base_bits.view(torch.bfloat16).to(torch.float32)
    positive = (delta >= 0).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=delta.device)
    signs = (positive * weights).sum(dim=1, dtype=torch.uint8)
    return signs, delta.abs().to(torch.float64).sum()


def timed(fn, repeat=5):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failures = 0
    key = rng.tensor_key(0, "model.layers.0.mlp.up_proj.weight")
    for start, n in ((0, 1 << 26), (2**32 - 1000, 5000), (123_456_789, 1 << 20)):
        on_device = rng.uniform_u32_torch(key, start, start + n, device=device).cpu().numpy().astype(np.uint32)
        same = np.array_equal(rng.uniform_u32(key, start, start + n), on_device)
        print(f"1. element RNG, elements {start}..{start + n}: numpy == CUDA: {same}")
        failures += not same
    x = np.random.default_rng(1).standard_normal(1 << 24).astype(np.float32) * np.float32(0.05)
    same = np.array_equal(bf16_round_np(x), torch.from_numpy(x).to(device).to(torch.bfloat16).view(torch.int16)
                          .cpu().numpy().view(np.uint16))
    print(f"2. float32 -> bf16 rounding, 16M values: numpy == CUDA: {same}")
    failures += not same
    for rows, cols, name in ((5632, 2048, "mlp"), (32000, 2048, "embedding")):
        base_bits, ft_bits = synthetic(rows, cols, 7)
        bb = torch.from_numpy(base_bits.view(np.int16)).pin_memory()
        fb = torch.from_numpy(ft_bits.view(np.int16)).pin_memory()
        gb, gf = bb.to(device, non_blocking=True), fb.to(device, non_blocking=True)
        torch.cuda.synchronize()
        cpu_start = time.perf_counter()
        dare_cpu = dare_np(base_bits, ft_bits, key, 0.9)
        cpu_dare_s = time.perf_counter() - cpu_start
        same = np.array_equal(dare_cpu, dare_torch(gb, gf, key, 0.9, device).cpu().numpy().view(np.uint16))
        print(f"3a. DARE p=0.9 edit, {name} {rows}x{cols}: numpy == CUDA bits: {same}")
        failures += not same
        signs_cpu, sum_cpu = bitdelta_np(base_bits, ft_bits)
        signs_gpu, sum_gpu = bitdelta_torch(gb, gf)
        same = np.array_equal(signs_cpu, signs_gpu.cpu().numpy())
        print(f"3b. BitDelta packed signs, {name}: numpy == CUDA: {same}; mean |delta| "
              f"{sum_cpu / base_bits.size:.9g} vs {float(sum_gpu) / base_bits.size:.9g} (float64 sums; deltastream "
              "uses order-independent fixed point for exact equality)")
        failures += not same
        nbytes = 2 * base_bits.nbytes
        out = torch.empty(base_bits.size, dtype=torch.int16).pin_memory()

        def dare_round_trip(bb=bb, fb=fb, out=out):
            b, f = bb.to(device, non_blocking=True), fb.to(device, non_blocking=True)
            out.copy_(dare_torch(b, f, key, 0.9, device), non_blocking=True)

        def bitdelta_round_trip(bb=bb, fb=fb):
            b, f = bb.to(device, non_blocking=True), fb.to(device, non_blocking=True)
            signs, total = bitdelta_torch(b, f)
            signs.cpu()

        t_dare = timed(dare_round_trip)
        t_bd = timed(bitdelta_round_trip)
        print(f"   speed, {name}: DARE {nbytes / t_dare / 1e9:.1f} GB/s, BitDelta {nbytes / t_bd / 1e9:.1f} GB/s of "
              f"bf16 input on the GPU (copies in and out included); numpy DARE on one CPU core "
              f"{nbytes / cpu_dare_s / 1e9:.2f} GB/s")
    failures += jobs_check(sys.argv[sys.argv.index("--pair") + 1] if "--pair" in sys.argv else "/tmp/gpu-pair")
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


def jobs_check(folder: str) -> int:
    """The real compress/edit/apply with --device cuda against the CPU, on a 1B-shaped pair."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    try:
        import deltastream as ds
        from deltastream.synthetic import write_pair
    except ImportError as exc:
        print(f"4. deltastream jobs: skipped (deltastream does not import here: {exc})")
        return 0
    start = time.perf_counter()
    base, ft = write_pair(folder, "1B")
    print(f"4. 1B pair ready in {time.perf_counter() - start:.0f} s")
    gb = sum(os.path.getsize(os.path.join(d, f)) for d in (base, ft) for f in os.listdir(d)) / 1e9
    failures = 0
    from deltastream.methods import METHODS, backends

    # every method with a registered torch implementation, at its default parameters
    for method in sorted({impl.method.method_id for impl in backends.implementations("torch")}):
        params, compact = {"p": 0.9} if method == "dare" else {}, METHODS[method].compact
        times = {}
        for device in ("cpu", "cuda"):
            t0 = time.perf_counter()
            art = out = None
            if compact:
                art = ds.compress(base, ft, os.path.join(folder, f"{method}-{device}.dsz"), method, overwrite=True,
                                  device=device, **params)
            t1 = time.perf_counter()
            if compact:
                out = ds.apply(base, art, os.path.join(folder, f"{method}-{device}-out"), overwrite=True,
                               device=device)
            t2 = time.perf_counter()
            edited = ds.edit(base, ft, os.path.join(folder, f"{method}-{device}-edit"), method, overwrite=True,
                             device=device, **params)
            times[device] = (t1 - t0, t2 - t1, time.perf_counter() - t2, out, edited)
        from deltastream.checkpoint import open_checkpoint, read_bits

        def same(a, b):
            ca, cb = open_checkpoint(a), open_checkpoint(b)
            return all(np.array_equal(read_bits(t, 0, t.numel), read_bits(cb.tensors[n], 0, t.numel))
                       for n, t in ca.tensors.items())
        ok = (not compact or same(times["cpu"][3], times["cuda"][3])) and same(times["cpu"][4], times["cuda"][4])
        failures += not ok
        c, g = times["cpu"], times["cuda"]
        rates = (f"compress {gb / c[0]:.2f} -> {gb / g[0]:.2f} GB/s, apply {c[1]:.1f} -> {g[1]:.1f} s, "
                 if compact else "")
        print(f"4. {method}: cuda == cpu bits: {ok}; {rates}edit {c[2]:.1f} -> {g[2]:.1f} s (cpu -> cuda)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
