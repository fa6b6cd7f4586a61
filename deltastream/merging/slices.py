"""mergekit's ``slices``: frankenmerges, the output's layers taken (and merged) from layer ranges
of the inputs, renamed to the output's numbering; found from headers alone.

As mergekit's planner (plan.py, ``plan_module``/``plan_slice``/``plan_layer``) does:

- the tensors before the layers (token embeddings) come from the first slice's sources, those
  after them (final norm, head, and any other tensor outside the layers) from the last slice's;
  both at gradient position t = 0;
- output layer ``k`` (counted over the slices in order) of slice ``s`` at offset ``o`` is made
  from layer ``layer_range[0] + o`` of each of ``s``'s sources, ``model.layers.<that>.X`` read
  as ``model.layers.<k>.X``; its gradient position is ``o / (len - 1)`` within the slice (1 for
  a one-layer slice);
- parameters are looked up in the source's ``parameters``, then the slice's, then the global
  ones (the first that gives a value wins, filters resolved on the output tensor's name).

A layer is a ``.layers.<n>.`` in a tensor name (Llama, Mistral, Qwen, Gemma, Phi-3 naming).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import MismatchError, ParameterError, tensor_context
from ..sources import Model, Source
from .config import MergeConfig, ModelEntry, SliceDef

__all__ = ["SliceTensor", "slice_tensors", "layer_count", "split_layer", "is_pre_weight"]

_LAYER_NAME = re.compile(r"^(.*?(?:^|\.)layers\.)(\d+)(\..*)$")
_PRE = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in")


def split_layer(name: str) -> tuple[str, int, str] | None:
    """("model.layers.", 3, ".mlp.up_proj.weight") for a layer's tensor, None outside the layers."""
    match = _LAYER_NAME.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def is_pre_weight(name: str) -> bool:
    """A tensor before the layers (the input embeddings); every other non-layer tensor is after."""
    return any(p in name for p in _PRE)


def layer_count(model: Model) -> int:
    """The number of layers: one past the largest layer index in the tensor names."""
    found = [p[1] for p in map(split_layer, model.tensors) if p is not None]
    return max(found) + 1 if found else 0


@dataclass(frozen=True)
class SliceTensor:
    """One output tensor of a sliced merge: each source's tensor (in the slice's order), the
    gradient position and the shared parameter scopes (highest first) below the sources' own."""

    name: str
    slice: SliceDef
    inputs: tuple[tuple[ModelEntry, Source], ...]
    t: float
    scopes: tuple[dict[str, Any], ...]

    @property
    def base(self) -> str | None:
        return self.slice.base

    def where(self, cfg: MergeConfig) -> str:
        return cfg.where("slices", self.slice.index)


def _layers(model: Model) -> dict[int, dict[str, tuple[str, Source]]]:
    """layer -> {prefix + '{}' + suffix: (name, source)} of a model's layer tensors."""
    out: dict[int, dict[str, tuple[str, Source]]] = {}
    for name, source in model.tensors.items():
        parts = split_layer(name)
        if parts is not None:
            out.setdefault(parts[1], {})[parts[0] + "\x00" + parts[2]] = (name, source)
    return out


def _layer(s: SliceDef, offset: int, k: int, layers: dict, models: dict[str, Model],
           glob: dict[str, Any]) -> list[SliceTensor]:
    """Output layer ``k``: layer ``start + offset`` of each of the slice's sources, renamed."""
    t = offset / (s.length - 1) if s.length > 1 else 1.0
    lead = layers[s.sources[0].path].get(s.ranges[0][0] + offset, {})
    for src, (start, _) in zip(s.sources, s.ranges):
        extra = set(layers[src.path].get(start + offset, {})) - set(lead)
        if extra:
            name = min(extra).replace("\x00", str(start + offset))
            raise MismatchError(f"{tensor_context(models[src.path].path, name)}: not in the other sources' "
                                f"layer (slice {s.index}, model '{src.model}')")
    out = []
    for key in lead:
        prefix, suffix = key.split("\x00")
        inputs = []
        for src, (start, _) in zip(s.sources, s.ranges):
            found = layers[src.path].get(start + offset, {}).get(key)
            if found is None:
                missing = f"{prefix}{start + offset}{suffix}"
                raise MismatchError(f"{tensor_context(models[src.path].path, missing)}: missing from model "
                                    f"'{src.model}' (slice {s.index}: layer {start + offset} of each source "
                                    "makes one output layer)")
            inputs.append((src, found[1]))
        out.append(SliceTensor(f"{prefix}{k}{suffix}", s, tuple(inputs), t, (s.parameters, glob)))
    return out


def slice_tensors(cfg: MergeConfig, models: dict[str, Model]) -> tuple[list[SliceTensor], int]:
    """Every output tensor of ``cfg.slices`` (models: path -> opened model) and the output's
    number of layers; a range past a model's layers or a layer that differs between the sources
    is one error naming the config key or the model's tensor."""
    layers = {path: _layers(m) for path, m in models.items()}
    for s in cfg.slices:
        for j, (src, (_, stop)) in enumerate(zip(s.sources, s.ranges)):
            have = layer_count(models[src.path])
            if stop > have:
                raise ParameterError(f"{cfg.where('slices', s.index, 'sources', j, 'layer_range')}: layer_range "
                                     f"{list(s.ranges[j])} goes past model '{src.model}''s {have} layers")
    glob = cfg.parameters
    first, last = cfg.slices[0], cfg.slices[-1]
    out: list[SliceTensor] = []

    def outside(s: SliceDef, pre: bool) -> None:
        lead = models[s.sources[0].path]
        for name in lead.tensors:
            if split_layer(name) is None and is_pre_weight(name) == pre:
                inputs = []
                for src in s.sources:
                    source = models[src.path].tensors.get(name)
                    if source is None:
                        raise MismatchError(f"{tensor_context(models[src.path].path, name)}: missing from model "
                                            f"'{src.model}' (slice {s.index} takes it from every source)")
                    inputs.append((src, source))
                out.append(SliceTensor(name, s, tuple(inputs), 0.0, (s.parameters, glob)))

    outside(first, True)
    k = 0
    for s in cfg.slices:
        for offset in range(s.length):
            out += _layer(s, offset, k, layers, models, glob)
            k += 1
    outside(last, False)
    return out, k
