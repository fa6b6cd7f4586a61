"""The merge plan: a mergekit config -> tensor plans, sparsifier jobs and write tasks, from
headers and manifests alone (no chunk is read), so that it is testable without running.

Every problem is found here, before any output exists: the config (method, parameters), every
model opened as chunk sources (a checkpoint by its headers; an artifact by its manifest, over the
base it must have been made from), every tensor matched (a missing tensor or a shape mismatch
names the model file and the tensor; a vocabulary larger than the base's is cropped to it with a
:class:`DeltastreamWarning`, or refused with ``strict``).
"""

from __future__ import annotations

import fnmatch
import math
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

from ..checkpoint import Checkpoint, open_checkpoint
from ..dtypes import COMPUTABLE
from ..engine import RunOptions
from ..errors import DeltastreamWarning, MismatchError, ParameterError, tensor_context
from ..plan import chunk_elements, chunk_ranges
from ..policy import DEFAULT_KEEP_EXACT
from ..sources import Model, Source, checkpoint_model, is_artifact, open_model
from .chunk import MergeInputs, MergeTask, ModelPart
from .config import MergeConfig, ModelEntry, load_merge_config, resolve
from .methods import GLOBAL, MERGE_METHODS, PER_MODEL, STREAMED, MergeSpec, method_names
from .passes import SparsifierJob
from .sparsifiers import sparsifier
from .streamed import StreamedPlan, build_streamed

__all__ = ["Flags", "TensorMerge", "MergePlan", "build_plan", "merge_footprint"]


#: a merge task's peak private memory, in float32 chunk-length arrays: fixed + per model (masks,
#: magnitudes, ranks and the sparsifiers' temporaries included)
_PER_MODEL_ARRAYS, _FIXED_ARRAYS = 8, 6  # measured on ties, 2 models: 880 MiB at 16 MiB chunks


def merge_footprint(models: int) -> int:
    """Bytes a merge task holds per byte of its input chunk: float32 copies (2 bytes per bf16
    input byte) of the base and of each model's delta, and their temporaries."""
    return 2 * (_FIXED_ARRAYS + _PER_MODEL_ARRAYS * models)


@dataclass(frozen=True)
class Flags:
    normalize: bool
    rescale: bool
    lam: float
    official: bool
    global_trim: bool


@dataclass(frozen=True)
class TensorMerge:
    """One output tensor: the reference (base) tensor, each model's, their weights, its dtype."""

    name: str
    base: Source
    parts: tuple[Source, ...]
    weights: tuple[float, ...]
    out_dtype: str
    entries: tuple[ModelEntry, ...] = ()  # a slice's models (a sliced merge); () : the config's models
    t: float | None = None  # the slice's gradient position; None: by the name's layer
    scopes: tuple[dict, ...] = ()  # the slice's shared parameter scopes (highest first)


@dataclass
class MergePlan:
    cfg: MergeConfig
    spec: MergeSpec
    flags: Flags
    reference: Model
    tensors: list[TensorMerge]
    jobs: dict[tuple[str, str], SparsifierJob]  # (model as written, tensor)
    chunk_bytes: int
    seed: int
    inputs: list[str]  # every file read: what the output must never overwrite
    artifacts: list[str]  # the artifact models' manifest_sha256: a resume must read the same ones
    config_updates: dict[str, Any] | None = None  # config.json keys the output sets (a frankenmerge's layers)
    vocab: Any = field(default=None)  # the tokenizer plan (merging.tokenizer.VocabPlan)

    def tasks(self, location) -> tuple[list[MergeTask], list[MergeInputs]]:
        """The write pass: every chunk of every tensor, placed by ``location(name)``, and each
        tensor's inputs, which its tasks refer to by index (a node of the graph each)."""
        inputs = [self._inputs(t) for t in self.tensors]
        tasks = [task for k, t in enumerate(self.tensors) for task in self._tensor_tasks(t, k, inputs[k],
                                                                                          *location(t.name))]
        return tasks, inputs

    def _inputs(self, t: TensorMerge) -> MergeInputs:
        jobs = [self.jobs.get((m.model, t.name)) for m in (t.entries or self.cfg.models)]
        return MergeInputs(t.base, tuple(ModelPart(s, w, j) for s, w, j in zip(t.parts, t.weights, jobs)))

    def _tensor_tasks(self, t: TensorMerge, k: int, inputs: MergeInputs, path: str, offset: int) -> list[MergeTask]:
        first = next((p.job for p in inputs.parts if p.job is not None), None)  # ranks and masks follow its chunking
        chunk = first.chunk_elems if first else chunk_elements(t.base.shape, t.base.dtype.itemsize, self.chunk_bytes)
        spec = self.spec if t.base.dtype.computable else None
        reads = (len(inputs.parts) + 1) * t.base.dtype.itemsize
        return [MergeTask(t.name, k, index, start, stop, reads * (stop - start), spec, self.spec.of_models,
                          self.flags.normalize, self.flags.lam, self.flags.official, self.seed, t.out_dtype, path,
                          offset)
                for index, (start, stop) in enumerate(chunk_ranges(math.prod(t.base.shape), chunk))]


def build_plan(config: str, *, chunk_bytes: int, memory: int, seed: int, strict: bool,
               options: RunOptions) -> MergePlan | StreamedPlan:
    from ..api import effective_chunk_bytes

    cfg = load_merge_config(config)
    streamed = STREAMED.get(cfg.method)
    if streamed is not None:  # a method of its own module (merging.streamed drives them)
        return build_streamed(cfg, streamed, chunk_bytes=chunk_bytes, memory=memory, seed=seed, strict=strict,
                              options=options)
    spec = _spec(cfg)
    flags = _check_params(cfg, spec)
    if cfg.slices:
        return _build_sliced(cfg, spec, flags, chunk_bytes=chunk_bytes, memory=memory, seed=seed, strict=strict,
                             options=options)
    base = _open_base(cfg)
    if not spec.of_models:  # as mergekit: the base listed among the models adds no task vector
        cfg = replace(cfg, models=tuple(m for m in cfg.models if m.path != cfg.base))
    models = [_open_input(m, cfg, base) for m in cfg.models]
    chunk_bytes = effective_chunk_bytes(chunk_bytes, memory, options, per_byte=merge_footprint(len(models)))
    reference = checkpoint_model(base) if base is not None else models[0]
    layers = len({n.split(".layers.")[1].split(".")[0] for n in reference.tensors if ".layers." in n})
    vocab = None
    if cfg.tokenizer is not None or cfg.chat_template is not None:
        from .tokenizer import build_vocab_plan

        vocab = build_vocab_plan(cfg, reference, {**({cfg.base: reference} if cfg.base else {}),
                                                  **{e.path: m for e, m in zip(cfg.models, models)}},
                                 cfg.base or cfg.models[0].path)
    tensors = [_tensor(cfg, name, src, models, strict, layers, vocab) for name, src in reference.tensors.items()]
    inputs = [cfg.path] + (base.files if base else []) + [p for m in models for p in m.files]
    jobs = _sparsifier_jobs(cfg, spec, flags, tensors, layers, chunk_bytes)
    return MergePlan(cfg, spec, flags, reference, tensors, jobs, chunk_bytes, seed, inputs,
                     [m.digest for m in models if m.digest], vocab.config_updates() if vocab else None, vocab)


def _build_sliced(cfg: MergeConfig, spec: MergeSpec, flags: Flags, *, chunk_bytes: int, memory: int, seed: int,
                  strict: bool, options: RunOptions) -> MergePlan:
    """A ``slices`` config (merging.slices) of the task arithmetic family: each output tensor
    from its slice's sources, the slice's base_model (or the config's) among them."""
    from ..api import effective_chunk_bytes
    from .slices import slice_tensors
    from .streamed import _first

    if flags.global_trim:
        raise ParameterError(f"{cfg.where('parameters', 'global_trim')}: global_trim ranks whole models: it does "
                             "not take slices")
    for s in cfg.slices:
        base_path = s.base or cfg.base
        if not spec.of_models and not any(src.path == base_path for src in s.sources):
            raise ParameterError(f"{cfg.where('slices', s.index, 'sources')}: the base_model is not among this "
                                 f"slice's sources: merge_method '{cfg.method}' reads its layers from them")
    base = _open_base(cfg)
    opened = {m.path: _open_input(m, cfg, base) for m in cfg.models}
    reference = checkpoint_model(base) if base is not None else opened[cfg.slices[0].sources[0].path]
    found, layers = slice_tensors(cfg, opened)
    chunk_bytes = effective_chunk_bytes(chunk_bytes, memory, options,
                                        per_byte=merge_footprint(max(len(s.sources) for s in cfg.slices)))
    vocab = None
    if cfg.tokenizer is not None or cfg.chat_template is not None:
        from .tokenizer import build_vocab_plan

        vocab = build_vocab_plan(cfg, reference, {**({cfg.base: reference} if cfg.base else {}), **opened},
                                 cfg.base or cfg.slices[0].sources[0].path)
    out_dtype = cfg.out_dtype or cfg.dtype
    tensors = []
    for st in found:
        base_path = st.slice.base or cfg.base
        base_src = next((src for e, src in st.inputs if e.path == base_path), None)
        pairs = [(e, src) for e, src in st.inputs if spec.of_models or e.path != base_path]
        ref = base_src if base_src is not None else pairs[0][1]
        if vocab is not None and vocab.is_vocab(st.name, ref):
            permuted = vocab.permute(st.name, [e.path for e, _ in st.inputs], [src for _, src in st.inputs],
                                     base_path)
            by_path = {e.path: p for (e, _), p in zip(st.inputs, permuted)}
            pairs = [(e, by_path[e.path]) for e, _ in pairs]
            ref = by_path[base_path] if base_src is not None and base_path is not None else pairs[0][1]
        parts = [_crop(src, ref, e.model, strict) for e, src in pairs]
        weights = []
        for e, _ in pairs:
            weight = _first((e.parameters,) + st.scopes, "weight", st.name, st.t)
            if weight is None:
                raise ParameterError(f"file '{cfg.path}' line {e.line}: missing parameter 'weight' for model "
                                     f"'{e.model}' (tensor '{st.name}')")
            weights.append(float(weight))
        _check_dtypes(ref, parts)
        tensors.append(TensorMerge(st.name, ref, tuple(parts), tuple(weights),
                                   out_dtype if ref.dtype.computable and out_dtype else ref.dtype.name,
                                   tuple(e for e, _ in pairs), st.t, st.scopes))
    files = [cfg.path] + (base.files if base else []) + sorted({p for m in opened.values() for p in m.files})
    jobs = _sparsifier_jobs(cfg, spec, flags, tensors, layers, chunk_bytes)
    updates = {**(vocab.config_updates() if vocab else {}), "num_hidden_layers": layers}
    return MergePlan(cfg, spec, flags, reference, tensors, jobs, chunk_bytes, seed, files,
                     sorted({m.digest for m in opened.values() if m.digest}), updates, vocab)


def _spec(cfg: MergeConfig) -> MergeSpec:
    spec = MERGE_METHODS.get(cfg.method)
    if spec is None:
        raise ParameterError(f"{cfg.where('merge_method')}: unknown merge_method '{cfg.method}' "
                             f"(valid: {', '.join(method_names())})")
    if cfg.base is None and not spec.of_models:
        raise ParameterError(f"{cfg.where()}: merge_method '{cfg.method}' needs a base_model")
    return spec


def _check_params(cfg: MergeConfig, spec: MergeSpec) -> Flags:
    allowed = set(PER_MODEL[spec.sparsify])
    per_model = f"per model: {', '.join(sorted(allowed))}"

    def check(parameters, where: tuple, note: str = "", why: str = "") -> None:
        for key in parameters:
            if key not in allowed:
                raise ParameterError(f"{cfg.where(*where, 'parameters', key)}: unknown parameter '{key}' for "
                                     f"{cfg.method}{note} ({per_model}{why})")

    slice_why = f"; the global {', '.join(GLOBAL)} go in the top-level parameters"
    for s in cfg.slices:
        check(s.parameters, ("slices", s.index), " in a slice", slice_why)
        for j, src in enumerate(s.sources):
            check(src.parameters, ("slices", s.index, "sources", j))
    for i, entry in enumerate(cfg.models):
        check(entry.parameters, ("models", i))
    for key in cfg.parameters:
        if key not in allowed and key not in GLOBAL:
            raise ParameterError(f"{cfg.where('parameters', key)}: unknown parameter '{key}' for {cfg.method} "
                                 f"(global: {', '.join(GLOBAL)}; per model: {', '.join(sorted(allowed))})")
    global_trim = bool(cfg.parameters.get("global_trim", False))
    if global_trim and spec.sparsify != "magnitude":
        raise ParameterError(f"{cfg.where('parameters', 'global_trim')}: global_trim is the whole-model trim of "
                             f"the magnitude methods (ties); merge_method '{cfg.method}' has none")
    if cfg.parameters.get("int8_mask"):
        warnings.warn("int8_mask only tunes mergekit's memory use; ignored", DeltastreamWarning, stacklevel=2)
    return Flags(normalize=bool(cfg.parameters.get("normalize", spec.normalize)),
                 rescale=bool(cfg.parameters.get("rescale", spec.rescale)),
                 lam=float(cfg.parameters.get("lambda", 1.0)),
                 official=cfg.parameters.get("consensus", "mergekit") == "official", global_trim=global_trim)


def _open_base(cfg: MergeConfig) -> Checkpoint | None:
    if cfg.base is not None and not os.path.exists(cfg.base):
        raise ParameterError(f"{cfg.where('base_model')}: base_model not found ({cfg.base})")
    return open_checkpoint(cfg.base) if cfg.base else None


def _open_input(entry, cfg: MergeConfig, base: Checkpoint | None) -> Model:
    """A model as chunk sources, opened by its headers (an artifact: its manifest, checked
    against the base) before any output exists."""
    if not os.path.exists(entry.path):
        raise ParameterError(f"file '{cfg.path}' line {entry.line}: model '{entry.model}' not found ({entry.path})")
    if is_artifact(entry.path) and base is None:
        raise ParameterError(f"{cfg.where('models')}: model '{entry.model}' is an artifact: it needs base_model")
    return open_model(entry.path, base)


def _tensor(cfg: MergeConfig, name: str, base: Source, models: list[Model], strict: bool, layers: int,
            vocab=None) -> TensorMerge:
    """The reference tensor matched in every model (cropped to it), or a clear error."""
    parts, weights = [], []
    found = []
    for entry, model in zip(cfg.models, models):
        source = model.tensors.get(name)
        if source is None:
            raise MismatchError(f"{tensor_context(model.path, name)}: missing from model '{entry.model}'")
        found.append(source)
    if vocab is not None and vocab.is_vocab(name, base):
        with_base = cfg.base is not None
        paths = ([cfg.base] if with_base else []) + [e.path for e in cfg.models]
        permuted = vocab.permute(name, paths, ([base] if with_base else []) + found, cfg.base)
        base, found = (permuted[0], permuted[1:]) if with_base else (permuted[0], permuted)
    for entry, source in zip(cfg.models, found):
        parts.append(_crop(source, base, entry.model, strict))
        weight = _params(cfg, entry, name, layers).get("weight")
        if weight is None:
            raise ParameterError(f"file '{cfg.path}' line {entry.line}: missing parameter 'weight' for "
                                 f"model '{entry.model}' (tensor '{name}')")
        weights.append(float(weight))
    _check_dtypes(base, parts)
    out_dtype = cfg.out_dtype or cfg.dtype
    return TensorMerge(name, base, tuple(parts), tuple(weights),
                       out_dtype if base.dtype.computable and out_dtype else base.dtype.name)


def _crop(source: Source, base: Source, model: str, strict: bool) -> Source:
    if source.shape == base.shape:
        return source
    if (any(fnmatch.fnmatchcase(source.name, p) for p in DEFAULT_KEEP_EXACT) and len(source.shape) == 2
            and source.shape[1:] == base.shape[1:] and source.shape[0] > base.shape[0]
            and source.dtype == base.dtype):
        if strict:
            raise MismatchError(f"{tensor_context(source.path, source.name)}: vocabulary {source.shape[0]} differs "
                                f"from the base's {base.shape[0]} (model '{model}'; without --strict it is cropped)")
        warnings.warn(f"{tensor_context(source.path, source.name)}: cropped to the base's {base.shape[0]} rows "
                      f"(model '{model}' has {source.shape[0]})", DeltastreamWarning, stacklevel=2)
        return source.cropped(base.shape)
    raise MismatchError(f"{tensor_context(source.path, source.name)}: shape {source.shape} differs from the base's "
                        f"{base.shape} (model '{model}')")


def _check_dtypes(base: Source, parts: list[Source]) -> None:
    """A tensor is merged in float32 (every input computable) or, for integers and bool, copied
    from the reference. Any other float (fp8) or complex tensor is refused, as is a model whose
    dtype cannot be widened: mergekit would merge those in its working dtype, and copying the
    base's would silently drop the models' change."""
    floating = base.dtype.is_float or base.dtype.kind == "complex"
    for source in [base] + parts if floating else ():
        if not source.dtype.computable:
            raise ParameterError(f"{tensor_context(source.path, source.name)}: cannot merge dtype "
                                 f"{source.dtype.name} (merges compute in float32, from {COMPUTABLE}); "
                                 "convert the checkpoints first")


def _params(cfg: MergeConfig, entry, name: str, layers: int) -> dict:
    """A model's parameters for one tensor: its own over the global ones, filters resolved."""
    return {k: resolve(v, name, layers) for k, v in {**cfg.parameters, **entry.parameters}.items()}


def _params_at(entry: ModelEntry, t: TensorMerge) -> dict:
    """A slice source's parameters for one tensor: its own, then the slice's, then the global ones."""
    from .streamed import _first

    assert t.t is not None
    keys = set(entry.parameters).union(*t.scopes)
    return {k: _first((entry.parameters,) + t.scopes, k, t.name, t.t) for k in keys}


def _sparsifier_jobs(cfg: MergeConfig, spec: MergeSpec, flags: Flags, tensors: list[TensorMerge], layers: int,
                     chunk_bytes: int) -> dict[tuple[str, str], SparsifierJob]:
    """One stats-pass job per (model, tensor) that a sparsifier edits, keyed (model, tensor); each
    draws its random stream from the model as written and the tensor name."""
    jobs: dict[tuple[str, str], SparsifierJob] = {}
    scope = "global" if flags.global_trim else "tensor"
    densities: dict[str, set[float]] = {}
    for t in tensors:
        if spec.sparsify is None or not t.base.dtype.computable:
            continue
        # DELLA ranks within rows: a chunk holds whole rows (a 1-D tensor is one row)
        row = t.base.shape[-1] if len(t.base.shape) >= 2 else max(1, math.prod(t.base.shape))
        chunk = chunk_elements(t.base.shape, t.base.dtype.itemsize, max(chunk_bytes, row * 4))
        for entry, part in zip(t.entries or cfg.models, t.parts):
            values = _params(cfg, entry, t.name, layers) if t.t is None else _params_at(entry, t)
            densities.setdefault(entry.model, set()).add(float(values.get("density", 1.0)))
            method = sparsifier(spec.sparsify, values, flags.rescale, scope)
            if method is not None:
                key = f"{entry.model}\x00{t.name}"
                jobs[(entry.model, t.name)] = SparsifierJob(key, part, t.base, method, chunk,
                                                            method.initial_state(t.base.shape))
    if flags.global_trim:
        _check_one_density(cfg, densities)
    return jobs


def _check_one_density(cfg: MergeConfig, by_model: dict[str, set[float]]) -> None:
    """A whole-model trim keeps the top density of the model: one density per model."""
    for entry in cfg.models:
        densities = by_model.get(entry.model, set())
        if len(densities) > 1:
            raise ParameterError(f"file '{cfg.path}' line {entry.line}: global_trim ranks model '{entry.model}' "
                                 f"as a whole: its density must be one value, not {sorted(densities)}")
