#!/usr/bin/env python
"""Generate a synthetic Llama-shaped bf16 base + fine-tune checkpoint pair, by size name.

    python benchmarks/make_checkpoints.py --size 1B --out bench-data/1B

writes ``bench-data/1B/base`` and ``bench-data/1B/ft``: Hugging Face style sharded safetensors
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or one
``model.safetensors`` when everything fits in one shard), a ``config.json`` (LlamaConfig fields,
``torch_dtype: bfloat16``) and a ``generation_config.json``. A pair that is already there and
complete (same size, seed and delta parameters) is kept unless ``--force``.

Data model (deterministic given ``--seed``; independent of ``--workers``):

* 2-D weights: base ``W ~ N(0, 0.02 * s_r)`` with a per-row scale ``s_r`` log-uniform in
  [0.5, 2]; fine-tune ``= W + delta`` with ``delta = rank-16 part (std --lowrank-std)
  + dense noise (std --noise-std * s_r)``. The defaults give a delta std of about 3.3e-4, the
  encoding study's ``small`` setting: one bf16 ulp of a weight near 0.02 is 1.2e-4, so a good
  share of deltas round away and the two bf16 tensors have exact-equal elements.
* RMSNorm weights: base ``1 + N(0, 0.02)``, delta dense ``N(0, --noise-std)``; one bf16 ulp at
  1.0 is 7.8e-3, so nearly all of these deltas vanish in bf16 (as in real fine-tunes).
* Both are rounded float32 -> bf16 with round-to-nearest-even (same bits as torch).

Everything is generated in row blocks of about 4 Mi elements, on ``--workers`` threads (numpy's
generators and ufuncs release the GIL), and written in place with deltastream's streaming
safetensors writer, so peak RSS stays around 100-200 MB whatever the size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from deltastream.checkpoint.writer import CheckpointWriter, OutputTensor, write_at
from deltastream.units import format_size, parse_size

__all__ = ["SIZES", "ModelSpec", "tensor_list", "param_count", "make_pair", "pair_complete", "main"]

BLOCK_ELEMS = 4 << 20  # elements per generated block (16 MiB of float32 per temporary)
LOWRANK_RANK = 16
MARKER = ".bench-pair.json"  # written last, into --out, once both checkpoints are complete
OWN_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 2048
    rms_norm_eps: float = 1e-5
    note: str = ""


SIZES: dict[str, ModelSpec] = {
    # ~2.5 M parameters, ~5 MB per checkpoint: a smoke run
    "tiny": ModelSpec(256, 688, 2, 4, 2, 2048, note="smoke-test toy"),
    # ~0.51e9 parameters: a Llama with hidden 1024, GQA 16/8 heads, 28 layers (Qwen2-0.5B-sized)
    "0.5B": ModelSpec(1024, 4096, 28, 16, 8, 32000, note="Llama-style, ~0.5B"),
    # TinyLlama-1.1B shapes: 1,100,048,384 parameters
    "1B": ModelSpec(2048, 5632, 22, 32, 4, 32000, note="TinyLlama-1.1B shapes"),
    # Llama-2-7B shapes: 6,738,415,616 parameters
    "7B": ModelSpec(4096, 11008, 32, 32, 32, 32000, max_positions=4096, rms_norm_eps=1e-5,
                    note="Llama-2-7B shapes"),
}


def tensor_list(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face LlamaForCausalLM state-dict order."""
    h, i = spec.hidden, spec.intermediate
    head_dim = h // spec.heads
    kv = spec.kv_heads * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def param_count(spec: ModelSpec) -> int:
    return sum(math.prod(s) for _, s in tensor_list(spec))


def llama_config(spec: ModelSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.hidden // spec.heads,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_positions,
        "mlp_bias": False,
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.44.0",
        "use_cache": True,
        "vocab_size": spec.vocab,
    }


def generation_config(spec: ModelSpec, fine_tune: bool) -> dict:
    cfg = {"_from_model_config": not fine_tune, "bos_token_id": 1, "eos_token_id": 2,
           "max_length": spec.max_positions, "pad_token_id": 0, "transformers_version": "4.44.0"}
    if fine_tune:  # a chat fine-tune typically ships sampling defaults
        cfg.update({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    return cfg


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (no NaNs here)."""
    u = x.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


@dataclass(frozen=True)
class DeltaParams:
    seed: int
    lowrank_std: float
    noise_std: float


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of a tensor's generation blocks (a 1-D tensor is one block)."""
    if len(shape) == 1:
        return [(0, shape[0])]
    rows, cols = shape
    step = max(1, BLOCK_ELEMS // cols)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


class _Pair:
    """Generates blocks of one tensor pair and writes them into base/ and ft/."""

    def __init__(self, base_w: CheckpointWriter, ft_w: CheckpointWriter, params: DeltaParams):
        self.base_w, self.ft_w, self.params = base_w, ft_w, params
        self._lowrank_b: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.equal = 0
        self.total = 0

    def lowrank_b(self, ti: int, cols: int) -> np.ndarray:
        with self._lock:
            b = self._lowrank_b.get(ti)
            if b is None:
                rng = np.random.default_rng([self.params.seed, ti, 0])
                b = rng.standard_normal((LOWRANK_RANK, cols), dtype=np.float32)
                b *= np.float32(self.params.lowrank_std / math.sqrt(LOWRANK_RANK))
                self._lowrank_b[ti] = b
            return b

    def drop(self, ti: int) -> None:
        with self._lock:
            self._lowrank_b.pop(ti, None)

    def block(self, ti: int, name: str, shape: tuple[int, ...], bi: int, r0: int, r1: int) -> None:
        p = self.params
        rng = np.random.default_rng([p.seed, ti, 1, bi])
        if len(shape) == 1:
            n = r1 - r0
            base = rng.standard_normal(n, dtype=np.float32)
            base *= np.float32(0.02)
            base += np.float32(1.0)
            ft = rng.standard_normal(n, dtype=np.float32)
            ft *= np.float32(p.noise_std)
            ft += base
            row_bytes = 2
        else:
            cols = shape[1]
            nr = r1 - r0
            s_r = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=(nr, 1))).astype(np.float32)
            base = rng.standard_normal((nr, cols), dtype=np.float32)
            base *= np.float32(0.02) * s_r
            ft = rng.standard_normal((nr, cols), dtype=np.float32)
            ft *= np.float32(p.noise_std) * s_r
            a = rng.standard_normal((nr, LOWRANK_RANK), dtype=np.float32)
            ft += a @ self.lowrank_b(ti, cols)
            ft += base
            row_bytes = 2 * cols
        base_bits = to_bf16_bits(base)
        del base
        ft_bits = to_bf16_bits(ft)
        del ft
        equal = int(np.count_nonzero(base_bits == ft_bits))
        for writer, bits in ((self.base_w, base_bits), (self.ft_w, ft_bits)):
            path, offset = writer.location(name)
            write_at(path, offset + r0 * row_bytes, bits, name)
        with self._lock:
            self.equal += equal
            self.total += base_bits.size


# ----------------------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------------------
def _marker_doc(size: str, spec: ModelSpec, params: DeltaParams, max_shard: int) -> dict:
    return {"size": size, "spec": asdict(spec), "delta": asdict(params), "max_shard_size": max_shard,
            "block_elems": BLOCK_ELEMS, "format": 1}


def _folder_files(folder: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def pair_complete(out: str, size: str, seed: int = 0, lowrank_std: float = 1.5e-4, noise_std: float = 2.5e-4,
                  max_shard_size: str | int = "1GB") -> bool:
    """True if ``out`` holds a complete pair made with exactly these parameters."""
    try:
        with open(os.path.join(out, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    want = _marker_doc(size, SIZES[size], DeltaParams(seed, lowrank_std, noise_std), parse_size(max_shard_size))
    if {k: marker.get(k) for k in want} != json.loads(json.dumps(want)):
        return False
    for sub in ("base", "ft"):
        folder = os.path.join(out, sub)
        if not os.path.isdir(folder) or _folder_files(folder) != marker.get("files", {}).get(sub):
            return False
    return True


def _clear(folder: str, force: bool) -> None:
    """Remove a previous (partial) checkpoint folder; refuse on files this script does not make."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise SystemExit(f"make_checkpoints: error: {folder} exists and is not a folder")
    foreign = [n for n in os.listdir(folder) if not (n.endswith(".safetensors") or n in OWN_FILES)]
    if foreign and not force:
        raise SystemExit(f"make_checkpoints: error: {folder} holds files this script did not write "
                         f"({foreign[:3]}); use --force to replace the folder")
    shutil.rmtree(folder)


def make_pair(size: str, out: str, *, seed: int = 0, lowrank_std: float = 1.5e-4, noise_std: float = 2.5e-4,
              max_shard_size: str | int = "1GB", workers: int | None = None, force: bool = False,
              verbose: bool = True) -> dict:
    """Write ``out/base`` and ``out/ft``; returns a summary (skips a complete pair unless force)."""
    spec = SIZES[size]
    params = DeltaParams(seed, lowrank_std, noise_std)
    max_shard = parse_size(max_shard_size, "max shard size")
    if not force and pair_complete(out, size, seed, lowrank_std, noise_std, max_shard):
        if verbose:
            print(f"{out}: complete {size} pair already there (use --force to regenerate)")
        return {"skipped": True, "out": out}

    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    marker_path = os.path.join(out, MARKER)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    tensors = tensor_list(spec)
    outs = [OutputTensor(name, "BF16", shape) for name, shape in tensors]
    metadata = {"generator": "deltastream benchmarks/make_checkpoints.py", "size": size, "seed": str(seed)}
    writers = {}
    for sub in ("base", "ft"):
        folder = os.path.join(out, sub)
        _clear(folder, force)
        os.makedirs(folder)
        writers[sub] = CheckpointWriter(folder, outs, max_shard, {**metadata, "role": sub})
        writers[sub].create()
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(llama_config(spec), f, indent=2)
            f.write("\n")
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config(spec, fine_tune=(sub == "ft")), f, indent=2)
            f.write("\n")

    pair = _Pair(writers["base"], writers["ft"], params)
    jobs = [(ti, name, shape, bi, r0, r1) for ti, (name, shape) in enumerate(tensors)
            for bi, (r0, r1) in enumerate(_blocks(shape))]
    last_block = {ti: bi for ti, _, _, bi, _, _ in jobs}
    n_workers = workers or os.cpu_count() or 1
    done = 0
    total_bytes = 2 * writers["base"].total_size
    next_report = time.perf_counter() + 5

    def run(job):
        ti, name, shape, bi, r0, r1 = job
        pair.block(ti, name, shape, bi, r0, r1)
        if bi == last_block[ti]:
            pair.drop(ti)  # blocks of a tensor are submitted in order; a straggler just remakes it
        return 2 * (r1 - r0) * (shape[1] if len(shape) == 2 else 1) * 2

    with ThreadPoolExecutor(n_workers, thread_name_prefix="make-ckpt") as pool:
        for nbytes in pool.map(run, jobs):
            done += nbytes
            if verbose and time.perf_counter() >= next_report:
                next_report += 5
                el = time.perf_counter() - start
                print(f"  {size}: {100 * done / total_bytes:5.1f}%  {format_size(done)} in {el:.0f}s "
                      f"({done / el / 1e6:.0f} MB/s)", flush=True)

    for sub in ("base", "ft"):
        for name in os.listdir(os.path.join(out, sub)):
            if name.endswith(".safetensors"):
                fd = os.open(os.path.join(out, sub, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    doc = _marker_doc(size, spec, params, max_shard)
    doc["files"] = {sub: _folder_files(os.path.join(out, sub)) for sub in ("base", "ft")}
    doc["params"] = param_count(spec)
    doc["equal_fraction"] = pair.equal / max(pair.total, 1)
    elapsed = time.perf_counter() - start
    doc["seconds"] = round(elapsed, 2)
    with open(marker_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(marker_path + ".tmp", marker_path)
    if verbose:
        n_shards = len(writers["base"].shards)
        print(f"{out}: wrote {size} pair ({spec.note}): {param_count(spec) / 1e9:.3f}e9 params, "
              f"{len(tensors)} tensors, {n_shards} shard(s), 2 x {format_size(writers['base'].total_size)}; "
              f"bf16 elements equal in base and ft: {100 * doc['equal_fraction']:.1f}%; "
              f"took {elapsed:.1f}s ({total_bytes / elapsed / 1e6:.0f} MB/s)")
    return {"skipped": False, "out": out, **doc}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, choices=list(SIZES), help="model size name")
    ap.add_argument("--out", required=True, help="folder to hold base/ and ft/ (e.g. bench-data/1B)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--lowrank-std", type=float, default=1.5e-4, help="std of the rank-16 delta part")
    ap.add_argument("--noise-std", type=float, default=2.5e-4, help="std of the dense delta part (x row scale)")
    ap.add_argument("--max-shard-size", default="1GB", help="largest shard, HF style (default 1GB)")
    ap.add_argument("--workers", type=int, default=None, help="generator threads (default: CPU count)")
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete pair is there")
    args = ap.parse_args(argv)
    make_pair(args.size, args.out, seed=args.seed, lowrank_std=args.lowrank_std, noise_std=args.noise_std,
              max_shard_size=args.max_shard_size, workers=args.workers, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
