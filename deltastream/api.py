"""The Python API: one function per command, taking what the CLI takes.

    import deltastream as ds
    ds.compress("base/", "finetune/", "ft.dsz", method="lossless")
    ds.apply("base/", "ft.dsz", "rebuilt/")
    ds.info("ft.dsz")["ratio"]
"""

from __future__ import annotations

from typing import Any, overload

from .engine import RunOptions
from .errors import ParameterError
from .jobs import apply as apply_job
from .jobs import compress as compress_job
from .jobs import edit as edit_job
from .jobs import info as info_job
from .methods import Method, get_method
from .params import parse_local_cluster, parse_seed, parse_strings, parse_workers
from .plan import DEFAULT_CHUNK_BYTES
from .policy import Policy
from .units import parse_size

__all__ = ["compress", "apply", "edit", "merge", "verify", "info", "analyze", "extract_lora", "DEFAULT_MEMORY_BYTES"]

#: the memory budget for chunks in flight; the chunk size shrinks to fit it
DEFAULT_MEMORY_BYTES = 1 << 30
#: peak private bytes one running task holds per byte of its input chunk: encoded output and codec
#: buffers (exact storage); float32 copies of the delta, the base and the output (lossy methods).
#: Measured by benchmarks/bench_memory.py; docs/architecture.md#memory-model.
TASK_FOOTPRINT = 4
LOSSY_FOOTPRINT = 12


def footprint(method: Method | None) -> int:
    return LOSSY_FOOTPRINT if method is not None and method.lossy else TASK_FOOTPRINT


def run_options(workers: int | None = None, scheduler: str | None = None, progress: bool | None = None,
                client: Any = None) -> RunOptions:
    """The run options, checked: workers 1..MAX_WORKERS (or None), ``scheduler="local:N"`` bounded."""
    if isinstance(scheduler, str) and scheduler.startswith("local:"):
        parse_local_cluster(scheduler, "scheduler")
    return RunOptions(workers=parse_workers(workers), scheduler=scheduler, progress=progress, client=client)


def policy(include: str | tuple[str, ...], exclude: str | tuple[str, ...]) -> Policy:
    return Policy(parse_strings(include, "include", "a glob pattern"),
                  parse_strings(exclude, "exclude", "a glob pattern"))


def effective_chunk_bytes(chunk_size: int | str | None, memory: int | str | None, options: RunOptions,
                          method: Method | None = None, *, per_byte: int | None = None) -> int:
    """The chunk size, shrunk so that workers x footprint x chunk fits the memory budget. The
    footprint is the method's (``footprint``), or ``per_byte``: a job's own bytes held per byte
    of input chunk (merge: ``merging.plan.merge_footprint`` of its model count)."""
    chunk = parse_size(chunk_size, "chunk size") if chunk_size is not None else DEFAULT_CHUNK_BYTES
    budget = parse_size(memory, "memory budget") if memory is not None else DEFAULT_MEMORY_BYTES
    fit = budget // (options.n_workers * (per_byte or footprint(method)))
    return min(chunk, max(fit, 1 << 16))


def resolve_method(method: str | Method, params: dict[str, Any], function: str) -> Method:
    """A method from its name and keyword parameters (the method refuses one it does not have:
    ``chunksize=`` for ``chunk_size=``), or a Method object, which carries its own: then every
    extra keyword is such a mistake, refused rather than ignored."""
    if isinstance(method, Method):
        if params:
            raise ParameterError(f"{function}(): unexpected keyword argument(s) {', '.join(sorted(params))} "
                                 f"(method '{method.method_id}' is a Method object, which carries its parameters)")
        return method
    if not isinstance(method, str):
        raise ParameterError(f"{function}(): method must be a method name or a Method, not {type(method).__name__}")
    return get_method(method, **params)


@overload
def compress(base: str, fine_tune: str, out: str, method: str | Method = ..., **kwargs: Any) -> str: ...
@overload
def compress(base: str, fine_tune: list[str], out: str, method: str | Method = ..., **kwargs: Any) -> list[str]: ...


def compress(base: str, fine_tune: str | list[str], out: str, method: str | Method = "lossless", *,
             chunk_size: int | str | None = None, memory: int | str | None = None, seed: int = 0,
             include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), overwrite: bool = False,
             resume: bool = False, device: str = "cpu", workers: int | None = None, scheduler: str | None = None,
             progress: bool | None = False, client: Any = None, **params: Any) -> str | list[str]:
    """Compress fine_tune's delta against base into the artifact ``out`` (returns its path); given
    a list of fine-tunes, write ``out/<name>.dsz`` for each in one pass over the base (returns the
    list of paths).

    ``method`` is a name (its parameters as keyword arguments, e.g. ``p=0.9``) or a Method;
    ``include``/``exclude`` are glob patterns of tensor names (see ``deltastream.policy``);
    ``device`` "cuda" (or "auto") encodes on the GPU the methods that have a torch encoder.
    """
    from .device import resolve_device

    m = resolve_method(method, params, "compress")
    options = run_options(workers, scheduler, progress, client)
    kw: dict[str, Any] = dict(chunk_bytes=effective_chunk_bytes(chunk_size, memory, options, m),
                              seed=parse_seed(seed), policy=policy(include, exclude), overwrite=overwrite,
                              resume=resume, options=options, device=resolve_device(device))
    if isinstance(fine_tune, str):
        return compress_job.compress(base, fine_tune, out, m, **kw)
    return compress_job.compress_many(base, fine_tune, out, m, **kw)


def edit(base: str, fine_tune: str, out: str, method: str | Method, *, chunk_size: int | str | None = None,
         memory: int | str | None = None, seed: int = 0, include: tuple[str, ...] = (),
         exclude: tuple[str, ...] = (), max_shard_size: int | str = "5GB", overwrite: bool = False,
         resume: bool = False, device: str = "cpu", workers: int | None = None, scheduler: str | None = None,
         progress: bool | None = False, client: Any = None, **params: Any) -> str:
    """Write base + method(delta) as the checkpoint folder ``out`` (same keywords as compress);
    ``device`` "cuda" (or "auto": CUDA when present) edits each chunk on the GPU, with the same bits."""
    from .device import resolve_device

    m = resolve_method(method, params, "edit")
    options = run_options(workers, scheduler, progress, client)
    path, _ = edit_job.edit(base, fine_tune, out, m, chunk_bytes=effective_chunk_bytes(chunk_size, memory, options, m),
                            seed=parse_seed(seed), policy=policy(include, exclude),
                            max_shard_size=parse_size(max_shard_size, "max shard size"), overwrite=overwrite,
                            resume=resume, options=options, device=resolve_device(device))
    return path


def apply(base: str, artifact: str, out: str, *, max_shard_size: int | str = "5GB", overwrite: bool = False,
          resume: bool = False, device: str = "cpu", workers: int | None = None, scheduler: str | None = None,
          progress: bool | None = False, client: Any = None) -> str:
    """Rebuild the (edited) fine-tune from base + artifact into the checkpoint folder ``out``;
    ``device`` "cuda" (or "auto") decodes on the GPU the chunks of methods with a torch decoder."""
    from .device import resolve_device

    return apply_job.apply(base, artifact, out, max_shard_size=parse_size(max_shard_size, "max shard size"),
                           overwrite=overwrite, resume=resume,
                           options=run_options(workers, scheduler, progress, client), device=resolve_device(device))


def verify(artifact: str, base: str | None = None, *, workers: int | None = None, scheduler: str | None = None,
           progress: bool | None = False, client: Any = None) -> dict[str, Any]:
    """Check an artifact (and, given a base, that it is the right one); raise on any problem."""
    apply_job.verify(artifact, base, options=run_options(workers, scheduler, progress, client))
    return {"artifact": artifact, "base": base, "ok": True}


def info(artifact: str) -> dict[str, Any]:
    """An artifact's manifest summary, stored sizes and ratios, as JSON-able data."""
    return info_job.info(artifact)


def merge(config: str, out: str, *, seed: int = 0, strict: bool = False, chunk_size: int | str | None = None,
          memory: int | str | None = None, max_shard_size: int | str = "5GB", overwrite: bool = False,
          resume: bool = False, workers: int | None = None, scheduler: str | None = None,
          progress: bool | None = False, client: Any = None) -> str:
    """Merge the models of a mergekit-style YAML config into the checkpoint folder ``out``."""
    from .merging.job import merge as merge_job

    options = run_options(workers, scheduler, progress, client)
    chunk = parse_size(chunk_size, "chunk size") if chunk_size is not None else DEFAULT_CHUNK_BYTES
    budget = parse_size(memory, "memory budget") if memory is not None else DEFAULT_MEMORY_BYTES
    # the chunk shrinks to fit the budget once the models are counted (merging.plan.merge_footprint)
    return merge_job(config, out, chunk_bytes=chunk, memory=budget, seed=parse_seed(seed), strict=strict,
                     max_shard_size=parse_size(max_shard_size, "max shard size"), overwrite=overwrite,
                     resume=resume, options=options)


def analyze(base: str, fine_tune: str, data: str, method: str | Method | None = None, *, edited: str | None = None,
            seed: int = 0, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), steps: int = 5,
            max_tokens: int = 4096, seq_len: int = 256, batch_size: int = 4, dtype: str = "float32",
            device: str = "cpu", progress: bool = False, work_dir: str | None = None, recompute: bool = True,
            **params: Any) -> dict[str, Any]:
    """The loss change of one edit, predicted (the Riemann-sum term, C = ``steps``) and measured on
    ``data``: ``method`` (made by ``edit``, parameters as keywords) or the checkpoint ``edited``.
    For many edits of one fine-tune, use ``deltastream.analysis.Analyzer`` (the model loads once)."""
    from .analysis import Analyzer

    with Analyzer(base, fine_tune, data, steps=steps, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                  dtype=dtype, device=device, progress=progress, work_dir=work_dir, recompute=recompute) as analyzer:
        return analyzer.run(method, params, seed=parse_seed(seed), edited=edited, include=include,
                            exclude=exclude).as_dict()


def extract_lora(base: str, fine_tune: str, out: str, *, rank: int | None = None, rank_fraction: float | None = None,
                 energy: float | None = None, modules_to_save: bool = False, base_name: str | None = None,
                 dtype: str = "float32", oversample: int = 8, power_iters: int = 2,
                 chunk_size: int | str | None = None, memory: int | str | None = None, seed: int = 0,
                 overwrite: bool = False, workers: int | None = None, scheduler: str | None = None,
                 progress: bool | None = False, client: Any = None) -> dict[str, Any]:
    """Write fine_tune's delta against base as a PEFT LoRA adapter folder ``out`` (streamed
    randomized SVD, docs/lora.md): at ``rank``, ``rank_fraction`` of each matrix's smaller side,
    or the smallest rank keeping ``energy`` of its delta energy (bounded by the other two);
    ``modules_to_save`` also stores the tensors LoRA cannot express. Returns the report: per
    tensor and in total, the fraction of the delta's energy kept."""
    from .jobs.tensors import STATE_BUDGET
    from .lora.extract import ExtractRank
    from .lora.extract import extract_lora as extract_job
    from .methods.lowrank import LowRank

    options = run_options(workers, scheduler, progress, client)
    choice = ExtractRank(rank, rank_fraction, energy)
    budget = parse_size(memory, "memory budget") if memory is not None else DEFAULT_MEMORY_BYTES
    return extract_job(base, fine_tune, out, choice, modules_to_save=modules_to_save, base_name=base_name,
                       dtype=dtype, oversample=oversample, power_iters=power_iters,
                       chunk_bytes=effective_chunk_bytes(chunk_size, memory, options, LowRank()),
                       seed=parse_seed(seed), overwrite=overwrite, options=options,
                       state_budget=min(STATE_BUDGET, max(budget // 4, 1 << 20)))
