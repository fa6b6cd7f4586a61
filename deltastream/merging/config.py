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
absent, wins). A per-model value wins over the global ``parameters``.

The file is read by the bounded loader of ``deltastream.yamlconfig`` (size, depth, aliases), and
every value is typed here, at load: paths are strings, each known parameter has its form and range
(a density in [0, 1], above 0 for DARE; a flag true or false; every number finite). Errors name the
file and line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError, show, tensor_context
from ..params import is_finite_number, range_problem
from ..yamlconfig import load_yaml
from .methods import MERGE_METHODS

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
        return tensor_context(self.path) + (f" line {line}" if line else "")


def _resolve_path(ref: str, config_dir: str) -> str:
    for candidate in (ref, os.path.join(config_dir, ref)):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    return os.path.abspath(os.path.join(config_dir, ref))


def load_merge_config(path: str) -> MergeConfig:
    text, doc, lines = load_yaml(path, "the merge config")

    def where(*keys) -> str:
        line = lines.get(tuple(keys))
        return tensor_context(path) + (f" line {line}" if line else "")

    method = _check_top(doc, where)
    config_dir = os.path.dirname(os.path.abspath(path))
    models = _model_entries(doc.get("models"), method, where, lines, config_dir)
    base = doc.get("base_model")
    base = _path(base, "base_model", where("base_model")) if base is not None else None
    dtypes = {key: _dtype(doc.get(key), key, where) for key in ("dtype", "out_dtype")}
    params = _parameters(doc.get("parameters"), method, lambda *k: where("parameters", *k), top=True)
    return MergeConfig(path=os.path.abspath(path), text=text, method=method,
                       base=_resolve_path(base, config_dir) if base is not None else None, base_ref=base,
                       models=tuple(models), parameters=params, dtype=dtypes["dtype"],
                       out_dtype=dtypes["out_dtype"], lines=lines)


def _check_top(doc: Any, where) -> str:
    """The document's shape and top-level keys; returns the merge method's name."""
    if not isinstance(doc, dict):
        raise ParameterError(f"{where()}: a merge config is a mapping (merge_method, base_model, models, ...)")
    for key in doc:
        if key not in TOP_KEYS:
            raise ParameterError(f"{where(key)}: unknown key {show(key)} "
                                 f"(valid: {', '.join(sorted(TOP_KEYS - set(UNSUPPORTED)))})")
        if key in UNSUPPORTED and doc[key] is not None:
            raise ParameterError(f"{where(key)}: {show(key)} ({UNSUPPORTED[key]}) is not supported by deltastream "
                                 "merge; use 'models:' with per-tensor filters")
    source = doc.get("tokenizer_source", "base")
    if source not in (None, "base"):
        raise ParameterError(f"{where('tokenizer_source')}: tokenizer_source {show(source)} is not supported: "
                             "only 'base' (the base model's tokenizer, embeddings cropped to it)")
    method = doc.get("merge_method")
    if method is None:
        raise ParameterError(f"{where()}: missing 'merge_method'")
    if not isinstance(method, str):
        raise ParameterError(f"{where('merge_method')}: merge_method must be a name, not {show(method)}")
    return method


def _model_entries(models_doc: Any, method: str, where, lines: dict, config_dir: str) -> list[ModelEntry]:
    if not isinstance(models_doc, list) or not models_doc:
        raise ParameterError(f"{where('models')}: 'models' must be a non-empty list of {{model, parameters}}")
    models = []
    for i, entry in enumerate(models_doc):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ParameterError(f"{where('models', i)}: a model entry needs 'model: PATH'")
        extra = sorted((k for k in entry if k not in ("model", "parameters")), key=str)
        if extra:
            raise ParameterError(f"{where('models', i, extra[0])}: unknown key {show(extra[0])} in a model entry "
                                 "(valid: model, parameters)")
        ref = _path(entry["model"], "model", where("models", i, "model"))
        params = _parameters(entry.get("parameters"), method, lambda *k, i=i: where("models", i, "parameters", *k))
        models.append(ModelEntry(ref, _resolve_path(ref, config_dir), params, lines.get(("models", i), 0)))
    return models


def _dtype(value: Any, key: str, where) -> str | None:
    if value is not None and str(value) not in DTYPES:
        raise ParameterError(f"{where(key)}: {key} {show(value)} is not one of {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[str(value)] if value is not None else None


def _path(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{where}: {key} must be a path, not {show(value)}")
    return value


# --- parameters, typed at load: (low, high, low_open) ranges of the per-tensor numbers ---------

_RANGES = {"weight": (None, None, False), "density": (0, 1, False), "epsilon": (0, 1, False),
           "gamma": (0, 1, False)}
_FLAGS = ("normalize", "rescale", "int8_mask", "global_trim")
_CHOICES = {"consensus": ("mergekit", "official")}


def _parameters(value: Any, method: str, where, top: bool = False) -> dict[str, Any]:
    """A ``parameters`` mapping, each value checked by its key's type (unknown keys are left
    to the method's own check, which lists the valid ones)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ParameterError(f"{where()}: 'parameters' must be a mapping")
    for key, setting in value.items():
        if key in _RANGES:
            _setting(key, setting, _range(key, method), where, (key,))
        elif top and key in _FLAGS and not isinstance(setting, bool):
            raise ParameterError(f"{where(key)}: {key} must be true or false, not {show(setting)}")
        elif top and key == "lambda" and not (_number(setting) and is_finite_number(setting)):
            raise ParameterError(f"{where(key)}: lambda must be a finite number, not {show(setting)}")
        elif top and key in _CHOICES and setting not in _CHOICES[key]:
            raise ParameterError(f"{where(key)}: {key} must be one of {', '.join(_CHOICES[key])}, not {show(setting)}")
    return dict(value)


def _range(key: str, method: str) -> tuple:
    """The key's range for this method: DARE keeps each entry with probability density, so a
    density of 0 (keep nothing, p = 1) is no DARE."""
    low, high, low_open = _RANGES[key]
    spec = MERGE_METHODS.get(method)
    return (low, high, True) if key == "density" and spec is not None and spec.sparsify == "random" else \
        (low, high, low_open)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _setting(key: str, setting: Any, bounds: tuple, where, at: tuple, nested: bool = False) -> None:
    """A number; a non-empty list of numbers (a gradient); or (not nested) a list of
    ``{filter, value}`` whose values are either."""
    if _number(setting):
        low, high, low_open = bounds
        if not is_finite_number(setting):
            raise ParameterError(f"{where(*at)}: {key} must be a finite number, not {show(setting)}")
        problem = range_problem(key, setting, low, high, low_open)
        if problem:
            raise ParameterError(f"{where(*at)}: {problem}")
    elif isinstance(setting, list) and setting and all(_number(x) for x in setting):
        for i, x in enumerate(setting):
            _setting(key, x, bounds, where, at + (i,), nested)
    elif not nested and isinstance(setting, list) and setting and all(isinstance(x, dict) for x in setting):
        for i, entry in enumerate(setting):
            extra = sorted((k for k in entry if k not in ("filter", "value")), key=str)
            if extra:
                raise ParameterError(f"{where(*at, i, extra[0])}: unknown key {show(extra[0])} in a filter entry "
                                     "(valid: filter, value)")
            if "value" not in entry:
                raise ParameterError(f"{where(*at, i)}: a filter entry needs 'value'")
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                raise ParameterError(f"{where(*at, i, 'filter')}: filter must be a string, not {show(entry['filter'])}")
            _setting(key, entry["value"], bounds, where, at + (i, "value"), nested=True)
    else:
        forms = "a number or a list of numbers (a gradient)" if nested else \
            "a number, a list of numbers (a gradient) or a list of {filter, value}"
        raise ParameterError(f"{where(*at)}: {key} must be {forms}, not {show(setting)}")


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
