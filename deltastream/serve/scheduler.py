"""The batching scheduler behind ``deltastream serve``: a bounded queue of requests and one worker
thread that turns whatever is waiting into mixed batches for the VariantBank.

How a batch is made. The HTTP side calls :meth:`Scheduler.submit` (never blocks: a full queue
raises :class:`QueueFull`, the server's 503). The worker takes the oldest waiting request, then
keeps taking requests, oldest first, until the batch holds ``max_batch`` rows or ``window_s`` has
passed since the first of them arrived (a request that waited while the previous batch ran does
not wait again). The rows -- one per prompt and per ``n`` of every request, each with its own
variant -- are left-padded into one batch and run by one ``bank.generate`` call (the bank adds each
row's delta to the shared base product).

Per-row everything. Rows of one batch may differ in variant, ``max_tokens``, ``temperature``,
``top_p``, ``seed`` and ``stop``: generation runs greedy in transformers' loop (KV cache and all),
and :class:`_RowSampler`, a logits processor, replaces each sampled row's scores by a one-hot of the
token it draws itself (temperature, then top-p, then one draw from that row's own
``torch.Generator``), so the loop's argmax picks exactly that token and a ``seed`` reproduces a
row whatever else shares its batch. :class:`_RowStopper`, a stopping criterion called after every
step, decodes each row's new token, pushes the new text to the request (streaming is token by
token), ends rows at EOS, at a stop string (cut before it; text that could be the start of a stop
string is held back until it cannot) or at ``max_tokens``, and ends the rows of a cancelled
request (a client that went away): a finished row is padded by the loop and the batch ends when
every row has.

The trade: a request arriving while a batch runs waits for it to end (no joining mid-generation),
and the window adds up to ``window_s`` to a lone request's latency; in exchange, concurrent
requests share one pass over the base weights per token, which is where decoding's time goes.
"""

from __future__ import annotations

import concurrent.futures
import copy
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Row", "Job", "Scheduler", "QueueFull", "Event"]

#: what a job's ``emit`` receives: ("text", row, text), ("end", row, finish_reason, completion_tokens),
#: ("error", http_status, message)
Event = tuple


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` waiting requests already."""


@dataclass
class Row:
    """One sequence to generate: a prompt's token ids, the variant (None = the base) and its sampling."""

    prompt_ids: list[int]
    variant: str | None
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Job:
    """One request: its rows, and ``emit``, called from the worker thread with each :data:`Event`
    (the server passes one that hands the event to the request's asyncio queue)."""

    def __init__(self, rows: Sequence[Row], emit: Callable[[Event], None]):
        self.rows = list(rows)
        self.emit = emit
        self.arrived = time.monotonic()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client left: the worker drops the job if it still waits, ends its rows if they run."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _RowState:
    job: Job
    index: int
    row: Row
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # the prompt's last few tokens, then the generated ones
    context: int = 0  # how many of tokens are the prompt's
    text: str = ""
    sent: int = 0  # characters of text already emitted
    prefix_offset: int = 0
    read_offset: int = 0
    done: bool = False


#: prompt tokens a row's detokenization starts from: the first generated word gets its leading space
DECODE_CONTEXT = 5


class _Decoder:
    """Incremental detokenization: the text a new token adds, read in the context of the tokens
    before it, the prompt's included (a word's leading space, a character split over byte tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, st: _RowState) -> None:
        decode = self.tokenizer.decode
        before = decode(st.tokens[st.prefix_offset:st.read_offset], skip_special_tokens=True)
        now = decode(st.tokens[st.prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            st.text += now[len(before):]
            st.prefix_offset, st.read_offset = st.read_offset, len(st.tokens)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop string."""
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


def _make_processors(states: list[_RowState], eos: set[int], decoder: _Decoder):
    from transformers import LogitsProcessor, StoppingCriteria

    class _RowSampler(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            for i, st in enumerate(states):
                if st.done or st.row.temperature == 0:
                    continue
                logits = scores[i].float() / st.row.temperature
                if st.row.top_p < 1:
                    ordered, order = torch.sort(logits, descending=True)
                    cum = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
                    drop = cum - torch.softmax(ordered, dim=-1) >= st.row.top_p  # keep the first token past p
                    logits = logits.clone()
                    logits[order[drop]] = float("-inf")
                probs = torch.softmax(logits, dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=st.generator).item())
                scores[i] = float("-inf")
                scores[i, token] = 0.0
            return scores

    class _RowStopper(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            last = input_ids[:, -1].tolist()
            for i, st in enumerate(states):
                if not st.done:
                    _step(st, int(last[i]), eos, decoder)
            done = torch.tensor([st.done for st in states], dtype=torch.bool, device=input_ids.device)
            return done  # type: ignore[return-value]  # a BoolTensor, as transformers' criteria return

    return _RowSampler(), _RowStopper()


def _finish(st: _RowState, reason: str, upto: int | None = None) -> None:
    end = len(st.text) if upto is None else upto
    if end > st.sent:
        st.job.emit(("text", st.index, st.text[st.sent:end]))
        st.sent = end
    st.done = True
    st.job.emit(("end", st.index, reason, len(st.tokens) - st.context))


def _step(st: _RowState, token: int, eos: set[int], decoder: _Decoder) -> None:
    """One new token of a running row: emit its text, or end the row."""
    if st.job.cancelled:
        st.done = True
        return
    if token in eos:
        _finish(st, "stop")
        return
    st.tokens.append(token)
    decoder(st)
    stops = st.row.stop
    if stops:
        hits = [p for p in (st.text.find(s, max(0, st.sent - len(s) + 1)) for s in stops) if p >= 0]
        if hits:
            _finish(st, "stop", upto=min(hits))
            return
    if len(st.tokens) - st.context >= st.row.max_tokens:
        _finish(st, "length")
        return
    ready = len(st.text) - _held_back(st.text, stops)
    if ready > st.sent:
        st.job.emit(("text", st.index, st.text[st.sent:ready]))
        st.sent = ready


def _greedy_config(pad: int, eos: list[int]):
    """Plain greedy generation, whatever the model's generation_config.json asks (a repetition
    penalty, sampling defaults): the API's parameters are the only ones, and _RowSampler samples."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos or None)


class Scheduler:
    """The queue and its one worker thread; the only code that calls the bank once started.

    ``bank`` needs ``generate(input_ids, variants, **generate_kwargs)``, ``names``, ``device`` and
    ``tokenizer`` (the :class:`~deltastream.serve.VariantBank` interface).
    """

    def __init__(self, bank, *, max_batch: int = 8, window_s: float = 0.010, max_queue: int = 64,
                 pad_token_id: int | None = None, eos_token_ids: Sequence[int] = ()):
        self.bank = bank
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.eos = set(eos_token_ids)
        self.pad_token_id = pad_token_id if pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self._decoder = _Decoder(bank.tokenizer)
        self._generation_config = _greedy_config(self.pad_token_id, sorted(self.eos))
        self._cv = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._control: deque[tuple[Callable[[Any], Any], concurrent.futures.Future]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: counters for tests and benchmarks: batches run, rows run, the largest batch, cancelled jobs
        self.stats = {"batches": 0, "rows": 0, "largest_batch": 0, "cancelled": 0, "rejected": 0}

    # --- the event loop's side: never blocks on the bank ---------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="deltastream-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            for job in self._waiting:
                job.emit(("error", 503, "the server is shutting down"))
            self._waiting.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting): retry later")
            self._waiting.append(job)
            self._cv.notify_all()

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(bank)`` on the worker between batches (adding, removing variants)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            self._control.append((fn, future))
            self._cv.notify_all()
        return future

    def _config(self, max_new_tokens: int):
        config = copy.deepcopy(self._generation_config)
        config.max_new_tokens = max_new_tokens
        return config

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # --- the worker thread --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._waiting or self._control or self._stopping))
                if self._stopping:
                    controls = list(self._control)
                    self._control.clear()
                    for _, future in controls:
                        future.cancel()
                    return
                controls = list(self._control)
                self._control.clear()
            for fn, future in controls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.bank))
                    except BaseException as exc:  # the caller gets it, the worker goes on
                        future.set_exception(exc)
            batch = self._collect()
            if batch:
                self._run(batch)

    def _collect(self) -> list[Job]:
        batch: list[Job] = []
        rows = 0
        with self._cv:
            while True:
                while self._waiting and rows < self.max_batch:
                    job = self._waiting[0]
                    if job.cancelled:
                        self._waiting.popleft()
                        self.stats["cancelled"] += 1
                        continue
                    if batch and rows + len(job.rows) > self.max_batch:
                        return batch  # first come first served: it leads the next batch
                    batch.append(self._waiting.popleft())
                    rows += len(job.rows)
                if not batch or rows >= self.max_batch or self._stopping or self._control:
                    return batch
                left = batch[0].arrived + self.window_s - time.monotonic()
                if left <= 0:
                    return batch
                self._cv.wait(left)

    def _run(self, batch: list[Job]) -> None:
        names = set(self.bank.names)
        states: list[_RowState] = []
        for job in batch:
            gone = [r.variant for r in job.rows if r.variant is not None and r.variant not in names]
            if gone:
                job.emit(("error", 404, f"The model '{gone[0]}' does not exist (it was removed)"))
                continue
            for i, row in enumerate(job.rows):
                gen = None
                if row.temperature > 0:
                    gen = torch.Generator().manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
                context = list(row.prompt_ids[-DECODE_CONTEXT:])
                states.append(_RowState(job, i, row, gen, tokens=context, context=len(context),
                                        read_offset=len(context)))
        if not states:
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(states)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(states))
        width = max(len(st.row.prompt_ids) for st in states)
        ids = torch.full((len(states), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(states), width), dtype=torch.long)
        for i, st in enumerate(states):
            n = len(st.row.prompt_ids)
            ids[i, width - n:] = torch.tensor(st.row.prompt_ids, dtype=torch.long)
            mask[i, width - n:] = 1
        device = self.bank.device
        sampler, stopper = _make_processors(states, self.eos, self._decoder)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        try:
            with torch.inference_mode():
                self.bank.generate(ids.to(device), [st.row.variant for st in states], attention_mask=mask.to(device),
                                   generation_config=self._config(max(st.row.max_tokens for st in states)),
                                   logits_processor=LogitsProcessorList([sampler]),
                                   stopping_criteria=StoppingCriteriaList([stopper]))
        except Exception as exc:  # one line to each waiting client; the server keeps serving
            message = f"generation failed: {type(exc).__name__}: {exc}".splitlines()[0]
            for job in {id(st.job): st.job for st in states if not st.done}.values():
                job.emit(("error", 500, message))
            for st in states:
                st.done = True
            return
        for st in states:  # the loop stopped for its own reason (the model's max_length)
            if not st.done and not st.job.cancelled:
                _finish(st, "length")
        self.stats["cancelled"] += len({id(st.job) for st in states if st.job.cancelled})
