"""``merge``: a mergekit config -> one merged checkpoint, every input streamed chunk by chunk.

Before any heavy I/O: the config is checked, every model opened by its headers, every tensor
matched (a missing tensor or a shape mismatch names the model file and the tensor; a vocabulary
larger than the base's is cropped to it with a warning, or refused with ``strict``). Models given
as deltastream artifacts are rebuilt first, streamed, into the output's scratch folder.

Then the per-(model, tensor) sparsifiers run their stats passes (exact thresholds for trims, L1
factors for DARE/DELLA rescale), and one write pass merges each chunk: the base chunk is read once
for all models, each model's chunk is read, sparsified and combined, and the result is written in
place in the output shards. Outputs: shards + index, the base's config (torch_dtype set) and
tokenizer files, a README.md model card, the config used (mergekit_config.yml).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from .._version import __version__
from ..checkpoint import Checkpoint, CheckpointWriter, OutputTensor, TensorInfo, copy_side_file, open_checkpoint, \
    load_side_file, read_bits
from ..checkpoint.writer import write_at
from ..dtypes import COMPUTABLE, DTYPES, from_float32, to_float32
from ..engine import RunOptions, job_output, run_tasks
from ..errors import CheckpointError, MismatchError, ParameterError, tensor_context
from ..jobs.tensors import TensorJob, run_stats_passes
from ..exact import NonFinite
from ..methods.base import ChunkContext, LossyMethod, NonFiniteDelta, non_finite_error
from ..plan import DEFAULT_CHUNK_BYTES, TensorPlan, chunk_elements
from ..ranks import slices
from ..policy import DEFAULT_KEEP_EXACT
from .config import MergeConfig, load_merge_config, resolve
from .methods import GLOBAL, MERGE_METHODS, PER_MODEL, MergeSpec, combine, linear, sparsifier

__all__ = ["merge", "MergeTask", "merge_chunk"]


@dataclass(frozen=True)
class ModelPart:
    info: TensorInfo  # the model's tensor, cropped to the base's rows
    weight: float
    method: LossyMethod | None
    ctx: ChunkContext | None


@dataclass(frozen=True)
class MergeTask:
    name: str
    base: TensorInfo
    start: int
    stop: int
    parts: tuple[ModelPart, ...]
    spec: MergeSpec | None  # None: copied from the base (not a float tensor)
    linear: bool
    normalize: bool
    lam: float
    official: bool
    out_dtype: str
    out_path: str
    out_offset: int


def _f32(info: TensorInfo, start: int, stop: int) -> np.ndarray:
    return to_float32(read_bits(info, start, stop), info.dtype, out=np.empty(stop - start, np.float32))


def merge_chunk(task: MergeTask) -> None:
    s, e = task.start, task.stop
    if task.spec is None:
        out = read_bits(task.base, s, e)
    else:
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are carried element-wise
            out = _merged_bits(task, s, e)
    write_at(task.out_path, task.out_offset + s * out.itemsize, out, task.name)


def _merged_bits(task: MergeTask, s: int, e: int) -> np.ndarray:
    """The merged output of elements [s, e) of a float tensor, as the output dtype's bits."""
    base = _f32(task.base, s, e)
    if task.linear:
        merged = linear([_f32(p.info, s, e) for p in task.parts], [p.weight for p in task.parts], task.normalize)
    else:
        deltas = []
        for part in task.parts:
            delta = _f32(part.info, s, e)
            delta -= base
            if part.method is not None:  # sparsifiers edit in place
                try:
                    delta = part.method.edit_delta(delta, part.ctx)
                except NonFinite:
                    raise non_finite_error(part.method, part.ctx, part.info, task.base, read_bits(part.info, s, e),
                                           read_bits(task.base, s, e)) from None
            deltas.append(delta)
        # combined a slice at a time: the temporaries stay small and in cache
        for a, b in slices(e - s):
            base[a:b] = combine(base[a:b], [d[a:b] for d in deltas], [p.weight for p in task.parts], task.spec,
                                normalize=task.normalize, lam=task.lam, official=task.official)
        merged = base
    return from_float32(np.ascontiguousarray(merged, np.float32), DTYPES[task.out_dtype],
                        out=np.empty(e - s, DTYPES[task.out_dtype].bits))


def _is_embed(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_KEEP_EXACT)


def _open_input(entry, cfg: MergeConfig) -> Checkpoint | None:
    """A model checkpoint opened by its headers, before any output exists (so that the output is
    checked against every file it holds); None for an artifact, rebuilt by _open_model."""
    if not os.path.exists(entry.path):
        raise ParameterError(f"file '{cfg.path}' line {entry.line}: model '{entry.model}' not found ({entry.path})")
    if os.path.isfile(os.path.join(entry.path, "zarr.json")):  # an artifact
        if cfg.base is None:
            raise ParameterError(f"{cfg.where('models')}: model '{entry.model}' is an artifact: it needs base_model")
        return None
    return open_checkpoint(entry.path)


def _open_model(entry, opened: Checkpoint | None, scratch_dir: str, base_path: str, options: RunOptions) -> Checkpoint:
    if opened is not None:
        return opened
    from ..jobs.apply import apply  # an artifact: rebuild it, streamed

    out = os.path.join(scratch_dir, f"model-{abs(hash(entry.model)) % 10**8}")
    apply(base_path, entry.path, out, overwrite=True, options=replace(options, journal=None))
    return open_checkpoint(out)


def _crop(info: TensorInfo, base: TensorInfo, model: str, strict: bool) -> TensorInfo:
    if info.shape == base.shape:
        return info
    if (_is_embed(info.name) and len(info.shape) == 2 and info.shape[1:] == base.shape[1:]
            and info.shape[0] > base.shape[0] and info.dtype == base.dtype):
        if strict:
            raise MismatchError(f"{tensor_context(info.path, info.name)}: vocabulary {info.shape[0]} differs from "
                                f"the base's {base.shape[0]} (model '{model}'; without --strict it is cropped)")
        print(f"deltastream: warning: {tensor_context(info.path, info.name)}: cropped to the base's "
              f"{base.shape[0]} rows (model '{model}' has {info.shape[0]})", file=sys.stderr)
        return replace(info, shape=base.shape, nbytes=base.nbytes)
    raise MismatchError(f"{tensor_context(info.path, info.name)}: shape {info.shape} differs from the base's "
                        f"{base.shape} (model '{model}')")


def _check_params(cfg: MergeConfig, spec: MergeSpec) -> dict:
    allowed = set(PER_MODEL[spec.sparsify])
    for i, entry in enumerate(cfg.models):
        for key in entry.parameters:
            if key not in allowed:
                raise ParameterError(f"{cfg.where('models', i, 'parameters', key)}: unknown parameter '{key}' for "
                                     f"{cfg.method} (per model: {', '.join(sorted(allowed))})")
    for key in cfg.parameters:
        if key not in allowed and key not in GLOBAL:
            raise ParameterError(f"{cfg.where('parameters', key)}: unknown parameter '{key}' for {cfg.method} "
                                 f"(global: {', '.join(GLOBAL)}; per model: {', '.join(sorted(allowed))})")
    if cfg.parameters.get("int8_mask"):
        print("deltastream: note: int8_mask only tunes mergekit's memory use; ignored", file=sys.stderr)
    return {
        "normalize": bool(cfg.parameters.get("normalize", spec.normalize)),
        "rescale": bool(cfg.parameters.get("rescale", spec.rescale)),
        "lambda": float(cfg.parameters.get("lambda", 1.0)),
        "official": cfg.parameters.get("consensus", "mergekit") == "official",
    }


#: a merge task's peak private memory, in float32 chunk-length arrays: fixed + per model (masks,
#: magnitudes, ranks and the sparsifiers' temporaries included)
_PER_MODEL_ARRAYS, _FIXED_ARRAYS = 8, 6  # measured on ties, 2 models: 880 MiB at 16 MiB chunks


def merge(config: str, out: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, memory: int = 1 << 30, seed: int = 0,
          strict: bool = False, max_shard_size: int = 5 * 10**9, overwrite: bool = False, resume: bool = False,
          options: RunOptions = RunOptions()) -> str:
    cfg = load_merge_config(config)
    # a task holds float32 copies (2 bytes per bf16 input byte) of the base and each model's delta
    per_byte = 2 * (_FIXED_ARRAYS + _PER_MODEL_ARRAYS * len(cfg.models))
    chunk_bytes = max(1 << 16, min(chunk_bytes, memory // (options.n_workers * per_byte)))
    spec = MERGE_METHODS.get(cfg.method)
    if spec is None:
        raise ParameterError(f"{cfg.where('merge_method')}: unknown merge_method '{cfg.method}' "
                             f"(valid: {', '.join(sorted(MERGE_METHODS))})")
    if cfg.base is None and cfg.method != "linear":
        raise ParameterError(f"{cfg.where()}: merge_method '{cfg.method}' needs a base_model")
    flags = _check_params(cfg, spec)
    if cfg.base is not None and not os.path.exists(cfg.base):
        raise ParameterError(f"{cfg.where('base_model')}: base_model not found ({cfg.base})")
    plan = {"merge": cfg.text, "seed": seed, "chunk": chunk_bytes, "strict": strict, "shard": max_shard_size}
    base = open_checkpoint(cfg.base) if cfg.base else None
    if cfg.method != "linear":  # as mergekit: the base listed among the models adds no task vector
        cfg = replace(cfg, models=tuple(m for m in cfg.models if m.path != cfg.base))
    opened = [_open_input(m, cfg) for m in cfg.models]
    # every file read: the config, each checkpoint's index, shards and side files, each artifact's folder
    inputs = [cfg.path] + (base.files if base else []) + [p for m, c in zip(cfg.models, opened)
                                                          for p in (c.files if c is not None else [m.path])]
    with job_output(out, overwrite=overwrite, inputs=inputs, resume=resume, plan=plan,
                    options=options) as (folder, options):
        scratch_dir = os.path.join(folder, ".inputs")
        models = [_open_model(m, c, scratch_dir, cfg.base, options) for m, c in zip(cfg.models, opened)]
        reference = base or models[0]
        layers = len({n.split(".layers.")[1].split(".")[0] for n in reference.tensors if ".layers." in n})
        matched = _match_tensors(cfg, reference, models, strict)
        jobs = _sparsifier_jobs(cfg, spec, matched, layers, flags["rescale"], chunk_bytes)
        with _non_finite_remedy(cfg.method):
            run_stats_passes(list(jobs.values()), seed, options, post=True)
        out_dtype = cfg.out_dtype or cfg.dtype
        outputs = [OutputTensor(n, (out_dtype if b.dtype.computable and out_dtype else b.dtype.name), b.shape)
                   for n, b, _ in matched]
        metadata = {"deltastream_merge": cfg.method, "deltastream_seed": str(seed),
                    "deltastream_version": __version__}
        writer = CheckpointWriter(folder, outputs, max_shard_size, metadata)
        writer.create(keep_existing=resume, journal=options.journal)
        tasks = []
        for (name, binfo, parts), output in zip(matched, outputs):
            path, offset = writer.location(name)
            weights = []
            for entry in cfg.models:
                weight = _params(cfg, entry, name, layers).get("weight")
                if weight is None:
                    raise ParameterError(f"file '{cfg.path}' line {entry.line}: missing parameter 'weight' for "
                                         f"model '{entry.model}' (tensor '{name}')")
                weights.append(float(weight))
            tensor_jobs = [jobs.get((entry.model, name)) for entry in cfg.models]
            # the chunking of the stats passes, where there were any (ranks and masks follow it)
            plan = next((j.plan for j in tensor_jobs if j is not None), None) or TensorPlan(
                name, binfo, binfo, chunk_elements(binfo.shape, binfo.dtype.itemsize, chunk_bytes))
            for chunk in plan.chunks():
                model_parts = tuple(ModelPart(info, w, j.method if j else None, j.context(chunk, seed) if j else None)
                                    for info, w, j in zip(parts, weights, tensor_jobs))
                tasks.append(MergeTask(name, binfo, chunk.start, chunk.stop, model_parts,
                                       spec if binfo.dtype.computable else None, cfg.method == "linear",
                                       flags["normalize"], flags["lambda"], flags["official"], output.dtype,
                                       path, offset))
        with _non_finite_remedy(cfg.method):
            run_tasks(merge_chunk, tasks, name="merge", options=options,
                      total_bytes=sum((len(t.parts) + 1) * (t.stop - t.start) * t.base.dtype.itemsize for t in tasks),
                      bytes_of=lambda t: (len(t.parts) + 1) * (t.stop - t.start) * t.base.dtype.itemsize)
        shutil.rmtree(scratch_dir, ignore_errors=True)
        _write_side_files(folder, reference, out_dtype)
        with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as f:
            f.write(cfg.text)
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(cfg, os.path.basename(os.path.abspath(out)), seed))
    return os.path.abspath(out)


@contextmanager
def _non_finite_remedy(method: str):
    """A sparsifier's non-finite error, with the merge's own reason (a merge has no --exclude)."""
    try:
        yield
    except NonFiniteDelta as exc:
        raise NonFiniteDelta(exc.args[0], f"merge_method '{method}' sparsifies by figures over the whole tensor or "
                             "row and refuses a non-finite delta (linear, task_arithmetic and a plain DARE carry "
                             "it element-wise)") from None


def _params(cfg: MergeConfig, entry, name: str, layers: int) -> dict:
    """A model's parameters for one tensor: its own over the global ones, filters resolved."""
    return {k: resolve(v, name, layers) for k, v in {**cfg.parameters, **entry.parameters}.items()}


def _match_tensors(cfg: MergeConfig, reference: Checkpoint, models: list[Checkpoint], strict: bool) -> list:
    """(name, reference tensor, each model's tensor cropped to it) for every tensor, or a clear error."""
    matched = []
    for name, binfo in reference.tensors.items():
        parts = []
        for entry, model in zip(cfg.models, models):
            info = model.tensors.get(name)
            if info is None:
                raise MismatchError(f"{tensor_context(model.path, name)}: missing from model '{entry.model}'")
            parts.append(_crop(info, binfo, entry.model, strict))
        _check_dtypes(binfo, parts)
        matched.append((name, binfo, parts))
    return matched


def _check_dtypes(binfo: TensorInfo, parts: list[TensorInfo]) -> None:
    """A tensor is merged in float32 (every input computable) or, for integers and bool, copied
    from the reference. Any other float (fp8) or complex tensor is refused, as is a model whose
    dtype cannot be widened: mergekit would merge those in its working dtype, and copying the
    base's would silently drop the models' change."""
    floating = binfo.dtype.is_float or binfo.dtype.kind == "complex"
    for info in [binfo] + parts if floating else ():
        if not info.dtype.computable:
            raise ParameterError(f"{tensor_context(info.path, info.name)}: cannot merge dtype {info.dtype.name} "
                                 f"(merges compute in float32, from {COMPUTABLE}); convert the checkpoints first")


def _sparsifier_jobs(cfg: MergeConfig, spec: MergeSpec, matched: list, layers: int, rescale: bool,
                     chunk_bytes: int) -> dict[tuple[str, str], TensorJob]:
    """One stats-pass job per (model, tensor) that a sparsifier edits, keyed (model, tensor); each
    draws its random stream from the model as written and the tensor name."""
    jobs: dict[tuple[str, str], TensorJob] = {}
    if spec.sparsify is None:
        return jobs
    for name, binfo, parts in matched:
        if not binfo.dtype.computable:
            continue
        # DELLA ranks within rows: a chunk holds whole rows (a 1-D tensor is one row)
        row = binfo.shape[-1] if len(binfo.shape) >= 2 else max(1, binfo.numel)
        chunk = chunk_elements(binfo.shape, binfo.dtype.itemsize, max(chunk_bytes, row * 4))
        for entry, info in zip(cfg.models, parts):
            method = sparsifier(spec.sparsify, _params(cfg, entry, name, layers), rescale)
            if method is None:
                continue
            key = f"{entry.model}\x00{name}"
            plan = TensorPlan(name=key, ft=replace(info, name=name), base=binfo, chunk_elems=chunk)
            jobs[(entry.model, name)] = TensorJob(index=len(jobs), plan=plan, policy=cfg.method, method=method,
                                                  rng_name=key, state=method.initial_state(binfo.shape))
    return jobs


def _write_side_files(folder: str, reference: Checkpoint, out_dtype: str | None) -> None:
    names = {v: k for k, v in {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.items()}
    for name, path in reference.side_files.items():
        target = os.path.join(folder, name)
        if name == "config.json" and out_dtype:
            text = load_side_file(path)
            try:
                config = json.loads(text)
            except (ValueError, RecursionError):
                config = None
            if not isinstance(config, dict):
                raise CheckpointError(f"{tensor_context(path)}: cannot set torch_dtype: not a JSON object")
            config["torch_dtype"] = names[out_dtype]
            with open(target, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        else:
            copy_side_file(path, target)


def model_card(cfg: MergeConfig, title: str, seed: int) -> str:
    import yaml

    front = yaml.safe_dump({"base_model": [cfg.base_ref] if cfg.base_ref else [], "tags": ["merge", "deltastream"],
                            "library_name": "transformers"}, sort_keys=True)
    models = "\n".join(f"* {m.model}" for m in cfg.models)
    return (f"---\n{front}---\n# {title}\n\nThis is a merge of pre-trained language models created with "
            f"deltastream {__version__}.\n\n## Merge Details\n### Merge Method\n\nThis model was merged using the "
            f"{cfg.method} merge method" + (f" using {cfg.base_ref} as a base" if cfg.base_ref else "") +
            f", with random seed {seed}.\n\n### Models Merged\n\n{models}\n\n### Configuration\n\n"
            f"The following YAML configuration was used to produce this model:\n\n```yaml\n{cfg.text.rstrip()}\n```\n")
