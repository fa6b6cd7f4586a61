"""Synthetic Llama-shaped base/fine-tune pairs, written streamed, for the demo and benchmarks.

The shapes are real Llama shapes (names and order as Hugging Face writes them); the values are
a base ~ N(0, 0.02) (norm gains ~ 1) and a fine-tune = base + a structured small delta: a
low-rank part plus dense noise, about 5% of the weights' scale, as SFT deltas are. Both are
rounded to bf16, so many delta entries are exactly zero, as in real bf16 checkpoints. Every
tensor is generated in row blocks from a seed derived from (seed, tensor index, block): the files
are deterministic and memory stays at one block whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .checkpoint.writer import CheckpointWriter, OutputTensor, write_at

__all__ = ["LlamaShape", "SHAPES", "llama_tensors", "write_pair", "bf16_bits"]


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in llama_tensors(self))


SHAPES = {
    "demo": LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=4096),
    "tiny": LlamaShape(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=4, vocab=8192),
    "0.5B": LlamaShape(hidden=1536, intermediate=4096, layers=16, heads=12, kv_heads=4, vocab=32000),
    "1B": LlamaShape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),  # TinyLlama
    "7B": LlamaShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),  # Llama-2
    "70B": LlamaShape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),  # Llama-3
}


def llama_tensors(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama, in Hugging Face's order."""
    h, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    out = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab, h))]
    return out


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch does)."""
    bits = x.astype(np.float32, copy=False).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _config(shape: LlamaShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def write_pair(folder: str, shape: LlamaShape, *, seed: int = 0, delta_scale: float = 0.05,
               max_shard_size: int = 5 * 10**9, block_bytes: int = 32 << 20) -> tuple[str, str]:
    """Write ``folder/base`` and ``folder/ft``; return their paths."""
    tensors = llama_tensors(shape)
    outputs = [OutputTensor(name, "BF16", s) for name, s in tensors]
    paths = []
    writers = []
    for which in ("base", "ft"):
        path = os.path.join(folder, which)
        os.makedirs(path, exist_ok=True)
        writer = CheckpointWriter(path, outputs, max_shard_size)
        writer.create()
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_config(shape), f, indent=2)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 256}, f, indent=2)
        paths.append(path)
        writers.append(writer)
    for index, (name, s) in enumerate(tensors):
        _write_tensor(writers, name, s, (seed, index), delta_scale, block_bytes)
    with open(os.path.join(folder, "shape.json"), "w") as f:
        json.dump({**asdict(shape), "seed": seed, "delta_scale": delta_scale}, f)
    return paths[0], paths[1]


def _write_tensor(writers, name, shape, key: tuple[int, int], delta_scale: float, block_bytes: int):
    cols = shape[-1]
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    is_norm = len(shape) == 1
    rank = 8
    setup = np.random.default_rng([*key, 0])
    v = setup.standard_normal((rank, cols), dtype=np.float32)  # low-rank direction of the delta
    block_rows = max(1, block_bytes // (4 * cols))
    for b, r0 in enumerate(range(0, rows, block_rows)):
        n = min(block_rows, rows - r0)
        rng = np.random.default_rng([*key, b + 1])
        if is_norm:
            base = 1.0 + rng.standard_normal((n, cols), dtype=np.float32) * 0.05
            delta = rng.standard_normal((n, cols), dtype=np.float32) * (0.02 * delta_scale)
        else:
            base = rng.standard_normal((n, cols), dtype=np.float32)
            base *= 0.02
            u = rng.standard_normal((n, rank), dtype=np.float32)
            delta = (u @ v) * (0.02 * delta_scale * 0.5 / math.sqrt(rank))
            delta += rng.standard_normal((n, cols), dtype=np.float32) * (0.02 * delta_scale * 0.5)
        delta += base
        offset = r0 * cols * 2
        for writer, values in zip(writers, (base, delta)):
            path, start = writer.location(name)
            write_at(path, start + offset, bf16_bits(values), name)
