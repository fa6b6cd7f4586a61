"""The driver of the streamed merge methods (``methods.STREAMED``: slerp, nuslerp, model_stock, ...).

The plan, from headers and manifests alone (every problem reported before any output exists):
the method's parameters checked against its own :class:`~.methods.base.Param` table (each key's
form, the models' count, what it requires of the base), every model opened as chunk sources and
every tensor matched (as ``merging.plan`` does for the task arithmetic family), each tensor's
parameters resolved (filters, gradients over the layers) into a :class:`TensorJob`.

The run: the methods' statistics passes, each a reduction over every chunk of every tensor that
needs it (partials added exactly: the same figures for any chunking, worker count or scheduler),
then one write pass in which each task merges one chunk of one tensor into the output shards.
Nothing here knows a method by name: each method's module owns its passes and combine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._version import __version__
from ..checkpoint import CheckpointWriter, OutputTensor
from ..checkpoint.writer import write_at
from ..dtypes import DTYPES, from_float32, to_float32
from ..engine import RunOptions, run_reduce, run_tasks
from ..errors import CheckpointError, MismatchError, ParameterError, show, tensor_context
from ..exact import NonFinite
from ..methods.base import combine_partials
from ..plan import chunk_elements, chunk_ranges
from ..sources import Model, Source, checkpoint_model
from .config import MergeConfig, ModelEntry, _setting, layer_position, resolve_at
from .methods.base import STREAMED, Chunk, Param, StreamedMethod, TensorJob
from .outputs import finish_outputs

__all__ = ["StreamedPlan", "OutTensor", "StreamTask", "build_streamed", "execute_streamed"]


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    out_dtype: str
    job: int | None  # its TensorJob's index; None: copied from the reference (not a float tensor)
    source: Source  # the reference's tensor


@dataclass(frozen=True)
class StreamTask:
    method: str
    name: str
    job: int  # which of the graph's shared values is the task's (its TensorJob, or its source)
    index: int
    start: int
    stop: int
    pass_index: int  # -1: the write
    nbytes: int
    out_dtype: str = ""
    out_path: str = ""
    out_offset: int = 0


@dataclass
class StreamedPlan:
    cfg: MergeConfig
    method: StreamedMethod
    reference: Model
    tensors: list[OutTensor]
    jobs: list[TensorJob]
    chunk_bytes: int
    seed: int
    inputs: list[str]
    artifacts: list[str]
    config_updates: dict[str, Any] | None = None  # config.json keys the output sets (a frankenmerge's layers)
    vocab: Any = None  # the tokenizer plan (merging.tokenizer.VocabPlan), None: the reference's files

    def tasks(self, location) -> tuple[list[StreamTask], list[Any]]:
        shared: list[Any] = list(self.jobs)
        tasks = []
        for t in self.tensors:
            path, offset = location(t.name)
            if t.job is None:
                shared.append(t.source)
                k, chunks = len(shared) - 1, chunk_ranges(math.prod(t.shape), chunk_elements(
                    t.shape, t.source.dtype.itemsize, self.chunk_bytes))
                reads = t.source.dtype.itemsize
            else:
                job = self.jobs[t.job]
                k, chunks = t.job, chunk_ranges(job.numel, job.chunk_elems)
                reads = (len(job.models) + (job.base is not None)) * t.source.dtype.itemsize
            tasks += [StreamTask(self.method.name, t.name, k, i, s, e, -1, reads * (e - s), t.out_dtype, path, offset)
                      for i, (s, e) in enumerate(chunks)]
        return tasks, shared


# --- the plan --------------------------------------------------------------------------------

def build_streamed(cfg: MergeConfig, method: StreamedMethod, *, chunk_bytes: int, memory: int, seed: int,
                   strict: bool, options: RunOptions) -> StreamedPlan:
    from ..api import effective_chunk_bytes
    from .plan import _check_dtypes, _crop, _open_base, _open_input, merge_footprint

    _check_keys(cfg, method)
    if cfg.slices:
        return _build_sliced(cfg, method, chunk_bytes=chunk_bytes, memory=memory, seed=seed, strict=strict,
                             options=options)
    entries, has_base = _entries(cfg, method)
    problem = method.check_models(len(entries), has_base)
    if problem:
        raise ParameterError(f"{cfg.where('models')}: {problem}")
    base = _open_base(cfg)
    models = [_open_input(m, cfg, base) for m in entries]
    chunk_bytes = effective_chunk_bytes(chunk_bytes, memory, options, per_byte=merge_footprint(len(models)))
    reference = checkpoint_model(base) if base is not None else models[0]
    layers = len({n.split(".layers.")[1].split(".")[0] for n in reference.tensors if ".layers." in n})
    out_dtype = cfg.out_dtype or cfg.dtype
    tensors: list[OutTensor] = []
    jobs: list[TensorJob] = []
    vocab = _vocab_plan(cfg, reference, ([(cfg.base, reference)] if cfg.base is not None else [])
                        + [(e.path, m) for e, m in zip(entries, models)], cfg.base or entries[0].path)
    for name, ref in reference.tensors.items():
        parts = []
        for entry, model in zip(entries, models):
            source = model.tensors.get(name)
            if source is None:
                raise MismatchError(f"{tensor_context(model.path, name)}: missing from model '{entry.model}'")
            parts.append(source)
        if vocab is not None and vocab.is_vocab(name, ref):
            paths = ([cfg.base] if has_base else []) + [e.path for e in entries]
            permuted = vocab.permute(name, paths, ([ref] if has_base else []) + parts, cfg.base)
            ref, parts = (permuted[0], permuted[1:]) if has_base else (permuted[0], permuted)
        parts = [_crop(p, ref, e.model, strict) for p, e in zip(parts, entries)]
        _check_dtypes(ref, parts)
        if not ref.dtype.computable:
            tensors.append(OutTensor(name, ref.shape, ref.dtype.name, None, ref))
            continue
        job = _job(cfg, method, name, ref if has_base else None, parts, entries, layers, chunk_bytes)
        problem = method.check_tensor(job)
        if problem:
            raise ParameterError(f"{cfg.where('parameters')}: {method.name}: tensor '{name}': {problem}")
        tensors.append(OutTensor(name, ref.shape, out_dtype or ref.dtype.name, len(jobs), ref))
        jobs.append(job)
    inputs = [cfg.path] + (base.files if base else []) + [p for m in models for p in m.files]
    return StreamedPlan(cfg, method, reference, tensors, jobs, chunk_bytes, seed, inputs,
                        [m.digest for m in models if m.digest], vocab.config_updates() if vocab else None, vocab)


def _vocab_plan(cfg: MergeConfig, reference: Model, models: list[tuple[str, Model]], base: str):
    """The tokenizer plan of a ``tokenizer``/``tokenizer_source``/``chat_template`` config, or None."""
    if cfg.tokenizer is None and cfg.chat_template is None:
        return None
    from .tokenizer import build_vocab_plan

    return build_vocab_plan(cfg, reference, dict(models), base)


def _build_sliced(cfg: MergeConfig, method: StreamedMethod, *, chunk_bytes: int, memory: int, seed: int,
                  strict: bool, options: RunOptions) -> StreamedPlan:
    """A ``slices`` config (merging.slices): each output tensor from its slice's sources."""
    from ..api import effective_chunk_bytes
    from .plan import _check_dtypes, _crop, _open_base, _open_input, merge_footprint
    from .slices import slice_tensors

    member = method.base_model == "member"
    for s in cfg.slices:
        base_path = None if member else (s.base or cfg.base)
        has_base = base_path is not None and any(src.path == base_path for src in s.sources)
        if not member and base_path is not None and not has_base:
            raise ParameterError(f"{cfg.where('slices', s.index, 'sources')}: the base_model is not among this "
                                 f"slice's sources: merge_method '{method.name}' reads its layers from them")
        if not member and base_path is None and method.base_model == "required":
            raise ParameterError(f"{cfg.where()}: merge_method '{method.name}' needs a base_model")
        problem = method.check_models(len(s.sources) - has_base, has_base)
        if problem:
            raise ParameterError(f"{cfg.where('slices', s.index, 'sources')}: {problem}")
    base = _open_base(cfg)
    opened = {m.path: _open_input(m, cfg, base) for m in cfg.models}
    reference = checkpoint_model(base) if base is not None else opened[cfg.slices[0].sources[0].path]
    found, layers = slice_tensors(cfg, opened)
    widest = max(len(s.sources) for s in cfg.slices)
    chunk_bytes = effective_chunk_bytes(chunk_bytes, memory, options, per_byte=merge_footprint(widest))
    vocab = _vocab_plan(cfg, reference, ([(cfg.base, reference)] if cfg.base is not None else [])
                        + list(opened.items()), cfg.base or cfg.slices[0].sources[0].path)
    out_dtype = cfg.out_dtype or cfg.dtype
    tensors: list[OutTensor] = []
    jobs: list[TensorJob] = []
    for st in found:
        base_path = None if member else (st.slice.base or cfg.base)
        base_src = next((src for e, src in st.inputs if e.path == base_path), None)
        entries = [e for e, _ in st.inputs if e.path != base_path or base_src is None]
        parts = [src for e, src in st.inputs if e.path != base_path or base_src is None]
        ref = base_src if base_src is not None else parts[0]
        if vocab is not None and vocab.is_vocab(st.name, ref):
            permuted = vocab.permute(st.name, [e.path for e, _ in st.inputs], [src for _, src in st.inputs],
                                     base_path)
            by_path = {e.path: p for (e, _), p in zip(st.inputs, permuted)}
            base_src = by_path[base_path] if base_src is not None and base_path is not None else None
            parts = [by_path[e.path] for e in entries]
            ref = base_src if base_src is not None else parts[0]
        parts = [_crop(p, ref, e.model, strict) for p, e in zip(parts, entries)]
        _check_dtypes(ref, parts)
        if not ref.dtype.computable:
            tensors.append(OutTensor(st.name, ref.shape, ref.dtype.name, None, ref))
            continue
        job = _job(cfg, method, st.name, base_src, parts, entries, 0, chunk_bytes, t=st.t, scopes=st.scopes)
        problem = method.check_tensor(job)
        if problem:
            raise ParameterError(f"{st.where(cfg)}: {method.name}: tensor '{st.name}': {problem}")
        tensors.append(OutTensor(st.name, ref.shape, out_dtype or ref.dtype.name, len(jobs), ref))
        jobs.append(job)
    files = [cfg.path] + (base.files if base else []) + sorted({p for m in opened.values() for p in m.files})
    updates = {**(vocab.config_updates() if vocab else {}), LAYERS_KEY: layers}
    return StreamedPlan(cfg, method, reference, tensors, jobs, chunk_bytes, seed, files,
                        sorted({m.digest for m in opened.values() if m.digest}), updates, vocab)


#: the config.json key of the layer count a frankenmerge rewrites (others: see outputs.LAYER_KEYS)
LAYERS_KEY = "num_hidden_layers"


def _entries(cfg: MergeConfig, method: StreamedMethod) -> tuple[list[ModelEntry], bool]:
    """The models the method merges, and whether the base takes part as the base."""
    if method.base_model == "member":
        entries = list(cfg.models)
        if cfg.base is not None and all(m.path != cfg.base for m in entries):
            assert cfg.base_ref is not None
            entries.insert(0, ModelEntry(cfg.base_ref, cfg.base, {}, cfg.lines.get(("base_model",), 0)))
        return entries, False
    if cfg.base is None and method.base_model == "required":
        raise ParameterError(f"{cfg.where()}: merge_method '{method.name}' needs a base_model")
    return [m for m in cfg.models if m.path != cfg.base], cfg.base is not None


def _check_keys(cfg: MergeConfig, method: StreamedMethod) -> None:
    """Every key known to the method, in its place, of its form: one line each."""
    per_model = sorted(k for k, p in method.params.items() if p.per_model)
    glob = sorted(method.params)
    valid = f"(global: {', '.join(glob) or 'none'}; per model: {', '.join(per_model) or 'none'})"
    for key, value in cfg.parameters.items():
        if key not in method.params:
            raise ParameterError(f"{cfg.where('parameters', key)}: unknown parameter '{key}' for {method.name} {valid}")
        _check_value(cfg, key, method.params[key], value, ("parameters", key))
    for i, entry in enumerate(cfg.models if not cfg.slices else ()):
        for key, value in entry.parameters.items():
            if key not in per_model:
                raise ParameterError(f"{cfg.where('models', i, 'parameters', key)}: unknown parameter '{key}' for "
                                     f"{method.name} per model {valid}")
            _check_value(cfg, key, method.params[key], value, ("models", i, "parameters", key))
    for s in cfg.slices:
        for key, value in s.parameters.items():
            if key not in method.params:
                raise ParameterError(f"{cfg.where('slices', s.index, 'parameters', key)}: unknown parameter '{key}' "
                                     f"for {method.name} {valid}")
            _check_value(cfg, key, method.params[key], value, ("slices", s.index, "parameters", key))
        for j, src in enumerate(s.sources):
            at = ("slices", s.index, "sources", j, "parameters")
            for key, value in src.parameters.items():
                if key not in per_model:
                    raise ParameterError(f"{cfg.where(*at, key)}: unknown parameter '{key}' for {method.name} "
                                         f"per model {valid}")
                _check_value(cfg, key, method.params[key], value, at + (key,))


def _check_value(cfg: MergeConfig, key: str, param: Param, value: Any, at: tuple) -> None:
    if param.kind == "flag":
        if not isinstance(value, bool):
            raise ParameterError(f"{cfg.where(*at)}: {key} must be true or false, not {show(value)}")
    elif param.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or (param.low is not None and value < param.low):
            low = f" >= {param.low:g}" if param.low is not None else ""
            raise ParameterError(f"{cfg.where(*at)}: {key} must be an integer{low}, not {show(value)}")
    else:
        _setting(key, value, (param.low, param.high, param.low_open), lambda *k: cfg.where(*k), at)


def _first(scopes, key: str, name: str, t: float) -> Any:
    """mergekit's ``resolve_parameter``: the first scope whose setting gives a value."""
    for scope in scopes:
        if scope and key in scope:
            value = resolve_at(scope[key], name, t)
            if value is not None:
                return value
    return None


def _job(cfg: MergeConfig, method: StreamedMethod, name: str, base: Source | None, parts: list[Source],
         entries: list[ModelEntry], layers: int, chunk_bytes: int, t: float | None = None,
         scopes: tuple[dict, ...] | None = None) -> TensorJob:
    scopes = (cfg.parameters,) if scopes is None else scopes
    t = layer_position(name, layers) if t is None else t
    values: dict[str, Any] = {}
    for key, param in method.params.items():
        if param.per_model:
            continue
        value = _first(scopes, key, name, t)
        if value is None and param.required:
            raise ParameterError(f"{cfg.where('parameters')}: missing parameter '{key}' for {method.name} "
                                 f"(tensor '{name}')")
        values[key] = param.default if value is None else value
    model_values = []
    for entry in entries:
        mine: dict[str, Any] = {}
        for key, param in method.params.items():
            if not param.per_model:
                continue
            value = _first((entry.parameters,) + scopes, key, name, t)
            if value is None and param.required:
                raise ParameterError(f"file '{cfg.path}' line {entry.line}: missing parameter '{key}' for model "
                                     f"'{entry.model}' (tensor '{name}')")
            mine[key] = param.default if value is None else value
        model_values.append(mine)
    ref = base if base is not None else parts[0]
    shape = ref.shape
    row = shape[-1] if shape and shape[-1] else 1
    itemsize = ref.dtype.itemsize
    chunk = chunk_elements(shape, itemsize, max(chunk_bytes, row * itemsize) if method.whole_rows else chunk_bytes)
    if method.whole_rows and math.prod(shape) > chunk:
        chunk = max(row, chunk // row * row)
    return TensorJob(name, shape, base, tuple(parts), values, tuple(model_values), chunk)


# --- the run ---------------------------------------------------------------------------------

def _f32(source: Source, start: int, stop: int) -> np.ndarray:
    return to_float32(source.read(start, stop), source.dtype, out=np.empty(stop - start, np.float32))


def _chunk(job: TensorJob, index: int, start: int, stop: int) -> Chunk:
    base = _f32(job.base, start, stop) if job.base is not None else None
    return Chunk(start, stop, index, base, [_f32(m, start, stop) for m in job.models])


def _non_finite(task: StreamTask, job: TensorJob) -> CheckpointError:
    source = job.base if job.base is not None else job.models[0]
    return CheckpointError(f"{tensor_context(source.path, job.name)}: a NaN or infinite value in elements "
                           f"[{task.start}, {task.stop}): merge_method '{task.method}' computes figures over the "
                           "whole tensor (norms, angles, ranks) and refuses it")


def stats_chunk(task: StreamTask, job: TensorJob):
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            return STREAMED[task.method].pass_stats(task.pass_index, job, _chunk(job, task.index, task.start,
                                                                                  task.stop))
    except NonFinite:
        raise _non_finite(task, job) from None


def write_chunk(task: StreamTask, shared) -> None:
    if isinstance(shared, TensorJob):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            merged = STREAMED[task.method].combine(shared, _chunk(shared, task.index, task.start, task.stop))
        dtype = DTYPES[task.out_dtype]
        out = from_float32(np.ascontiguousarray(merged, np.float32).reshape(-1), dtype,
                           out=np.empty(task.stop - task.start, dtype.bits))
    else:
        out = shared.read(task.start, task.stop)
    write_at(task.out_path, task.out_offset + task.start * out.itemsize, out, task.name)


def run_passes(plan: StreamedPlan, options: RunOptions) -> None:
    method = plan.method
    passes = max((method.passes(j) for j in plan.jobs), default=0)
    for i in range(passes):
        todo = [j for j in plan.jobs if i < method.passes(j) and not j.state.get("done")
                and j.state.get("_skip_to", 0) <= i]
        if not todo:
            continue
        tasks = [StreamTask(method.name, j.name, k, c, s, e, i, (len(j.models) + 1) * (e - s) * 2)
                 for k, j in enumerate(todo) for c, (s, e) in enumerate(chunk_ranges(j.numel, j.chunk_elems))]
        combined = run_reduce(stats_chunk, tasks, group_of=lambda t: t.name, combine=combine_partials,
                              name=f"stats-{i}", options=options, total_bytes=sum(t.nbytes for t in tasks),
                              bytes_of=lambda t: t.nbytes, shared=todo, uses=lambda t: (t.job,))
        for j in todo:
            j.state = method.finalize(i, j, combined[j.name])


def execute_streamed(plan: StreamedPlan, folder: str, max_shard_size: int, resume: bool, options: RunOptions) -> None:
    run_passes(plan, options)
    outputs = [OutputTensor(t.name, t.out_dtype, t.shape) for t in plan.tensors]
    metadata = {"deltastream_merge": plan.cfg.method, "deltastream_seed": str(plan.seed),
                "deltastream_version": __version__}
    writer = CheckpointWriter(folder, outputs, max_shard_size, metadata)
    writer.create(keep_existing=resume, journal=options.journal)
    tasks, shared = plan.tasks(writer.location)
    run_tasks(write_chunk, tasks, name="merge", options=options, total_bytes=sum(t.nbytes for t in tasks),
              bytes_of=lambda t: t.nbytes, shared=shared, uses=lambda t: (t.job,))
    finish_outputs(folder, plan.reference.side_files, plan.cfg, plan.config_updates, plan.vocab)


def describe(method: StreamedMethod) -> str:
    """One line per parameter: key, default, per model or global, meaning (docs and errors)."""
    lines = []
    for key, p in method.params.items():
        default = "required" if p.required else f"default {p.default!r}"
        lines.append(f"{key} ({'per model' if p.per_model else 'global'}, {default}): {p.help}")
    return "\n".join(lines)

