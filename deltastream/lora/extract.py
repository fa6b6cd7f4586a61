"""LoRA out: ``extract-lora``, a full fine-tune's delta as a PEFT LoRA adapter, streamed.

Every linear weight (a 2-D float ``*.weight`` of the same shape in both models, embeddings and
heads aside) is a LoRA target. Its delta ``D = ft - base`` (d x k) is factored by the out-of-core
randomized SVD of ``deltastream.methods.lowrank`` (the same passes, the same kernels, the same
sketch streams: :class:`LowRank` is run as it is, at a rank fraction that gives the chosen rank),
which never holds D: ``U_r S_r`` (d x r) and ``V_r^T`` (r x k) come out of 2q + 2 passes over the
chunks. The adapter stores ``lora_B = U_r S_r`` and ``lora_A = V_r^T`` with ``lora_alpha = r`` (scale
1), so PEFT's merged weight is ``base + U_r S_r V_r^T``: the rank-r reconstruction
``deltastream edit --method lowrank`` writes at the same rank, seed and chunking.

The rank of each matrix: ``--rank R`` (at most min(d, k)); ``--rank-fraction F`` (``max(1, int(F
min(d, k)))``); ``--energy E``, the smallest rank whose singular values keep a fraction E of the
matrix's delta energy ``||D||_F^2``, found among the singular values of a sketch at the rank
``--rank``/``--rank-fraction`` give (default fraction 0.25): an upper bound, reported when E is not
reached within it. Singular values are the column norms of ``U_r S_r``; the energy each rank
keeps is ``sum sigma_i^2 / ||D||_F^2``, ``||D||_F^2`` summed exactly as the chunks stream by (the
first pass's float64 sum, folded in chunk order). Ranks that differ go to ``rank_pattern`` and
``alpha_pattern`` (alpha = r again), keyed by the full module name.

Tensors LoRA cannot express (1-D norms and biases, changed embeddings and heads, anything not a
linear weight) are found by a streamed pass (their delta energy, and whether any bit changed),
reported, and with ``modules_to_save`` written whole into the adapter under PEFT's names
(``base_model.model.<tensor>``), each chunk copied from the fine-tune.

Output: ``adapter_config.json`` and ``adapter_model.safetensors`` in a folder made under
``OUT.partial`` and renamed into place. The factors of each batch of matrices (their sketch state
within a quarter of ``--memory``, at most 256 MiB) are appended to a spill file there as soon as
they are known, so the driver holds one batch's factors at a time; the safetensors file is that
data behind its header, written once all ranks are known.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checkpoint import TensorInfo, open_checkpoint
from ..dtypes import DTYPES, DType, from_float32, to_float32
from ..engine import RunOptions, run_reduce
from ..engine.atomic import atomic_output
from ..errors import ParameterError, escape
from ..jobs.tensors import STATE_BUDGET, TensorJob, batches, run_stats_passes
from ..methods.base import combine_partials
from ..methods.lowrank import LowRank
from ..plan import DEFAULT_CHUNK_BYTES, TensorPlan, pair_tensors
from ..policy import DEFAULT_KEEP_EXACT
from ..sources import open_fine_tune, read_pair_base, read_tensor
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX

__all__ = ["extract_lora", "format_report", "ExtractRank", "FACTOR_DTYPES"]

#: the dtypes the factors can be stored in
FACTOR_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
#: the sketch's rank fraction for --energy when neither --rank nor --rank-fraction bounds it
ENERGY_CAP_FRACTION = 0.25
_SPILL = ".factors"
_COPY = 16 << 20


@dataclass(frozen=True)
class ExtractRank:
    """How each matrix's rank is chosen (one of rank / rank_fraction, energy optional)."""

    rank: int | None = None
    rank_fraction: float | None = None
    energy: float | None = None

    def __post_init__(self):
        if self.rank is None and self.rank_fraction is None and self.energy is None:
            raise ParameterError("extract-lora: give --rank R, --rank-fraction F or --energy E")
        if self.rank is not None and self.rank_fraction is not None:
            raise ParameterError("extract-lora: give --rank or --rank-fraction, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ParameterError(f"extract-lora: --rank must be a whole number of at least 1, not {self.rank!r}")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction <= 1.0:
            raise ParameterError(f"extract-lora: --rank-fraction must be in (0, 1], not {self.rank_fraction!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ParameterError(f"extract-lora: --energy must be in (0, 1], not {self.energy!r}")

    def sketch_rank(self, shape: tuple[int, ...]) -> int:
        """The rank the SVD is computed at (for --energy, the upper bound)."""
        m = min(shape)
        if self.rank is not None:
            return min(self.rank, m)
        fraction = self.rank_fraction if self.rank_fraction is not None else ENERGY_CAP_FRACTION
        return min(m, max(1, int(fraction * m)))

    def describe(self) -> dict:
        return {k: v for k, v in {"rank": self.rank, "rank_fraction": self.rank_fraction,
                                  "energy": self.energy}.items() if v is not None}


class _Extracting(LowRank):
    """Low rank as it is, keeping the delta's energy (the first pass's exact sum) in the state."""

    def finalize_pre(self, i: int, combined: dict, state: dict) -> dict:
        out = super().finalize_pre(i, combined, state)
        if i == 0:
            out["_energy"] = float(combined["fro2"])
        return out


def _lowrank_at(rank: int, shape: tuple[int, ...], oversample: int, power_iters: int) -> _Extracting:
    """LowRank whose Twin rule int(fraction * min(d, k)) gives ``rank`` (the 0.5 keeps it off
    the rounding edge)."""
    m = min(shape)
    fraction = 1.0 if rank >= m else (rank + 0.5) / m
    return _Extracting(rank_fraction=fraction, oversample=oversample, power_iters=power_iters)


def _is_target(plan: TensorPlan) -> bool:
    f = plan.ft
    return (len(f.shape) == 2 and min(f.shape) > 0 and f.dtype.computable and plan.name.endswith(".weight")
            and plan.base is not None and plan.base.shape == f.shape
            and not any(fnmatch.fnmatchcase(plan.name, p) for p in DEFAULT_KEEP_EXACT))


# --- the energy pass of the tensors LoRA cannot express ---------------------------------------

@dataclass(frozen=True)
class EnergyTask:
    name: str
    ft: TensorInfo
    base: TensorInfo | None
    base_numel: int
    start: int
    stop: int


def energy_chunk(task: EnergyTask) -> dict:
    """The chunk's delta energy (float64 sum of squares; a non-float dtype: 0) and whether any
    bit differs from the base's."""
    ft = read_tensor(task.ft, task.start, task.stop)
    base = read_pair_base(task.base, task.base_numel, task.start, task.stop, task.ft.dtype)
    changed = bool(np.any(ft != base)) or task.base is None or task.base_numel < task.stop
    energy = 0.0
    dtype = task.ft.dtype
    if changed and dtype.computable:
        with np.errstate(invalid="ignore", over="ignore"):
            if dtype.name == "F64":
                d = ft.view(np.float64) - base.view(np.float64)
            else:
                d = to_float32(ft, dtype).astype(np.float64) - to_float32(base, dtype)
            energy = float(np.dot(d, d))
    return {"energy": energy, "changed": int(changed)}


def _energies(plans: list[TensorPlan], options: RunOptions) -> dict[str, dict]:
    tasks = [EnergyTask(p.name, p.ft, p.base, p.base_numel, c.start, c.stop) for p in plans for c in p.chunks()]
    if not tasks:
        return {}
    return run_reduce(energy_chunk, tasks, group_of=lambda t: t.name, combine=combine_partials, name="energy",
                      options=options, total_bytes=sum(2 * (t.stop - t.start) * t.ft.dtype.itemsize for t in tasks),
                      bytes_of=lambda t: 2 * (t.stop - t.start) * t.ft.dtype.itemsize)


# --- the job ---------------------------------------------------------------------------------

def extract_lora(base: str, fine_tune: str, out: str, choice: ExtractRank, *, modules_to_save: bool = False,
                 base_name: str | None = None, dtype: str = "float32", oversample: int = 8, power_iters: int = 2,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, seed: int = 0, overwrite: bool = False,
                 options: RunOptions = RunOptions(), state_budget: int = STATE_BUDGET) -> dict:
    """Write the PEFT adapter of fine_tune's delta against base to the folder ``out``; return the
    report (per tensor and in total: the rank, the delta energy and the fraction kept).
    ``state_budget``: the sketch state the matrices of one batch may hold together (the API
    gives a quarter of the memory budget, at most STATE_BUDGET); it changes no bit of the output."""
    if dtype not in FACTOR_DTYPES:
        raise ParameterError(f"extract-lora: --dtype must be one of {', '.join(FACTOR_DTYPES)}, not '{escape(dtype)}'")
    factor_dtype = DTYPES[FACTOR_DTYPES[dtype]]
    LowRank(oversample=oversample, power_iters=power_iters)  # the parameters checked as lowrank checks them
    base_ckpt = open_checkpoint(base)
    ft_ckpt = open_fine_tune(fine_tune, base_ckpt)
    plans = pair_tensors(base_ckpt, ft_ckpt, chunk_bytes)
    targets = [p for p in plans if _is_target(p)]
    others = [p for p in plans if not _is_target(p)]
    target_modules = {p.name[: -len(".weight")] for p in targets}
    jobs = [TensorJob(i, p, "lowrank", m, p.name, m.initial_state(p.ft.shape))
            for i, p in enumerate(targets)
            for m in [_lowrank_at(choice.sketch_rank(p.ft.shape), p.ft.shape, oversample, power_iters)]]
    with atomic_output(out, overwrite=overwrite, inputs=[*base_ckpt.files, *ft_ckpt.files]) as folder:
        spill = os.path.join(folder, _SPILL)
        header: dict[str, dict] = {}
        rows: list[dict] = []
        with open(spill, "wb") as f:
            for batch in batches(jobs, state_budget):
                run_stats_passes(batch, seed, options, post=False)
                for job in batch:
                    rows.append(_write_factors(f, header, job, choice, factor_dtype))
                    job.state = {}
            energies = _energies(others, options)
            dropped: list[dict[str, Any]] = []
            for p in others:
                e = energies.get(p.name) or {}
                if not e.get("changed"):
                    continue
                module = p.name.rsplit(".", 1)[0]
                saveable = (p.base is not None and p.base.shape == p.ft.shape and p.ft.dtype.is_float
                            and module not in target_modules)
                saved = modules_to_save and saveable
                if saved:
                    _copy_tensor(f, header, p, chunk_bytes)
                dropped.append({"name": p.name, "shape": list(p.ft.shape), "dtype": p.ft.dtype.name,
                                "energy": float(e.get("energy", 0.0)), "saved": saved, "saveable": saveable})
        saved_modules = sorted({d["name"].rsplit(".", 1)[0] for d in dropped if d["saved"]})
        config = _adapter_config(rows, saved_modules, base_name or base_ckpt.path)
        _write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS), spill, header)
        os.remove(spill)
        with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as cf:
            json.dump(config, cf, indent=2, sort_keys=True)
            cf.write("\n")
    return _report(os.path.abspath(out), choice, rows, dropped, config)


def _write_factors(f, header: dict, job: TensorJob, choice: ExtractRank, dtype: DType) -> dict:
    """Append the job's lora_A / lora_B to the spill file, at the rank the choice keeps."""
    state = job.state
    us, vt = state["_us"], state["vt"]
    total = float(state.get("_energy", 0.0))
    sigma2 = np.einsum("ij,ij->j", us.astype(np.float64), us.astype(np.float64))
    cum = np.cumsum(sigma2)
    rank = us.shape[1]
    if choice.energy is not None and total > 0:
        reached = np.flatnonzero(cum >= choice.energy * total)
        rank = int(reached[0]) + 1 if reached.size else rank
    kept = float(cum[rank - 1]) if rank else 0.0
    module = job.name[: -len(".weight")]
    _append(f, header, f"{PREFIX}{module}.lora_A.weight", from_float32(np.ascontiguousarray(vt[:rank]), dtype), dtype)
    _append(f, header, f"{PREFIX}{module}.lora_B.weight", from_float32(np.ascontiguousarray(us[:, :rank]), dtype),
            dtype)
    return {"name": job.name, "module": module, "shape": list(job.shape), "rank": rank,
            "sketch_rank": int(us.shape[1]), "energy": total, "kept": min(kept, total) if total else 0.0,
            "fraction": min(1.0, kept / total) if total > 0 else 1.0,
            "reached": choice.energy is None or total == 0 or kept >= choice.energy * total}


def _append(f, header: dict, name: str, bits: np.ndarray, dtype: DType) -> None:
    start = f.tell()
    f.write(np.ascontiguousarray(bits).tobytes())
    header[name] = {"dtype": dtype.name, "shape": list(bits.shape), "data_offsets": [start, f.tell()]}


def _copy_tensor(f, header: dict, plan: TensorPlan, chunk_bytes: int) -> None:
    """A modules_to_save tensor, copied from the fine-tune chunk by chunk."""
    start = f.tell()
    step = max(1, min(chunk_bytes, _COPY) // plan.ft.dtype.itemsize)
    for s in range(0, plan.ft.numel, step):
        f.write(read_tensor(plan.ft, s, min(plan.ft.numel, s + step)).tobytes())
    header[f"{PREFIX}{plan.name}"] = {"dtype": plan.ft.dtype.name, "shape": list(plan.ft.shape),
                                      "data_offsets": [start, f.tell()]}


def _write_safetensors(path: str, data: str, header: dict) -> None:
    """header + the spill file's bytes (the header padded with spaces to 8 bytes, as safetensors writes)."""
    doc = {"__metadata__": {"format": "pt"}, **header}
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as out, open(data, "rb") as src:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        while True:
            block = src.read(_COPY)
            if not block:
                break
            out.write(block)


def _adapter_config(rows: list[dict], saved: list[str], base_name: str) -> dict:
    """PEFT's LoraConfig: the most common rank as r (alpha = r: scale 1), others in the patterns;
    target_modules by their last name (as PEFT and serving engines match them)."""
    ranks = [r["rank"] for r in rows]
    r = max(set(ranks), key=lambda x: (ranks.count(x), x)) if ranks else 1
    pattern = {row["module"]: row["rank"] for row in rows if row["rank"] != r}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": r,
            "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted({row["module"].rsplit(".", 1)[-1] for row in rows}),
            "modules_to_save": saved or None, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "revision": None, "layers_to_transform": None, "layers_pattern": None}


def _report(out: str, choice: ExtractRank, rows: list[dict], dropped: list[dict], config: dict) -> dict:
    lora_energy = sum(r["energy"] for r in rows)
    lora_kept = sum(r["kept"] for r in rows)
    other = sum(d["energy"] for d in dropped)
    saved = sum(d["energy"] for d in dropped if d["saved"])
    total = lora_energy + other
    return {"adapter": out, "choice": choice.describe(), "r": config["r"], "rank_pattern": config["rank_pattern"],
            "target_modules": config["target_modules"], "modules_to_save": config["modules_to_save"],
            "tensors": rows, "not_expressed": dropped,
            "lora_energy": lora_energy, "lora_kept": lora_kept,
            "lora_fraction": lora_kept / lora_energy if lora_energy > 0 else 1.0,
            "other_energy": other, "total_fraction": (lora_kept + saved) / total if total > 0 else 1.0,
            "missed": [r["name"] for r in rows if not r["reached"]]}


def format_report(report: dict, verbose: bool = False) -> str:
    """What ``extract-lora`` prints: per tensor (with --verbose, else the lowest few), then totals."""
    lines = []
    rows = report["tensors"] if verbose else sorted(report["tensors"], key=lambda r: r["fraction"])[:5]
    if rows:
        lines.append("tensor" + " " * 50 + "rank  energy kept" if verbose else "lowest energy kept:")
    for r in rows:
        lines.append(f"  {escape(r['name']):<54} {r['rank']:>4}  {r['fraction']:.4f}")
    for d in report["not_expressed"]:
        what = "saved in modules_to_save" if d["saved"] else (
            "not saved (pass --modules-to-save)" if d["saveable"] else "not saved (LoRA cannot hold it)")
        lines.append(f"  {escape(d['name'])}: changed, not a linear weight (delta energy {d['energy']:.4g}): {what}")
    if report["missed"]:
        lines.append(f"  {len(report['missed'])} matrices keep less energy than asked within their sketch's rank "
                     f"(raise --rank or --rank-fraction): {escape(report['missed'][0])}...")
    ranks = sorted({r["rank"] for r in report["tensors"]})
    span = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}..{ranks[-1]}" if ranks else "no matrices"
    lines.append(f"{len(report['tensors'])} matrices at {span}: {report['lora_fraction']:.4f} of their delta energy "
                 f"kept; {report['total_fraction']:.4f} of the whole delta's")
    return "\n".join(lines)

