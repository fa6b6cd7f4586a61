"""LoRA in: a PEFT adapter folder read, over its base, as the fine-tune it stands for.

A PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) changes each
targeted linear weight ``W`` (d x k) by ``B @ A * scale`` (``A`` r x k, ``B`` d x r; ``scale`` =
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and ``lora_alpha`` per
module from ``rank_pattern`` / ``alpha_pattern`` as PEFT matches them). :func:`open_adapter`
opens it as a :class:`~deltastream.checkpoint.Checkpoint` whose tensors are the base's, with:

- a targeted weight: a :class:`LoraTensor`, whose ``read(start, stop)`` computes those elements
  of ``round(base + B @ A * scale)`` in the base's dtype: the rows [r0, r1) the range touches
  need only rows [r0, r1) of ``B`` (and ``A``, r x k), so no chunk ever holds more than its own
  rows of the delta. The sum over the rank is taken in a fixed order in float32, element by
  element, so a chunk's bits do not depend on how the tensor is cut. A transposed layout
  (``fan_in_fan_out``, GPT-2's Conv1D, and PEFT's ``lora_embedding_A/B`` of an embedding) reads
  columns [r0, r1) of ``A`` instead, one short range per rank row, and all of ``B`` (k x r);
- a ``modules_to_save`` tensor (and a ``base_layer.weight`` PEFT saves with an embedding's
  LoRA): the adapter's full tensor, in place of the base's (the LoRA is added to it);
- every other tensor: the base's, bit for bit.

What it cannot stand for is refused, one line, before any output exists: DoRA (``use_dora``),
``lora_bias``, a convolution's LoRA, trainable token indices, layer replication, target
parameters, an adapter of another base shape, a module the base lacks.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from ..checkpoint import Checkpoint, TensorInfo, open_checkpoint, read_bits
from ..checkpoint.header import load_json, open_regular
from ..dtypes import from_float32, to_float32
from ..errors import CheckpointError, MismatchError, WrongBaseError, escape, tensor_context
from .kernels import lora_rows

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraTensor", "is_adapter", "open_adapter", "read_config",
           "pattern_value", "PREFIX"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's prefix of a causal LM's saved tensor names (the base model's own names follow it)
PREFIX = "base_model.model."
_MAX_CONFIG_BYTES = 16 << 20
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|"
                       r"^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")
#: options that change what a module computes beyond base + B A scale: refused when set
_REFUSED = {"use_dora": "DoRA (use_dora) adapters are not supported: their magnitude vector rescales "
                        "each column of base + BA; merge it with peft first",
            "lora_bias": "lora_bias adapters are not supported (lora_B carries a bias)",
            "trainable_token_indices": "trainable_token_indices adapters are not supported",
            "layer_replication": "layer_replication adapters are not supported",
            "target_parameters": "target_parameters adapters are not supported"}


def is_adapter(path: str) -> bool:
    """A folder holding ``adapter_config.json`` (its weights are checked when opened)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_config(path: str) -> dict:
    """The adapter's config, checked to be a LoRA PEFT can merge into its base."""
    where = os.path.join(path, ADAPTER_CONFIG)
    with open_regular(where, _MAX_CONFIG_BYTES, "adapter config") as f:
        doc = load_json(where, f.read(_MAX_CONFIG_BYTES), "adapter config")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{tensor_context(where)}: not a PEFT adapter config (not a JSON object)")
    if doc.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{tensor_context(where)}: peft_type '{escape(doc.get('peft_type'))}' is not "
                              "supported (only LORA adapters)")
    for key, why in _REFUSED.items():
        if doc.get(key):
            raise CheckpointError(f"{tensor_context(where)}: {why}")
    for key in ("r", "lora_alpha"):
        value = doc.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{tensor_context(where)}: '{key}' must be a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(doc.get(key) or {}, dict):
            raise CheckpointError(f"{tensor_context(where)}: '{key}' must be an object")
    return doc


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key that matches the module's
    name as a whole or as a dotted suffix (a regex), else the default."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraTensor(TensorInfo):
    """A targeted weight, read as round(base + B @ A * scale) in the base's dtype (``path`` is
    the adapter's weights file, for messages; ``offset`` -1: never a range of a file)."""

    base: TensorInfo
    a: TensorInfo
    b: TensorInfo
    scale: float
    transposed: bool  # delta = (B @ A)^T: fan_in_fan_out, or an embedding's LoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(max(0, stop - start), self.dtype.bits)
        if stop <= start:
            return out
        k = self.shape[1]
        r0, r1 = start // k, (stop - 1) // k + 1
        delta = self.delta_rows(r0, r1).reshape(-1)[start - r0 * k: stop - r0 * k]
        base = read_bits(self.base, start, stop)
        if self.dtype.name == "F64":  # the base is not rounded: the float32 delta is added in float64
            out.view(np.float64)[...] = base.view(np.float64) + delta
            return out
        delta += to_float32(base, self.dtype)
        return from_float32(delta, self.dtype, out)

    def delta_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of B @ A * scale (or its transpose), float32, the rank summed in order."""
        rank, k = self.rank, self.shape[1]
        if self.transposed:  # rows of (B A)^T = columns of A (one range per rank row) times B^T
            left = np.empty((r1 - r0, rank), np.float32)
            for j in range(rank):
                left[:, j] = _f32(self.a, j * self.a.shape[1] + r0, j * self.a.shape[1] + r1)
            right = _f32(self.b, 0, self.b.numel).reshape(k, rank).T
        else:
            left = _f32(self.b, r0 * rank, r1 * rank).reshape(r1 - r0, rank)
            right = _f32(self.a, 0, self.a.numel).reshape(rank, k)
        return lora_rows(left, right, self.scale)


def _f32(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    return to_float32(read_bits(info, start, stop), info.dtype)


def open_adapter(path: str, base: Checkpoint) -> Checkpoint:
    """The adapter over ``base`` as a checkpoint of the fine-tune it stands for (headers only:
    its config and both files' headers are read and checked, no tensor data)."""
    path = os.path.abspath(path)
    config = read_config(path)
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.lexists(weights):
        found = "adapter_model.bin (pickled: convert it to safetensors)" \
            if os.path.lexists(os.path.join(path, "adapter_model.bin")) else "none"
        raise CheckpointError(f"{tensor_context(weights)}: the adapter's weights are missing (found: {found})")
    stored = open_checkpoint(weights)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    embedding: set[str] = set()
    saved: dict[str, TensorInfo] = {}
    for key, info in stored.tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(name)
        if m is None:
            if ".lora_" in name:
                raise CheckpointError(f"{tensor_context(weights, key)}: a LoRA tensor deltastream cannot read "
                                      "(only lora_A/lora_B and lora_embedding_A/B)")
            # modules_to_save copies, and the base weights PEFT saves with a LoRA of an embedding
            # (save_embedding_layers): full tensors that PEFT loads in place of the base's
            saved[name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")] = info
            continue
        module = m.group("module") or m.group("emodule")
        kind = (m.group("kind") or m.group("ekind"))[-1]
        if m.group("emodule"):
            embedding.add(module)
        pairs.setdefault(module, {})[kind] = info
    tensors = dict(base.tensors)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for name, info in saved.items():
        b = base.tensors.get(name)
        if b is None:
            raise MismatchError(f"{tensor_context(weights, name)}: a modules_to_save tensor the base lacks "
                                f"(base '{escape(base.path)}')")
        if b.shape != info.shape or b.dtype != info.dtype:
            raise WrongBaseError(f"{tensor_context(weights, name)}: {info.dtype.name} {info.shape}, but the base "
                                 f"has {b.dtype.name} {b.shape}: an adapter of another base")
        tensors[name] = TensorInfo(name, info.path, info.dtype, info.shape, info.offset, info.nbytes)
    for module, ab in pairs.items():
        transposed = module in embedding or fan_in_fan_out
        tensors[f"{module}.weight"] = _lora_tensor(weights, config, module, ab, tensors, base.path, transposed)
    return Checkpoint(path=path, tensors=tensors, metadata=dict(base.metadata), side_files=dict(base.side_files),
                      index=None, shards=(os.path.join(path, ADAPTER_CONFIG), weights, *base.files))


def _lora_tensor(weights: str, config: dict, module: str, ab: dict[str, TensorInfo], base: dict[str, TensorInfo],
                 base_path: str, transposed: bool) -> LoraTensor:
    name = f"{module}.weight"
    missing = {"A", "B"} - set(ab)
    if missing:
        raise CheckpointError(f"{tensor_context(weights, module)}: lora_{missing.pop()} is missing")
    a, b = ab["A"], ab["B"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise CheckpointError(f"{tensor_context(weights, a.name)}: a LoRA of a {len(a.shape)}-D weight "
                              "(a convolution's) is not supported: only linear and embedding layers")
    w = base.get(name)
    if w is None:
        raise MismatchError(f"{tensor_context(weights, a.name)}: the base has no tensor '{escape(name)}' "
                            f"(base '{escape(base_path)}')")
    rank = a.shape[0]
    d, k = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
    if b.shape[1] != rank or len(w.shape) != 2 or w.shape != (d, k):
        raise WrongBaseError(f"{tensor_context(weights, module)}: lora_A {a.shape} and lora_B {b.shape} make a "
                             f"{d} x {k} delta, but the base's '{escape(name)}' is {w.shape}: an adapter of "
                             "another base")
    if not (w.dtype.computable and a.dtype.computable and b.dtype.computable):
        raise CheckpointError(f"{tensor_context(weights, module)}: cannot add a LoRA to dtype {w.dtype.name} "
                              f"(lora {a.dtype.name}): only float tensors")
    r_conf = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if int(r_conf) != rank:
        raise CheckpointError(f"{tensor_context(weights, module)}: rank {rank} in the weights, but the config "
                              f"gives r = {r_conf}")
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraTensor(name, weights, w.dtype, w.shape, -1, w.nbytes, w, a, b, scale, transposed)
