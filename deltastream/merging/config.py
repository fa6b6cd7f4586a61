"""Merge configs in mergekit's YAML shape, parsed and checked before any heavy I/O.

    merge_method: dare_ties
    base_model: path/to/base
    models:
      - model: path/to/ft1
        parameters: {weight: 0.5, density: [{filter: mlp, value: 0.3}, {value: 0.6}]}
      - model: path/to/ft2.dsz          # a deltastream artifact works too
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true, lambda: 1.0}
    dtype: bfloat16
    out_dtype: bfloat16
    tokenizer_source: base

Values follow mergekit's rules: a number; a list of numbers (a gradient over the layers, linearly
interpolated at layer/(layers-1); embeddings and the head take the first value); or a list of
``{filter, value}`` (the first whose filter is a substring of the tensor name, or ``*``, or
absent, wins). A per-model value wins over the global ``parameters``. Errors name the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError

__all__ = ["MergeConfig", "ModelEntry", "load_merge_config", "resolve", "DTYPES"]

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "slices", "modules", "tokenizer", "chat_template"}
UNSUPPORTED = {"slices": "layer slices", "modules": "modules", "tokenizer": "tokenizer merging",
               "chat_template": "chat template selection"}
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "bf16": "BF16", "fp16": "F16", "fp32": "F32",
          "torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelEntry:
    model: str  # as written in the config: also the name of its random streams
    path: str  # resolved
    parameters: dict[str, Any]
    line: int


@dataclass(frozen=True)
class MergeConfig:
    path: str
    text: str
    method: str
    base: str | None
    base_ref: str | None  # as written in the config
    models: tuple[ModelEntry, ...]
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    lines: dict[tuple, int] = field(default_factory=dict)

    def where(self, *path) -> str:
        line = self.lines.get(tuple(path))
        return f"file '{self.path}'" + (f" line {line}" if line else "")


def _lines(node, path=()) -> dict[tuple, int]:
    """Each key path of the YAML document -> its 1-based line."""
    import yaml

    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out.update(_lines(value, path + (key.value,)))
            out[path + (key.value,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_lines(item, path + (i,)))
    return out


def _resolve_path(ref: str, config_dir: str) -> str:
    for candidate in (ref, os.path.join(config_dir, ref)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(os.path.join(config_dir, ref))


def load_merge_config(path: str) -> MergeConfig:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        doc = yaml.safe_load(text)
        lines = _lines(yaml.compose(text)) if doc else {}
    except OSError as exc:
        raise ParameterError(f"file '{path}': cannot read the merge config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ParameterError(f"file '{path}'{f' line {mark.line + 1}' if mark else ''}: invalid YAML "
                             f"({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(doc, dict):
        raise ParameterError(f"file '{path}': a merge config is a mapping (merge_method, base_model, models, ...)")

    def where(*keys) -> str:
        line = lines.get(tuple(keys))
        return f"file '{path}'" + (f" line {line}" if line else "")

    for key in doc:
        if key not in TOP_KEYS:
            raise ParameterError(f"{where(key)}: unknown key '{key}' (valid: {', '.join(sorted(TOP_KEYS - set(UNSUPPORTED)))})")
        if key in UNSUPPORTED and doc[key] is not None:
            raise ParameterError(f"{where(key)}: '{key}' ({UNSUPPORTED[key]}) is not supported by deltastream merge; "
                                 "use 'models:' with per-tensor filters")
    source = doc.get("tokenizer_source", "base")
    if source not in (None, "base"):
        raise ParameterError(f"{where('tokenizer_source')}: tokenizer_source '{source}' is not supported: "
                             "only 'base' (the base model's tokenizer, embeddings cropped to it)")
    method = doc.get("merge_method")
    if not isinstance(method, str):
        raise ParameterError(f"{where()}: missing 'merge_method'")
    models_doc = doc.get("models")
    if not isinstance(models_doc, list) or not models_doc:
        raise ParameterError(f"{where('models')}: 'models' must be a non-empty list of {{model, parameters}}")
    config_dir = os.path.dirname(os.path.abspath(path))
    models = []
    for i, entry in enumerate(models_doc):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ParameterError(f"{where('models', i)}: a model entry needs 'model: PATH'")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ParameterError(f"{where('models', i, extra[0])}: unknown key '{extra[0]}' in a model entry "
                                 "(valid: model, parameters)")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ParameterError(f"{where('models', i, 'parameters')}: 'parameters' must be a mapping")
        ref = str(entry["model"])
        models.append(ModelEntry(ref, _resolve_path(ref, config_dir), dict(params), lines.get(("models", i), 0)))
    base = doc.get("base_model")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = doc.get(key)
        if value is not None and str(value) not in DTYPES:
            raise ParameterError(f"{where(key)}: {key} '{value}' is not one of {', '.join(sorted(set(DTYPES)))}")
        dtypes[key] = DTYPES[str(value)] if value is not None else None
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ParameterError(f"{where('parameters')}: 'parameters' must be a mapping")
    return MergeConfig(path=os.path.abspath(path), text=text, method=method,
                       base=_resolve_path(str(base), config_dir) if base is not None else None,
                       base_ref=str(base) if base is not None else None,
                       models=tuple(models), parameters=dict(params), dtype=dtypes["dtype"],
                       out_dtype=dtypes["out_dtype"], lines=lines)


def layer_position(tensor: str, layers: int) -> float:
    """mergekit's t for gradients: layer / (layers - 1); tensors outside the layers take 0."""
    match = _LAYER.search("." + tensor)
    if not match or layers <= 1:
        return 0.0
    return int(match.group(1)) / (layers - 1)


def resolve(setting: Any, tensor: str, layers: int) -> Any:
    """The value of a setting for one tensor (None: no match, fall through to the next scope)."""
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(v, dict) for v in setting):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or str(f) in tensor:
                return resolve(entry.get("value"), tensor, layers)
        return None
    if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        s = layer_position(tensor, layers) * (len(setting) - 1)
        i0 = int(s)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(layer_position(tensor, layers) * (len(setting) - 1))] if setting else None
