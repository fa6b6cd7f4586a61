"""VariantBank: one base model on a device, many fine-tunes kept as compressed deltas, mixed batches.

    bank = VariantBank.from_pretrained("base/", device="auto")
    bank.add("math", "math.dsz")                       # the base is checked; the delta stays compact
    bank.add("code", "code.dsz")
    logits = bank.logits(ids, ["math", "code", None])   # row i runs variants[i] (None: the base)
    out = bank.generate(ids, ["math", "code", None], attention_mask=mask, max_new_tokens=32)
    with bank.use("math"):                               # plain model(...) calls are the variant
        bank.model(ids)

**Mixed batches.** Every module whose parameters some variant changes gets a forward hook (the
model's modules, parameter names and state dict are untouched). The module computes its base
output once for the whole batch; the hook then adds, for each variant present in the batch, that
variant's delta for its rows only (rows grouped by variant): a linear layer ``x @ delta^T`` (+ a
bias delta) from the compact form, an embedding the delta's rows of the token ids, and any other
module (norms) is rerun on its rows with ``base + delta`` parameters. Which row runs which
variant is the bank's route, set by ``logits``/``generate`` around the call (``generate``'s
``num_return_sequences`` copies of a row keep its variant).

**Switching.** ``use(name)`` swaps working copies into the changed parameters: each is a new
tensor ``round(f32(base) + delta)`` (BitDelta's are apply's bits exactly: the same arithmetic,
one fused numba pass), and on exit the base's own tensors are put back, so the base bits are
restored exactly (nothing is ever subtracted). The copies cost one model's worth of the changed
tensors while in use. Mixing is for batches of several variants; switching is for many calls to
one variant (no per-call delta products).

**Threads.** One caller at a time: a lock serializes add, remove, use, logits and generate (the
server calls them from its one worker thread); ``logits``/``generate`` inside ``use`` are refused.
On the CPU with N >= 2 torch threads (``bank.overlap``, on by default), a mixed batch runs each
linear's delta products on the bank's own thread while torch computes the base product with N - 1
threads, and the calling thread joins in on what is left (layers.DeltaJob): torch's thread count
is N - 1 for the duration of the call. Sequentially, torch's OpenMP workers spin after each
product and slow the numba kernels that follow on the same cores.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..causal_lm import load_causal_lm
from ..checkpoint import Checkpoint, open_checkpoint
from ..dtypes import to_float32
from ..errors import ArtifactError, DeltastreamError, MismatchError, ParameterError, escape, show, tensor_context
from ..methods.base import ChunkContext
from ..sources import ArtifactSource, is_artifact, open_model, read_pair_base
from .layers import DeltaJob, DeviceDelta, SignLists, SignOnDevice, is_zero, to_device, working_copies

__all__ = ["VariantBank", "UnknownVariantError"]


class UnknownVariantError(DeltastreamError, KeyError):
    """A variant name the bank does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _Chunks:
    """An artifact tensor read chunk by chunk, as Method.serving_form reads it."""

    def __init__(self, source: ArtifactSource):
        self.source = source

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.entry.shape

    def ranges(self) -> list[tuple[int, int]]:
        return self.source.chunks()

    def context(self, index: int) -> ChunkContext:
        return self.source.context(index)

    def stored(self, index: int) -> dict[str, np.ndarray]:
        return self.source.stored(index)

    def delta(self, index: int) -> np.ndarray:
        s, e = self.source, self.source.entry
        start, stop = self.source.chunks()[index]
        out = to_float32(s.decode_chunk(index), e.dtype)
        base = read_pair_base(s.base, e.base_numel, start, stop, e.dtype)
        out -= to_float32(base, e.dtype)
        return out


class _Route:
    """Row -> variant for the forward in flight: the groups of rows each variant present runs."""

    def __init__(self, variants: Sequence[str | None], device: torch.device):
        self.variants = list(variants)
        self.device = device
        self._groups: dict[int, list[tuple[str, torch.Tensor | None]]] = {}
        self._lists: dict[tuple[int, ...], SignLists] = {}
        self._tokens: dict[tuple[int, int], list[torch.Tensor | None]] = {}
        #: the thread the linears' delta products run on beside the base product (None: after it)
        self.delta_thread: ThreadPoolExecutor | None = None
        #: a linear -> its groups' deltas and the job the pre-hook started on them
        self.pending: dict[torch.nn.Module, tuple[list, DeltaJob]] = {}

    def sign_lists(self, deltas: Sequence[SignOnDevice]) -> SignLists:
        """The kernel's typed lists of these deltas, built once for the whole call (every step of
        a generate runs the same variants through each layer)."""
        key = tuple(id(d) for d in deltas)
        got = self._lists.get(key)
        if got is None:
            got = self._lists[key] = SignLists(deltas)
        return got

    def tokens(self, batch: int, per_row: int) -> list[torch.Tensor | None]:
        """Per group of groups(batch), the flat token indices of its rows in a [batch * per_row, ...]
        input (None: every token)."""
        got = self._tokens.get((batch, per_row))
        if got is None:
            steps = torch.arange(per_row, device=self.device)
            got = [None if rows is None else (rows[:, None] * per_row + steps).reshape(-1)
                   for _, rows in self.groups(batch)]
            self._tokens[batch, per_row] = got
        return got

    def groups(self, batch: int) -> list[tuple[str, torch.Tensor | None]]:
        """(variant, its rows; None: every row) for a batch of ``batch`` rows: the route's rows,
        each repeated batch / len(variants) times (generate's num_return_sequences, beams)."""
        got = self._groups.get(batch)
        if got is not None:
            return got
        n = len(self.variants)
        if batch % n:
            raise ParameterError(f"a patched module saw a batch of {batch} rows for {n} routed rows")
        rows = [v for v in self.variants for _ in range(batch // n)]
        names = list(dict.fromkeys(v for v in rows if v is not None))
        if len(names) == 1 and all(v == names[0] for v in rows):
            got = [(names[0], None)]
        else:
            got = [(name, torch.tensor([i for i, v in enumerate(rows) if v == name], device=self.device))
                   for name in names]
        self._groups[batch] = got
        return got


def _linear_job(x: torch.Tensor, served: list, route: _Route) -> DeltaJob | None:
    """The weight deltas' products of a linear layer for every group of the batch (None: no
    group changes the weight, only biases)."""
    parts = [(tokens, deltas["weight"]) for tokens, deltas in served if "weight" in deltas]
    if not parts:
        return None
    return DeltaJob(x.reshape(-1, x.shape[-1]), parts, route.sign_lists, split=route.delta_thread is None)


def _run_in_inference(job: DeltaJob) -> None:
    with torch.inference_mode():  # grad mode is per thread
        job.run()


class _Variant:
    def __init__(self, name: str, artifact: str, deltas: dict[str, DeviceDelta]):
        self.name = name
        self.artifact = artifact
        self.deltas = deltas  # the model's parameter name (first of its tied names) -> delta

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.deltas.values())


class VariantBank:
    """A base causal LM and named variants of it, served from their compressed deltas."""

    @classmethod
    def from_pretrained(cls, base_dir: str, device: str = "auto",
                        dtype: str | torch.dtype | None = None) -> VariantBank:
        """Load ``base_dir`` once as a transformers causal LM (eval mode) on ``device`` (auto: CUDA
        when present) in ``dtype`` (None or "auto": the checkpoint's), with its tokenizer if any."""
        from ..device import resolve_device

        try:
            import transformers
            from transformers import AutoTokenizer
        except ImportError:
            raise ParameterError("the variant bank needs transformers: pip install 'deltastream[serve]'") from None
        where = os.path.abspath(base_dir)
        dev = resolve_device(device)
        if dtype is None or dtype == "auto":
            torch_dtype: Any = "auto"
        elif isinstance(dtype, torch.dtype):
            torch_dtype = dtype
        elif dtype in ("float32", "bfloat16", "float16"):
            torch_dtype = getattr(torch, dtype)
        else:
            raise ParameterError(f"dtype must be auto, float32, bfloat16 or float16, not {show(dtype)}")
        transformers.utils.logging.disable_progress_bar()
        model = load_causal_lm(where, torch_dtype, ParameterError)
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
        except Exception:  # no tokenizer files: logits and generate on token ids still work
            tokenizer = None
        return cls(model.eval().to(dev if dev != "torch:cpu" else "cpu"), tokenizer, base_dir=where)

    def __init__(self, model: Any, tokenizer: Any = None, base_dir: str | None = None):
        """Wrap a model already loaded; ``base_dir`` is the checkpoint it was loaded from (the
        artifacts' base; default: the model's ``name_or_path``)."""
        self.model = model
        self.tokenizer = tokenizer
        self.base_dir = base_dir or getattr(model, "name_or_path", None) or None
        self._checkpoint: Checkpoint | None = None
        self._variants: dict[str, _Variant] = {}
        self._route: _Route | None = None
        self._using: str | None = None
        self._lock = threading.RLock()
        named = dict(model.named_parameters(remove_duplicate=False))
        self._params = named
        canonical: dict[int, str] = {}
        for name, p in named.items():
            canonical.setdefault(id(p), name)
        self._canonical = {name: canonical[id(p)] for name, p in named.items()}  # a tied name -> the first
        self._owners: dict[str, list[tuple[torch.nn.Module, str]]] = {}
        self._module_params: dict[torch.nn.Module, dict[str, str]] = {}  # module -> its parameter -> canonical
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                self._owners.setdefault(canonical[id(p)], []).append((module, pname))
                self._module_params.setdefault(module, {})[pname] = canonical[id(p)]
        self._rerunning = False
        self._hooked: dict[torch.nn.Module, list[Any]] = {}
        self._delta_thread: ThreadPoolExecutor | None = None
        #: on the CPU with 2+ torch threads, run each linear's delta products on a thread of their
        #: own while torch computes the base product with the other threads (False: one after the other)
        self.overlap = True

    # --- what the bank holds -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def names(self) -> list[str]:
        return list(self._variants)

    def memory(self) -> dict[str, int]:
        """Bytes on the device: ``base`` (the model's parameters and buffers, tied ones once), and
        each variant's compact deltas."""
        seen: set[int] = set()
        base = 0
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                base += t.numel() * t.element_size()
        return {"base": base, **{name: v.nbytes for name, v in self._variants.items()}}

    def _variant(self, name: str) -> _Variant:
        v = self._variants.get(name) if isinstance(name, str) else None
        if v is None:
            known = ", ".join(self._variants) or "none"
            raise UnknownVariantError(f"unknown variant {show(name)} (the bank holds: {escape(known)})")
        return v

    # --- adding and removing ------------------------------------------------------------------
    def add(self, name: str, artifact: str) -> None:
        """Load the artifact ``artifact`` as variant ``name``, tensor by tensor, in its compact
        form on the model's device; a wrong base is refused (WrongBaseError) before anything loads.
        ``artifact`` may also be a PEFT LoRA adapter folder: its factors are kept (serve/lowrank.py)."""
        if not isinstance(name, str) or not name or len(name) > 200 or escape(name) != name:
            raise ParameterError(f"a variant name must be 1 to 200 printable characters, not {show(name)}")
        from ..sources import is_adapter

        path = os.path.abspath(os.fspath(artifact))
        adapter = is_adapter(path)
        if not adapter and not is_artifact(path):
            raise ArtifactError(f"{tensor_context(path)}: not a deltastream artifact nor a PEFT LoRA adapter folder")
        with self._lock:
            if name in self._variants:
                raise ParameterError(f"variant {show(name)} is already in the bank (remove it first)")
            if self._using is not None:
                raise ParameterError(f"cannot add a variant inside use({show(self._using)})")
            deltas = self._load_adapter(path) if adapter else self._load(path)
            self._variants[name] = _Variant(name, path, deltas)
            for pname in deltas:
                for module, _ in self._owners[pname]:
                    if module not in self._hooked:
                        self._hooked[module] = [module.register_forward_hook(self._hook, with_kwargs=True)]
                        if self._plain_linear(module):
                            self._hooked[module].append(
                                module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def _base_checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            if not self.base_dir or not os.path.isdir(self.base_dir):
                raise ParameterError("the bank needs the base checkpoint the model was loaded from to add a variant: "
                                     "VariantBank(model, base_dir=...)")
            self._checkpoint = open_checkpoint(self.base_dir)
        return self._checkpoint

    def _load_adapter(self, path: str) -> dict[str, DeviceDelta]:
        """A PEFT LoRA adapter over the base checkpoint: low-rank factors, dense modules_to_save."""
        from .lowrank import adapter_deltas

        return adapter_deltas(path, self._base_checkpoint(), self._params, self._canonical)

    def _load(self, path: str) -> dict[str, DeviceDelta]:
        opened = open_model(path, self._base_checkpoint())  # checks the base (WrongBaseError, one line)
        deltas: dict[str, DeviceDelta] = {}
        for tname, source in opened.tensors.items():
            assert isinstance(source, ArtifactSource)
            param = self._params.get(tname)
            if param is None:
                raise MismatchError(f"{tensor_context(path, tname)}: the model has no such parameter")
            if source.entry.base is None or tuple(param.shape) != source.entry.shape:
                raise MismatchError(f"{tensor_context(path, tname)}: shape {list(source.entry.shape)} is not the "
                                    f"model's {list(param.shape)} (a new or grown tensor cannot be served as a delta)")
            canonical = self._canonical[tname]
            if canonical in deltas:  # a tied twin stored twice: one delta serves both
                continue
            form = source.method.serving_form(_Chunks(source))
            if not is_zero(form):
                deltas[canonical] = to_device(form, param.device, param.dtype)
        return deltas

    def remove(self, name: str) -> None:
        with self._lock:
            self._variant(name)
            if self._using == name:
                raise ParameterError(f"cannot remove variant {show(name)} while it is in use()")
            del self._variants[name]
            wanted = {m for v in self._variants.values() for p in v.deltas for m, _ in self._owners[p]}
            for module in [m for m in self._hooked if m not in wanted]:
                for handle in self._hooked.pop(module):
                    handle.remove()

    # --- running ------------------------------------------------------------------------------
    @staticmethod
    def _plain_linear(module: torch.nn.Module) -> bool:
        return isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """With overlap on (see _routed): start the linear's delta products on the bank's thread
        while torch computes the base product on this one."""
        route = self._route
        if route is None or route.delta_thread is None or self._rerunning:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        served = self._linear_parts(module, x, route)
        job = _linear_job(x, served, route) if served else None
        if job is not None:
            route.pending[module] = (served, job)
            route.delta_thread.submit(_run_in_inference, job)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        route = self._route
        if route is None or self._rerunning:  # a module rerun on its rows: its own output as it is
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if self._plain_linear(module):
            return self._add_linear(module, x, output, route)
        for name, rows in route.groups(x.shape[0]):
            deltas = self._module_deltas(module, name)
            if deltas:
                output = self._add_variant(module, deltas, rows, args, kwargs, x, output)
        return output

    def _add_linear(self, module, x, output, route: _Route):
        """The linear's output plus every group's weight delta (the job the pre-hook started, this
        thread joining in; or one made here) and bias delta."""
        pending = route.pending.pop(module, None)
        job: DeltaJob | None
        if pending is not None:
            served, job = pending
        else:
            served = self._linear_parts(module, x, route)
            if not served:
                return output
            job = _linear_job(x, served, route)
        if job is not None:
            job.run()
            delta = job.result()
        else:
            delta = torch.zeros(x.numel() // x.shape[-1], module.out_features, dtype=torch.float32, device=x.device)
        for tokens, deltas in served:
            if "bias" in deltas:
                bias = deltas["bias"].dense().reshape(-1)
                if tokens is None:
                    delta += bias
                else:
                    delta[tokens] += bias
        output += delta.reshape(output.shape).to(output.dtype)
        return output

    def _linear_parts(self, module, x, route: _Route) -> list[tuple[torch.Tensor | None, dict[str, DeviceDelta]]]:
        """(the flat tokens of a group's rows, its variant's deltas of this linear) for each group
        whose variant changes it."""
        batch = x.shape[0]
        per_row = x.numel() // x.shape[-1] // batch
        return [(tokens, deltas) for (name, _), tokens in zip(route.groups(batch), route.tokens(batch, per_row))
                if (deltas := self._module_deltas(module, name))]

    def _module_deltas(self, module: torch.nn.Module, name: str) -> dict[str, DeviceDelta]:
        variant = self._variants[name].deltas
        return {pname: variant[c] for pname, c in self._module_params[module].items() if c in variant}

    def _add_variant(self, module, deltas, rows, args, kwargs, x, output):
        xs = x if rows is None else x.index_select(0, rows)
        if type(module) is torch.nn.Embedding and set(deltas) == {"weight"}:
            part = deltas["weight"].take(xs.reshape(-1)).reshape(*xs.shape, -1).to(output.dtype)
        else:  # any other module (norms): rerun on its rows with base + delta parameters
            params = {p: getattr(module, p) + d.dense().to(getattr(module, p).dtype) for p, d in deltas.items()}
            b = x.shape[0]
            sub = lambda a: a.index_select(0, rows) if rows is not None and torch.is_tensor(a) and a.dim() \
                and a.shape[0] == b else a  # noqa: E731
            self._rerunning = True
            try:
                redone = torch.func.functional_call(module, params, tuple(sub(a) for a in args),
                                                    {k: sub(v) for k, v in kwargs.items()})
            finally:
                self._rerunning = False
            if rows is None:
                return redone
            output = output.clone()
            output[rows] = redone
            return output
        if rows is None:
            output += part
        elif rows.numel() <= 64:  # row by row: index_add_ on CPU bf16 ran slower than the whole layer
            for k, i in enumerate(rows.tolist()):
                output[i] += part[k]
        else:
            output.index_add_(0, rows, part)
        return output

    @contextlib.contextmanager
    def _routed(self, variants: Sequence[str | None], batch: int) -> Iterator[None]:
        variants = list(variants)
        if len(variants) != batch:
            raise ParameterError(f"{len(variants)} variants for a batch of {batch} rows (one per row)")
        for v in variants:
            if v is not None:
                self._variant(v)
        if self._using is not None:
            raise ParameterError(f"logits and generate run mixed batches: not inside use({show(self._using)})")
        route = _Route(variants, self.device) if any(v is not None for v in variants) else None
        threads = torch.get_num_threads()
        overlap = route is not None and self.device.type == "cpu" and threads >= 2 and self.overlap
        if route is not None and overlap:
            if self._delta_thread is None:
                self._delta_thread = ThreadPoolExecutor(1, thread_name_prefix="deltastream-bank-delta")
            route.delta_thread = self._delta_thread
            torch.set_num_threads(threads - 1)  # the delta thread has the core torch leaves
        self._route = route
        try:
            yield
        finally:
            if overlap:
                torch.set_num_threads(threads)
            self._route = None

    def logits(self, input_ids: torch.Tensor, variants: Sequence[str | None],
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The logits [batch, seq, vocab] of a batch whose row i runs ``variants[i]`` (None: the base)."""
        with self._lock, self._routed(variants, int(input_ids.shape[0])), torch.inference_mode():
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def generate(self, input_ids: torch.Tensor, variants: Sequence[str | None], **generate_kwargs: Any) -> Any:
        """``model.generate`` (any of its keywords: attention_mask for left-padded batches,
        do_sample, temperature, top_p, max_new_tokens...) with row i running ``variants[i]``."""
        with self._lock, self._routed(variants, int(input_ids.shape[0])), torch.inference_mode():
            return self.model.generate(input_ids=input_ids, **generate_kwargs)

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[Any]:
        """Within the block, plain ``bank.model(...)`` calls are variant ``name`` (None: the base):
        working copies of the changed tensors are swapped in and the base's own put back on exit."""
        with self._lock:
            if self._using is not None:
                raise ParameterError(f"use({show(name)}) inside use({show(self._using)})")
            if name is None:
                yield self.model
                return
            variant = self._variant(name)
            saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
            try:
                with torch.no_grad():
                    params = [self._params[pname] for pname in variant.deltas]
                    copies = working_copies([p.data for p in params])
                    for param, delta, copy in zip(params, variant.deltas.values(), copies):
                        saved.append((param, param.data))
                        param.data = delta.add_to(param.data, copy)
                self._using = name
                yield self.model
            finally:
                for param, data in saved:
                    param.data = data
                self._using = None
