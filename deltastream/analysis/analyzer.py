"""The Riemann-sum approximation of the loss change an edit causes (METHODS.md Part B 1.2-1.3):

    term = (1/C) sum_{c=0}^{C-1} < grad L(W_POST + (c/C) dW~), dW~ >,    dW~ = W_EDIT - W_POST

over every parameter the edit changes, next to the measured change L(W_EDIT) - L(W_POST), on the
same batches (analysis/data.py). An Analyzer loads the fine-tune once and analyses any number of
edits; the edit of ``run(method=...)`` is made by ``edit`` itself (the same bits), into a scratch
folder, and both checkpoints are then streamed (analysis/weights.py).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..checkpoint import CheckpointWriter, OutputTensor, open_checkpoint
from ..errors import ParameterError, tensor_context
from ..methods import METHODS, Method
from .data import Windows, load_tokenizer, make_windows
from .errors import AnalysisError, require_transformers
from .model import DTYPES, causal_lm_objective, load_model, parameters_by_name
from .weights import CHUNK_ELEMS, EditedTensor, changed_tensors, float_values, layer_of

__all__ = ["Analyzer", "Analysis", "Objective"]

GRADIENT_DIR = "gradient"

#: (model, ids [batch, seq_len]) -> the summed loss over the batch's predicted positions (a 0-d tensor)
Objective = Callable[[Any, Any], Any]




@dataclass
class Analysis:
    """One edit's figures: the term, its per-step and per-tensor parts, and the measured change."""

    term: float
    first_order: float
    loss_post: float
    loss_edit: float
    steps: int
    tokens: int
    predicted: int
    per_step: list[float]
    tensors: dict[str, float]
    layers: dict[str, float]
    outside_layers: float
    edit_norm: float  # ||dW~||_2 over every changed tensor: how far the edit moves the model
    changed: int
    dtype: str
    method: dict | None = None
    seed: int | None = None
    edited: str | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def delta_loss(self) -> float:
        return self.loss_edit - self.loss_post

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        out["delta_loss"] = self.delta_loss
        return out


def _dot(grad, tensor: EditedTensor) -> float:
    """< grad, dW~ > of one tensor, the products summed in float64, chunk by chunk."""
    flat = grad.detach().reshape(-1)
    return math.fsum(float(np.dot(flat[start:stop].double().cpu().numpy(), tensor.change(start, stop)))
                     for start, stop in tensor.chunks())


def _freeing(take: Callable[[Any], None]) -> Callable[[Any], None]:
    def hook(param) -> None:
        take(param.grad)
        param.grad = None

    return hook


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be a positive integer, not {value!r}")
    return value


class Analyzer:
    """The fine-tune in memory (float32 or bfloat16), its evaluation windows, and a scratch folder
    for edits and the gradient at W_POST. Use as a context manager, or call ``close()``."""

    def __init__(self, base: str, fine_tune: str, data: str, *, steps: int = 5, max_tokens: int = 4096,
                 seq_len: int = 256, batch_size: int = 4, dtype: str = "float32", device: str = "cpu",
                 progress: bool = False, work_dir: str | None = None, recompute: bool = True):
        require_transformers()
        from ..device import resolve_device

        if dtype not in DTYPES:
            raise ParameterError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        device = resolve_device(device)
        device = "cpu" if device == "torch:cpu" else device
        open_checkpoint(base), open_checkpoint(fine_tune)  # a bad checkpoint: its own error, before the model
        windows = make_windows(load_tokenizer(base), data, _positive("--max-tokens", max_tokens),
                               _positive("--seq-len", seq_len))
        model = load_model(fine_tune, dtype, device)
        self._setup(base, fine_tune, model, windows, causal_lm_objective(model, recompute), steps=steps,
                    batch_size=batch_size, dtype=dtype, device=device, progress=progress, work_dir=work_dir)

    @classmethod
    def with_model(cls, base: str, fine_tune: str, model, windows: Windows, objective: Objective, *,
                   steps: int = 5, batch_size: int = 4, work_dir: str | None = None) -> Analyzer:
        """An Analyzer of any torch module holding the fine-tune's weights (named as in its
        checkpoint) and any objective: ``objective(model, ids)`` is the *sum* of the loss over
        the batch's predicted positions. The tests' closed-form losses come in this way."""
        self = cls.__new__(cls)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self._setup(base, fine_tune, model, windows, objective, steps=steps, batch_size=batch_size, dtype=dtype,
                    device="cpu", progress=False, work_dir=work_dir)
        return self

    def _setup(self, base, fine_tune, model, windows, objective, *, steps, batch_size, dtype, device, progress,
               work_dir) -> None:
        self.steps = _positive("--steps", steps)
        self.batch_size = _positive("--batch-size", batch_size)
        self.base, self.fine_tune, self.dtype, self.device, self.progress = base, fine_tune, dtype, device, progress
        self.post = open_checkpoint(fine_tune)
        self.windows, self.model, self.objective = windows, model, objective
        self.params = parameters_by_name(model, self.post)
        self.work = tempfile.mkdtemp(prefix="deltastream-analyze-", dir=work_dir)
        self._loss_post: float | None = None
        self._gradient: str | None = None
        self._runs = 0

    # --- the public API -------------------------------------------------------------------------
    def run(self, method: str | Method | None = None, params: dict[str, Any] | None = None, *, seed: int = 0,
            edited: str | None = None, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
            keep_edited: str | None = None) -> Analysis:
        """Analyse ``edited`` (a checkpoint of the fine-tune's architecture), or the edit ``method``
        makes (``edit``'s own code, seed and include/exclude rules; kept in ``keep_edited``)."""
        started = time.perf_counter()
        if (method is None) == (edited is None):
            raise ParameterError("analyze: give either a method or an edited checkpoint (--edited), not both")
        config = None
        if method is not None:
            m = self._method(method, dict(params or {}))
            config = m.get_config()
            edited = self._edit(m, seed, include, exclude, keep_edited)
        elif params:
            raise ParameterError("analyze: method parameters given without a method")
        assert edited is not None
        try:
            result = self._analyze(changed_tensors(self.post, open_checkpoint(edited)))
        finally:
            if method is not None and keep_edited is None:
                shutil.rmtree(edited, ignore_errors=True)
        result.method, result.seed = config, (seed if method is not None else None)
        result.edited = os.path.abspath(edited) if method is None or keep_edited else None
        result.seconds = time.perf_counter() - started
        return result

    def gradient(self) -> str:
        """The checkpoint of grad L(W_POST) (float32, the fine-tune's tensor names), computed once:
        the first-order term of every later run reads it instead of a forward/backward pass."""
        if self._gradient is None:
            for p in self.model.parameters():
                p.requires_grad_(p.is_floating_point())
            try:
                self._gradient = self._accumulate_gradient(os.path.join(self.work, GRADIENT_DIR))
            finally:
                for p in self.model.parameters():
                    p.requires_grad_(False)
        return self._gradient

    def save_gradient(self, out: str) -> str:
        """Write grad L(W_POST) as the checkpoint folder ``out`` (for ``edit --method biased -p by=grad``)."""
        if os.path.lexists(out):
            raise ParameterError(f"{tensor_context(out)}: exists; the gradient is not written over anything")
        partial = f"{out}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(self.gradient(), partial)
        os.replace(partial, out)
        return os.path.abspath(out)

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> Analyzer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the edit -------------------------------------------------------------------------------
    def _method(self, method: str | Method, params: dict[str, Any]) -> Method:
        from ..api import resolve_method

        if isinstance(method, str) and method in METHODS and METHODS[method].wants_gradient(params):
            params["gradient"] = self.gradient()
        return resolve_method(method, params, "analyze")

    def _edit(self, method: Method, seed: int, include, exclude, keep_edited: str | None) -> str:
        from ..api import edit

        if not method.lossy:
            raise ParameterError(f"analyze: method '{method.method_id}' changes nothing (a lossless edit)")
        self._runs += 1
        out = keep_edited or os.path.join(self.work, f"edit-{self._runs}")
        return edit(self.base, self.fine_tune, out, method, seed=seed, include=include, exclude=exclude,
                    overwrite=keep_edited is None, progress=False)

    # --- the passes -----------------------------------------------------------------------------
    def _analyze(self, changed: list[EditedTensor]) -> Analysis:
        from tqdm import tqdm

        unknown = [t.name for t in changed if t.name not in self.params]
        if unknown:
            raise AnalysisError(f"{tensor_context(self.fine_tune, unknown[0])}: the edit changes this tensor, "
                                "which is not a parameter of the model transformers built")
        if not changed:  # nothing to differentiate: the term is 0 and the loss is W_POST's
            if self._loss_post is None:
                self._loss_post = self._pass(None)
            return self._result(changed, [{} for _ in range(self.steps)], self._loss_post)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for t in changed:
            self.params[t.name].requires_grad_(True)
        cached = self._gradient is not None
        bar = tqdm(total=self.steps + 1 - cached, desc="analyze", unit="pass", disable=not self.progress,
                   leave=False)
        per_step: list[dict[str, float]] = []
        try:
            for c in range(self.steps):
                if c == 0 and cached:
                    per_step.append(self._dots_with_file(changed))
                    continue
                self._set(changed, c / self.steps)
                dots = dict.fromkeys((t.name for t in changed), 0.0)
                loss = self._pass(self._product_sinks(changed, dots))
                if c == 0:
                    self._loss_post = loss
                per_step.append(dots)
                bar.update()
            self._set(changed, 1.0)
            loss_edit = self._pass(None)
            bar.update()
        finally:
            self._set(changed, 0.0)  # back to W_POST, bit for bit, for the next run
            self._zero_grad()
            bar.close()
        return self._result(changed, per_step, float(loss_edit))

    def _result(self, changed: list[EditedTensor], per_step: list[dict[str, float]], loss_edit: float) -> Analysis:
        C = self.steps
        tensors = {t.name: math.fsum(step[t.name] for step in per_step) / C for t in changed}
        layers: dict[int, list[float]] = {}
        outside: list[float] = []
        for name, value in tensors.items():
            layer = layer_of(name)
            (layers.setdefault(layer, []) if layer is not None else outside).append(value)
        totals = [math.fsum(step.values()) for step in per_step]
        assert self._loss_post is not None
        return Analysis(term=math.fsum(totals) / C, first_order=totals[0], loss_post=self._loss_post,
                        loss_edit=loss_edit, steps=C, tokens=self.windows.tokens, predicted=self.windows.predicted,
                        per_step=totals, tensors=tensors,
                        layers={str(k): math.fsum(v) for k, v in sorted(layers.items())},
                        outside_layers=math.fsum(outside), edit_norm=math.sqrt(math.fsum(t.norm2 for t in changed)),
                        changed=len(changed), dtype=self.dtype)

    def _set(self, changed: list[EditedTensor], t: float) -> None:
        """Every changed parameter := W_POST + t dW~, streamed a chunk at a time."""
        import torch

        with torch.no_grad():
            for tensor in changed:
                flat = self.params[tensor.name].data.view(-1)
                for start, stop in tensor.chunks():
                    flat[start:stop].copy_(torch.from_numpy(tensor.at(t, start, stop)))

    def _pass(self, sinks: list[tuple[Any, Callable[[Any], None]]] | None) -> float:
        """The loss over every window; with ``sinks`` (parameter, take(grad)), also backward, each
        batch's gradient of a parameter handed to its sink the moment backward has it and then
        freed: the gradients of the whole model are never held at once (the peak is the model
        plus the gradients backward has in flight)."""
        import torch

        n = self.windows.predicted
        total = 0.0
        self._zero_grad()
        hooks = [param.register_post_accumulate_grad_hook(_freeing(take)) for param, take in sinks or ()]
        try:
            for batch in self.windows.batches(self.batch_size):
                ids = torch.from_numpy(batch).to(self.device)
                with torch.set_grad_enabled(sinks is not None):
                    loss = self.objective(self.model, ids)
                    if sinks is not None:
                        (loss / n).backward()
                total += float(loss.detach().double())
                del loss
        finally:
            for hook in hooks:
                hook.remove()
            self._zero_grad()
        return total / n

    def _product_sinks(self, changed: list[EditedTensor], dots: dict[str, float]):
        """Sinks adding each batch's < grad, dW~ > (float64) into ``dots``, one per parameter
        object (a tied weight is one parameter under several names)."""
        groups: dict[int, tuple[Any, list[EditedTensor]]] = {}
        for tensor in changed:
            param = self.params[tensor.name]
            groups.setdefault(id(param), (param, []))[1].append(tensor)

        def sink(tensors: list[EditedTensor]) -> Callable[[Any], None]:
            def take(grad) -> None:
                for tensor in tensors:
                    dots[tensor.name] += _dot(grad, tensor)
            return take

        return [(param, sink(tensors)) for param, tensors in groups.values()]

    def _dots_with_file(self, changed: list[EditedTensor]) -> dict[str, float]:
        """The first-order products from the saved gradient at W_POST (no forward/backward)."""
        assert self._gradient is not None
        grads = open_checkpoint(self._gradient).tensors
        return {t.name: math.fsum(float(np.dot(float_values(grads[t.name], start, stop).astype(np.float64),
                                               t.change(start, stop)))
                                  for start, stop in t.chunks()) for t in changed}

    def _zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    def _accumulate_gradient(self, folder: str) -> str:
        """grad L(W_POST) of every float parameter, summed over the batches straight into a
        float32 checkpoint under the parameters' checkpoint names (file pages, not the heap);
        a parameter the loss does not reach stays zero. Sets the loss at W_POST on the way."""
        names = [n for n, p in self.params.items() if p.is_floating_point()]
        os.makedirs(folder)
        metadata = {"deltastream_gradient": "grad L(W_POST)", "tokens": str(self.windows.tokens)}
        writer = CheckpointWriter(folder, [OutputTensor(n, "F32", tuple(self.params[n].shape)) for n in names],
                                  1 << 62, metadata)
        writer.create()  # zeros (a sparse file) until a batch adds to them
        by_param: dict[int, tuple[Any, list[str]]] = {}
        for name in names:
            by_param.setdefault(id(self.params[name]), (self.params[name], []))[1].append(name)

        def sink(names: list[str]) -> Callable[[Any], None]:
            def take(grad) -> None:
                flat = grad.detach().float().reshape(-1).cpu().numpy()
                for name in names:
                    path, offset = writer.location(name)
                    total = np.memmap(path, np.float32, "r+", offset, flat.shape)
                    for start in range(0, flat.size, CHUNK_ELEMS):
                        total[start:start + CHUNK_ELEMS] += flat[start:start + CHUNK_ELEMS]
                    total.flush()
                    del total
            return take

        self._loss_post = self._pass([(param, sink(names)) for param, names in by_param.values()])
        return folder
