"""Synthetic Llama-shaped bf16 base + fine-tune pairs, for the demo, tests of scale and benchmarks.

Real checkpoints are large and licensed, so the demo and ``benchmarks/`` make their own: this is
the one generator both use (``benchmarks/make_checkpoints.py`` is a CLI over it), so a bench pair
and a demo pair differ in shape only. ``write_pair(folder, "1B")`` writes ``folder/base`` and
``folder/ft``: Hugging Face tensor names and order, HF sharding (``max_shard_size``), a
``config.json`` (LlamaConfig, ``torch_dtype: bfloat16``) and a ``generation_config.json``.

Data model (deterministic given ``seed``; independent of ``workers``):

* 2-D weights: base ``W ~ N(0, 0.02 * s_r)`` with a per-row scale ``s_r`` log-uniform in
  [0.5, 2]; fine-tune ``= W + delta``, ``delta = rank-16 part (std lowrank_std) + dense noise
  (std noise_std * s_r)``. The defaults give a delta std of about 3.3e-4, the encoding study's
  ``small`` setting: one bf16 ulp of a weight near 0.02 is 1.2e-4, so a good share of deltas
  round away (~12 % of elements equal in base and fine-tune), as in real bf16 fine-tunes.
  ``lowrank_std=5e-4, noise_std=1e-3`` gives the study's larger ``default`` delta (std ~1.3e-3).
* RMSNorm weights: base ``1 + N(0, 0.02)``, delta ``N(0, noise_std)``; one bf16 ulp at 1.0 is
  7.8e-3, so nearly all of these deltas vanish in bf16.
* Both are rounded float32 -> bf16 to nearest even (the bits torch writes).
* ``ulps=k`` (the tie-heavy pair): the same base; the fine-tune moves every element of every
  tensor, embeddings included, by 1..k bf16 ulps up or down, so |delta| takes ~k values per
  exponent and most elements tie (as in real bf16 fine-tunes; the rank passes' hard case).

Each tensor is made in row blocks of ~4 Mi elements, each from its own seed (seed, tensor, block),
on ``workers`` threads (numpy's generators and ufuncs release the GIL), and written in place with
the streaming safetensors writer, so memory stays ~100-200 MB at any size. A marker file written
last records the parameters and file sizes; a complete pair with the same parameters is kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from .checkpoint.writer import CheckpointWriter, OutputTensor, write_at
from .units import format_size, parse_size

__all__ = ["LlamaShape", "SHAPES", "llama_tensors", "llama_config", "bf16_bits", "write_pair",
           "pair_complete", "MARKER"]

BLOCK_ELEMS = 4 << 20  # elements per generated block (16 MiB of float32 per temporary)
RANK = 16  # rank of the delta's low-rank part
MARKER = ".bench-pair.json"  # written last, into the pair's folder, once both checkpoints are complete
_OWN_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
_GENERATOR = "deltastream.synthetic"  # the safetensors __metadata__ tag of generated checkpoints


@dataclass(frozen=True)
class LlamaShape:
    """A Llama's shapes (plus the config fields that vary between sizes)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int = 2048
    rms_norm_eps: float = 1e-5
    note: str = ""

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in llama_tensors(self))


SHAPES: dict[str, LlamaShape] = {
    "demo": LlamaShape(256, 688, 4, 8, 4, 4096, note="demo toy"),  # 5.0 M parameters, 10 MB a side
    "tiny": LlamaShape(256, 688, 2, 4, 2, 2048, note="smoke-test toy"),  # 2.5 M parameters
    "0.5B": LlamaShape(1024, 4096, 28, 16, 8, 32000, note="Llama-style, ~0.5B"),  # Qwen2-0.5B-sized
    "1B": LlamaShape(2048, 5632, 22, 32, 4, 32000, note="TinyLlama-1.1B shapes"),  # 1,100,048,384
    "7B": LlamaShape(4096, 11008, 32, 32, 32, 32000, max_positions=4096, note="Llama-2-7B shapes"),
    # 70.6e9 parameters, 141 GB a side: for shape arithmetic, not meant to be generated whole
    "70B": LlamaShape(8192, 28672, 80, 64, 8, 128256, max_positions=8192, note="Llama-3-70B shapes"),
    # every tensor shape of a 70B (the 128256 x 8192 embedding and head, 8192 x 28672 MLP), 2 of its
    # 80 layers: 3.8e9 parameters, 7.6 GB a side. A real 70B is this plus 78 more layers like these
    "70B-2L": LlamaShape(8192, 28672, 2, 64, 8, 128256, max_positions=8192, note="Llama-3-70B shapes, 2 layers"),
}


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face LlamaForCausalLM state-dict order."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * (h // shape.heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for layer in range(shape.layers):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]


def llama_config(shape: LlamaShape) -> dict:
    """The ``config.json`` transformers writes for such a LlamaForCausalLM in bf16."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": shape.hidden // shape.heads,
        "hidden_act": "silu", "hidden_size": shape.hidden, "initializer_range": 0.02,
        "intermediate_size": shape.intermediate, "max_position_embeddings": shape.max_positions,
        "mlp_bias": False, "num_attention_heads": shape.heads, "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads, "pretraining_tp": 1, "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.44.0", "use_cache": True, "vocab_size": shape.vocab,
    }


def _generation_config(shape: LlamaShape, fine_tune: bool) -> dict:
    cfg = {"_from_model_config": not fine_tune, "bos_token_id": 1, "eos_token_id": 2,
           "max_length": shape.max_positions, "pad_token_id": 0, "transformers_version": "4.44.0"}
    if fine_tune:  # a chat fine-tune typically ships sampling defaults
        cfg.update({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    return cfg


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even (no NaNs here)."""
    u = x.astype(np.float32, copy=False).view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    r += u
    r >>= 16
    return r.astype(np.uint16)


def _blocks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) of a tensor's generation blocks (a 1-D tensor is one block)."""
    if len(shape) == 1:
        return [(0, shape[0])]
    rows, cols = shape
    step = max(1, BLOCK_ELEMS // cols)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _base(rng: np.random.Generator, shape: tuple[int, ...], nr: int) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 base rows of a block (and the per-row scale s_r of a 2-D one), drawn first from
    the block's stream, so every kind of fine-tune shares one base."""
    if len(shape) == 1:
        base = rng.standard_normal(nr, dtype=np.float32)
        base *= np.float32(0.02)
        base += np.float32(1.0)
        return base, None
    s_r = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=(nr, 1))).astype(np.float32)
    base = rng.standard_normal((nr, shape[1]), dtype=np.float32)
    base *= np.float32(0.02) * s_r
    return base, s_r


def _block(seed: int, ti: int, bi: int, shape: tuple[int, ...], nr: int,
           lowrank_std: float, noise_std: float, variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 (base, fine-tune) rows of block ``bi`` of tensor ``ti``: nr rows (a 1-D tensor: nr values).

    ``variant`` > 0 gives another fine-tune of the same base (its delta from streams of its own).
    """
    rng = np.random.default_rng([seed, ti, 1, bi])
    base, s_r = _base(rng, shape, nr)
    rng = np.random.default_rng([seed, ti, 1, bi, variant]) if variant else rng
    if len(shape) == 1:
        ft = rng.standard_normal(nr, dtype=np.float32)
        ft *= np.float32(noise_std)
        ft += base
        return base, ft
    cols = shape[1]
    ft = rng.standard_normal((nr, cols), dtype=np.float32)
    ft *= np.float32(noise_std) * s_r
    a = rng.standard_normal((nr, RANK), dtype=np.float32)
    # the low-rank factor is shared by the tensor's blocks: remade per block (cheap) from its own seed
    b = np.random.default_rng([seed, ti, 0, variant] if variant else [seed, ti, 0]).standard_normal(
        (RANK, cols), dtype=np.float32)
    b *= np.float32(lowrank_std / math.sqrt(RANK))
    ft += a @ b
    ft += base
    return base, ft


def _ulp_block(seed: int, ti: int, bi: int, shape: tuple[int, ...], nr: int, ulps: int,
               variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """bf16 bits (base, fine-tune) of a block whose fine-tune moves every element of every tensor
    (embeddings and norms included) by 1..ulps bf16 ulps, up or down at random: |delta| then takes
    a few values per exponent, so most elements tie with others (the rank passes' worst case)."""
    base = bf16_bits(_base(np.random.default_rng([seed, ti, 1, bi]), shape, nr)[0])
    rng = np.random.default_rng([seed, ti, 2, bi, variant])
    step = rng.integers(1, ulps + 1, size=base.shape, dtype=np.uint16)
    up = rng.random(base.shape, dtype=np.float32) < 0.5
    up |= (base & np.uint16(0x7FFF)) < step  # never through zero: the sign bit would flip to -0 / NaN
    ft = np.where(up, base + step, base - step).astype(np.uint16)  # the bit pattern is sign + magnitude
    return base, ft


def _resolve(shape: str | LlamaShape) -> tuple[str, LlamaShape]:
    if isinstance(shape, str):
        return shape, SHAPES[shape]
    return next((k for k, v in SHAPES.items() if v == shape), "custom"), shape


def _marker_doc(name: str, shape: LlamaShape, seed: int, lowrank_std: float, noise_std: float,
                max_shard: int, variant: int = 0, ulps: int = 0) -> dict:
    delta = {"seed": seed, "lowrank_std": lowrank_std, "noise_std": noise_std,
             **({"variant": variant} if variant else {}), **({"ulps": ulps} if ulps else {})}
    return {"size": name, "spec": asdict(shape), "delta": delta,
            "max_shard_size": max_shard, "block_elems": BLOCK_ELEMS, "format": 1}


def _folder_files(folder: str) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


def pair_complete(folder: str, shape: str | LlamaShape, *, seed: int = 0, lowrank_std: float = 1.5e-4,
                  noise_std: float = 2.5e-4, max_shard_size: str | int = "1GB", variant: int = 0,
                  ulps: int = 0) -> bool:
    """True if ``folder`` holds a complete pair made with exactly these parameters."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    want = _marker_doc(*_resolve(shape), seed, lowrank_std, noise_std, parse_size(max_shard_size), variant, ulps)
    if {k: marker.get(k) for k in want} != json.loads(json.dumps(want)):
        return False
    return all(os.path.isdir(os.path.join(folder, sub))
               and _folder_files(os.path.join(folder, sub)) == marker.get("files", {}).get(sub)
               for sub in ("base", "ft"))


def _clear(folder: str, force: bool) -> None:
    """Remove a previous (partial) checkpoint folder; refuse on files this module does not make."""
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise FileExistsError(f"{folder} exists and is not a folder")
    foreign = [n for n in os.listdir(folder) if not (n.endswith(".safetensors") or n in _OWN_FILES)]
    if foreign and not force:
        raise FileExistsError(f"{folder} holds files the generator did not write ({foreign[:3]}); "
                              "use force=True (--force) to replace the folder")
    shutil.rmtree(folder)


def write_pair(folder: str, shape: str | LlamaShape, *, seed: int = 0, lowrank_std: float = 1.5e-4,
               noise_std: float = 2.5e-4, max_shard_size: str | int = "1GB", workers: int | None = None,
               force: bool = False, verbose: bool = False, variant: int = 0, ulps: int = 0) -> tuple[str, str]:
    """Write ``folder/base`` and ``folder/ft`` (kept if already complete, unless ``force``); return their paths.

    ``shape`` is a LlamaShape or a key of SHAPES; ``workers`` threads (default: the CPU count).
    ``variant`` > 0 makes another fine-tune of the same base (the base files are identical).
    ``ulps`` > 0 makes a tie-heavy fine-tune instead: every element 1..ulps bf16 ulps off the base
    (same base again; ``lowrank_std`` and ``noise_std`` unused).
    """
    if not 0 <= ulps < 64:
        raise ValueError(f"ulps must be in [0, 64), not {ulps}")
    name, spec = _resolve(shape)
    paths = os.path.join(folder, "base"), os.path.join(folder, "ft")
    max_shard = parse_size(max_shard_size, "max shard size")
    if not force and pair_complete(folder, spec, seed=seed, lowrank_std=lowrank_std, noise_std=noise_std,
                                   max_shard_size=max_shard, variant=variant, ulps=ulps):
        if verbose:
            print(f"{folder}: complete {name} pair already there (use --force to regenerate)")
        return paths
    start = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    marker_path = os.path.join(folder, MARKER)
    if os.path.exists(marker_path):
        os.remove(marker_path)
    tensors = llama_tensors(spec)
    outs = [OutputTensor(t, "BF16", s) for t, s in tensors]
    writers = []
    for path, role in zip(paths, ("base", "ft")):
        _clear(path, force)
        os.makedirs(path)
        writers.append(CheckpointWriter(path, outs, max_shard,
                                        {"generator": _GENERATOR, "size": name, "seed": str(seed), "role": role}))
        writers[-1].create()
        for fname, doc in (("config.json", llama_config(spec)),
                           ("generation_config.json", _generation_config(spec, role == "ft"))):
            with open(os.path.join(path, fname), "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")

    def run(job: tuple) -> tuple[int, int]:
        ti, tname, tshape, bi, r0, r1 = job
        bits = (_ulp_block(seed, ti, bi, tshape, r1 - r0, ulps, variant) if ulps else
                [bf16_bits(x) for x in _block(seed, ti, bi, tshape, r1 - r0, lowrank_std, noise_std, variant)])
        row_bytes = 2 * (tshape[1] if len(tshape) == 2 else 1)
        for writer, b in zip(writers, bits):
            path, offset = writer.location(tname)
            write_at(path, offset + r0 * row_bytes, b, tname)
        return int(np.count_nonzero(bits[0] == bits[1])), bits[0].size

    jobs = [(ti, t, s, bi, r0, r1) for ti, (t, s) in enumerate(tensors) for bi, (r0, r1) in enumerate(_blocks(s))]
    total_bytes, done, equal, next_report = 2 * writers[0].total_size, 0, 0, start + 5
    with ThreadPoolExecutor(workers or os.cpu_count() or 1, thread_name_prefix="synthetic") as pool:
        for eq, n in pool.map(run, jobs):
            equal, done = equal + eq, done + 4 * n
            if verbose and time.perf_counter() >= next_report:
                next_report += 5
                el = time.perf_counter() - start
                print(f"  {name}: {100 * done / total_bytes:5.1f}%  {format_size(done)} in {el:.0f}s "
                      f"({done / el / 1e6:.0f} MB/s)", flush=True)
    for path in paths:
        for fname in os.listdir(path):
            if fname.endswith(".safetensors"):
                fd = os.open(os.path.join(path, fname), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    elapsed = time.perf_counter() - start
    doc = _marker_doc(name, spec, seed, lowrank_std, noise_std, max_shard, variant, ulps)
    doc.update(files={role: _folder_files(p) for role, p in zip(("base", "ft"), paths)}, params=spec.n_params,
               equal_fraction=equal / max(done // 4, 1), seconds=round(elapsed, 2))
    with open(marker_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(marker_path + ".tmp", marker_path)
    if verbose:
        print(f"{folder}: wrote {name} pair ({spec.note}): {spec.n_params / 1e9:.3f}e9 params, "
              f"{len(tensors)} tensors, {len(writers[0].shards)} shard(s), 2 x {format_size(writers[0].total_size)}; "
              f"bf16 elements equal in base and ft: {100 * doc['equal_fraction']:.1f}%; "
              f"took {elapsed:.1f}s ({total_bytes / elapsed / 1e6:.0f} MB/s)")
    return paths
