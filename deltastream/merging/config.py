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

``slices`` (frankenmerges, ``merging.slices``) replaces ``models``; ``tokenizer: {source, tokens,
pad_to_multiple_of}``, the legacy ``tokenizer_source`` and ``chat_template`` are parsed into
:class:`TokenizerSpec` (``merging.tokenizer``); all as mergekit 0.1.5's ``config.py`` defines them.

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

__all__ = ["MergeConfig", "ModelEntry", "SliceDef", "TokenizerSpec", "TokenSource", "load_merge_config", "resolve",
           "resolve_at", "DTYPES"]

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "slices", "modules", "tokenizer", "chat_template"}
UNSUPPORTED = {"modules": "modules"}
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
class SliceDef:
    """One output slice (mergekit's ``OutputSliceDefinition``): its sources, each a ModelEntry
    with its ``layer_range`` [start, stop), an optional base_model and parameters."""

    index: int
    sources: tuple[ModelEntry, ...]
    ranges: tuple[tuple[int, int], ...]
    base: str | None  # resolved path (the slice's own base_model), None: the config's
    parameters: dict[str, Any]

    @property
    def length(self) -> int:
        return self.ranges[0][1] - self.ranges[0][0]


@dataclass(frozen=True)
class TokenSource:
    """Where one token's embedding comes from (mergekit's ``TokenEmbeddingConfig``): ``kind`` is
    "model" (that model's row of the token), "model_token" (that model's row of another token or
    id), "zero" or None (mergekit's defaults); ``force`` uses it even where a model has the token."""

    kind: str | None
    model: str | None = None  # resolved path
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "base", "union" or a model's resolved path
    source_ref: str
    tokens: dict[str, TokenSource]
    pad_to_multiple_of: int | None
    key: str  # "tokenizer" or the legacy "tokenizer_source"


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
    slices: tuple[SliceDef, ...] = ()
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

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
    slices: tuple[SliceDef, ...] = ()
    if doc.get("slices") is not None:
        if doc.get("models") is not None:
            raise ParameterError(f"{where('slices')}: give 'models' or 'slices', not both")
        slices = _slices(doc["slices"], method, where, lines, config_dir)
        models = _slice_models(slices)
    else:
        models = _model_entries(doc.get("models"), method, where, lines, config_dir)
    base = doc.get("base_model")
    base = _path(base, "base_model", where("base_model")) if base is not None else None
    dtypes = {key: _dtype(doc.get(key), key, where) for key in ("dtype", "out_dtype")}
    params = _parameters(doc.get("parameters"), method, lambda *k: where("parameters", *k), top=True)
    base_path = _resolve_path(base, config_dir) if base is not None else None
    known = {m.model: m.path for m in models} | ({base: base_path} if base is not None and base_path else {})
    tokenizer = _tokenizer(doc, where, config_dir, known)
    return MergeConfig(path=os.path.abspath(path), text=text, method=method, base=base_path, base_ref=base,
                       models=tuple(models), parameters=params, dtype=dtypes["dtype"],
                       out_dtype=dtypes["out_dtype"], lines=lines, slices=slices, tokenizer=tokenizer,
                       chat_template=_chat_template(doc.get("chat_template"), where))


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


def _slices(doc: Any, method: str, where, lines: dict, config_dir: str) -> tuple[SliceDef, ...]:
    """mergekit's ``slices``: each ``{sources: [{model, layer_range: [start, stop], parameters}],
    base_model, parameters}``; every source of a slice spans the same number of layers (the
    ranges' ends are checked against each model's layers when the plan opens it)."""
    if not isinstance(doc, list) or not doc:
        raise ParameterError(f"{where('slices')}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict) or "sources" not in entry:
            raise ParameterError(f"{where('slices', i)}: a slice needs 'sources: [{{model, layer_range}}, ...]'")
        extra = sorted((k for k in entry if k not in ("sources", "base_model", "parameters")), key=str)
        if extra:
            raise ParameterError(f"{where('slices', i, extra[0])}: unknown key {show(extra[0])} in a slice "
                                 "(valid: sources, base_model, parameters)")
        if entry.get("residual_weight") is not None:
            raise ParameterError(f"{where('slices', i, 'residual_weight')}: residual_weight is not supported")
        sources_doc = entry["sources"]
        if not isinstance(sources_doc, list) or not sources_doc:
            raise ParameterError(f"{where('slices', i, 'sources')}: 'sources' must be a non-empty list of "
                                 "{model, layer_range}")
        sources, ranges = [], []
        for j, src in enumerate(sources_doc):
            at = ("slices", i, "sources", j)
            if not isinstance(src, dict) or "model" not in src:
                raise ParameterError(f"{where(*at)}: a slice source needs 'model: PATH' and "
                                     "'layer_range: [start, stop]'")
            extra = sorted((k for k in src if k not in ("model", "layer_range", "parameters")), key=str)
            if extra:
                raise ParameterError(f"{where(*at, extra[0])}: unknown key {show(extra[0])} in a slice source "
                                     "(valid: model, layer_range, parameters)")
            ref = _path(src["model"], "model", where(*at, "model"))
            span = src.get("layer_range")
            if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)
                    and 0 <= span[0] < span[1]):
                raise ParameterError(f"{where(*at, 'layer_range') if 'layer_range' in src else where(*at)}: "
                                     f"layer_range must be [start, stop] with 0 <= start < stop, not {show(span)}")
            params = _parameters(src.get("parameters"), method, lambda *k, at=at: where(*at, "parameters", *k))
            sources.append(ModelEntry(ref, _resolve_path(ref, config_dir), params, lines.get(at, 0)))
            ranges.append((span[0], span[1]))
        lengths = [b - a for a, b in ranges]
        if len(set(lengths)) > 1:
            j = next(j for j, n in enumerate(lengths) if n != lengths[0])
            raise ParameterError(f"{where('slices', i, 'sources', j, 'layer_range')}: every source of a slice spans "
                                 f"the same number of layers: {list(ranges[j])} has {lengths[j]}, "
                                 f"{list(ranges[0])} has {lengths[0]}")
        seen: dict[str, int] = {}
        for j, s in enumerate(sources):
            if s.path in seen:
                raise ParameterError(f"{where('slices', i, 'sources', j, 'model')}: model {show(s.model)} is "
                                     f"already source {seen[s.path]} of this slice (a slice takes each model once)")
            seen[s.path] = j
        base = entry.get("base_model")
        base = _resolve_path(_path(base, "base_model", where("slices", i, "base_model")), config_dir) \
            if base is not None else None
        params = _parameters(entry.get("parameters"), method, lambda *k, i=i: where("slices", i, "parameters", *k))
        out.append(SliceDef(i, tuple(sources), tuple(ranges), base, params))
    return tuple(out)


def _slice_models(slices: tuple[SliceDef, ...]) -> list[ModelEntry]:
    """Every model the slices name, once each, in order of appearance (parameters are the sources')."""
    seen: dict[str, ModelEntry] = {}
    for s in slices:
        for src in s.sources:
            seen.setdefault(src.path, ModelEntry(src.model, src.path, {}, src.line))
    return list(seen.values())


def _tokenizer(doc: dict, where, config_dir: str, known: dict[str, str]) -> TokenizerSpec | None:
    """``tokenizer: {source, tokens, pad_to_multiple_of}`` or the legacy ``tokenizer_source``."""
    legacy, spec = doc.get("tokenizer_source"), doc.get("tokenizer")
    if legacy is not None and spec is not None:
        raise ParameterError(f"{where('tokenizer')}: give 'tokenizer' or the legacy 'tokenizer_source', not both")
    if legacy == "base":  # deltastream's behaviour before tokenizer merging: the base's files, rows cropped
        return None
    if legacy is not None:
        source, ref = _tokenizer_source(legacy, ("tokenizer_source",), where, config_dir, known)
        return TokenizerSpec(source, ref, {}, None, "tokenizer_source")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ParameterError(f"{where('tokenizer')}: 'tokenizer' must be a mapping "
                             "(source, tokens, pad_to_multiple_of)")
    extra = sorted((k for k in spec if k not in ("source", "tokens", "pad_to_multiple_of")), key=str)
    if extra:
        raise ParameterError(f"{where('tokenizer', extra[0])}: unknown key {show(extra[0])} in 'tokenizer' "
                             "(valid: source, tokens, pad_to_multiple_of)")
    source, ref = _tokenizer_source(spec.get("source", "union"), ("tokenizer", "source"), where, config_dir, known)
    pad = spec.get("pad_to_multiple_of")
    if pad is not None and (type(pad) is not int or pad < 1):
        raise ParameterError(f"{where('tokenizer', 'pad_to_multiple_of')}: pad_to_multiple_of must be an integer "
                             f">= 1, not {show(pad)}")
    tokens_doc = spec.get("tokens") or {}
    if not isinstance(tokens_doc, dict):
        raise ParameterError(f"{where('tokenizer', 'tokens')}: 'tokens' must be a mapping of "
                             "token -> {source, force}")
    tokens = {}
    for tok, cfg in tokens_doc.items():
        at = ("tokenizer", "tokens", tok)
        if not isinstance(tok, str) or not tok:
            raise ParameterError(f"{where(*at)}: a token must be a non-empty string, not {show(tok)}")
        tokens[tok] = _token_source(cfg, at, where, known)
    return TokenizerSpec(source, ref, tokens, pad, "tokenizer")


def _model_ref(value: Any, at: tuple, where, known: dict[str, str], what: str) -> str:
    if not isinstance(value, str) or value not in known:
        raise ParameterError(f"{where(*at)}: {what} {show(value)} is not a model of this config "
                             f"(models: {', '.join(sorted(known)) or 'none'})")
    return known[value]


def _tokenizer_source(value: Any, at: tuple, where, config_dir: str, known: dict[str, str]) -> tuple[str, str]:
    if value in ("base", "union"):
        return value, value
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{where(*at)}: the tokenizer source must be base, union or a model, not {show(value)}")
    path = known.get(value) or _resolve_path(value, config_dir)
    if not os.path.exists(path):
        raise ParameterError(f"{where(*at)}: tokenizer source model {show(value)} not found ({path}); "
                             "valid: base, union or a model folder")
    return path, value


def _token_source(cfg: Any, at: tuple, where, known: dict[str, str]) -> TokenSource:
    if cfg is None:
        return TokenSource(None)
    if not isinstance(cfg, dict):
        raise ParameterError(f"{where(*at)}: a token's setting is a mapping {{source, force}}, not {show(cfg)}")
    extra = sorted((k for k in cfg if k not in ("source", "force")), key=str)
    if extra:
        raise ParameterError(f"{where(*at, extra[0])}: unknown key {show(extra[0])} (valid: source, force)")
    force = cfg.get("force", False)
    if not isinstance(force, bool):
        raise ParameterError(f"{where(*at, 'force')}: force must be true or false, not {show(force)}")
    src = cfg.get("source")
    if src is None:
        return TokenSource(None, force=force)
    if isinstance(src, str):
        return TokenSource("model", _model_ref(src, at + ("source",), where, known, "source model"), force=force)
    if not isinstance(src, dict) or src.get("kind") not in ("zero", "model_token"):
        raise ParameterError(f"{where(*at, 'source')}: a token source is a model, {{kind: zero}} or "
                             f"{{kind: model_token, model, token | token_id}}, not {show(src)}")
    if src["kind"] == "zero":
        return TokenSource("zero", force=force)
    model = _model_ref(src.get("model"), at + ("source", "model"), where, known, "source model")
    token_id, token = src.get("token_id"), src.get("token")
    if (token_id is None) == (token is None):
        raise ParameterError(f"{where(*at, 'source')}: a model_token source takes one of token or token_id")
    if token_id is not None and (type(token_id) is not int or token_id < 0):
        raise ParameterError(f"{where(*at, 'source', 'token_id')}: token_id must be an integer >= 0, "
                             f"not {show(token_id)}")
    if token is not None and not isinstance(token, str):
        raise ParameterError(f"{where(*at, 'source', 'token')}: token must be a string, not {show(token)}")
    return TokenSource("model_token", model, token_id, token, force)


def _chat_template(value: Any, where) -> str | None:
    """mergekit's ``chat_template``: "auto" (the models' most common), a built-in name, or a Jinja
    template (at least 20 characters with a '{')."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{where('chat_template')}: chat_template must be a string, not {show(value)}")
    if value == "auto" or builtin_template(value) is not None:
        return value
    if len(value) < 20 or "{" not in value:
        raise ParameterError(f"{where('chat_template')}: invalid chat_template {show(value)}: auto, a built-in name "
                             f"({', '.join(BUILTIN_TEMPLATES)}) or a Jinja template")
    return value


#: mergekit's built-in template names (its package data; used when mergekit is installed)
BUILTIN_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def builtin_template(name: str) -> str | None:
    """The text of a mergekit built-in chat template, None if not one (or mergekit is absent)."""
    if name not in BUILTIN_TEMPLATES:
        return None
    try:
        import importlib.resources

        return importlib.resources.files("mergekit._data.chat_templates").joinpath(name + ".jinja").read_text()
    except (ImportError, OSError):
        return None


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
    return resolve_at(setting, tensor, layer_position(tensor, layers))


def resolve_at(setting: Any, tensor: str, t: float) -> Any:
    """``resolve`` at a given gradient position ``t`` (a slice's: its layer / (its layers - 1))."""
    if not isinstance(setting, list):
        return setting
    if setting and all(isinstance(v, dict) for v in setting):
        for entry in setting:
            f = entry.get("filter")
            if f is None or f == "*" or str(f) in tensor:
                return resolve_at(entry.get("value"), tensor, t)
        return None
    if setting and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        s = t * (len(setting) - 1)
        i0 = int(s)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = s - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting[int(t * (len(setting) - 1))] if setting else None
