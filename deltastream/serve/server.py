"""``deltastream serve``'s HTTP side: an OpenAI-compatible FastAPI app over a VariantBank.

    app = create_app(bank, base_name="qwen-0.5b")   # then uvicorn.run(app, host="127.0.0.1")

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``, ``POST
/v1/chat/completions`` (``model`` names the base or a variant; ``stream: true`` answers with
server-sent events), ``GET /health``, and with an API key set, ``POST /v1/variants`` and ``DELETE
/v1/variants/{name}``. Errors are OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: an unknown model 404, bad parameters 400 (FastAPI's validation errors included), a
missing or wrong key 401, a full queue 503. The handlers only tokenize, queue and wait: the bank
runs on the scheduler's one worker thread (scheduler.py), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DeltastreamError, escape
from .command import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_WINDOW_MS
from .scheduler import Job, QueueFull, Row, Scheduler

__all__ = ["create_app", "APIError", "DEFAULT_MAX_BATCH", "DEFAULT_WINDOW_MS", "DEFAULT_MAX_QUEUE"]

#: max_tokens when a request gives none: OpenAI's 16 for completions; for chat (OpenAI: the rest of
#: the context) the rest of the context, at most this
CHAT_MAX_TOKENS = 1024
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param, self.code))


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- request bodies -----------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields this server does not use are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict[str, Any] | None = None
    logprobs: Any = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[_Part] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None


class VariantBody(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    artifact: str = Field(min_length=1)


# --- the app ------------------------------------------------------------------------------------
class _State:
    def __init__(self, bank, scheduler: Scheduler, base_name: str, api_key: str | None):
        self.bank = bank
        self.scheduler = scheduler
        self.base_name = base_name
        self.api_key = api_key
        self.variants: list[str] = list(bank.names)
        self.created = int(time.time())
        config = getattr(getattr(bank, "model", None), "config", None)
        self.context = getattr(config, "max_position_embeddings", None)

    def variant_of(self, model: str) -> str | None:
        if model == self.base_name:
            return None
        if model in self.variants:
            return model
        raise APIError(404, f"The model '{escape(model)}' does not exist", param="model", code="model_not_found")

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "deltastream",
                "root": self.base_name, "parent": None if name == self.base_name else self.base_name}


def _eos_ids(bank) -> list[int]:
    ids: list[int] = []
    for source in (getattr(getattr(bank, "model", None), "generation_config", None), bank.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids += value if isinstance(value, list) else [] if value is None else [value]
    return sorted(set(int(i) for i in ids))


def create_app(bank, *, base_name: str, api_key: str | None = None, max_batch: int = DEFAULT_MAX_BATCH,
               batch_window_ms: float = DEFAULT_WINDOW_MS, max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The FastAPI app serving ``bank`` (a :class:`~deltastream.serve.VariantBank`); its scheduler's
    worker starts and stops with the app (ASGI lifespan), and is ``app.state.serve.scheduler``."""
    eos = _eos_ids(bank)
    tok = bank.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    scheduler = Scheduler(bank, max_batch=max_batch, window_s=batch_window_ms / 1000, max_queue=max_queue,
                          pad_token_id=pad, eos_token_ids=eos)
    state = _State(bank, scheduler, base_name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "Missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    app = FastAPI(title="deltastream serve", lifespan=lifespan, dependencies=[Depends(authorize)])
    app.state.serve = state
    _add_error_handlers(app)

    _add_generation_routes(app, state)
    _add_admin_routes(app, state)
    return app


def _add_generation_routes(app: FastAPI, state: _State) -> None:
    scheduler, tok = state.scheduler, state.bank.tokenizer

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "waiting": scheduler.waiting, **scheduler.stats}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [state.model_card(n) for n in [state.base_name, *state.variants]]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        state.variant_of(name)
        return state.model_card(name)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _refuse_unsupported(body.logprobs is not None, "logprobs")
        _refuse_unsupported(bool(body.echo), "echo")
        _refuse_unsupported(body.best_of not in (None, 1), "best_of")
        variant = state.variant_of(body.model)
        prompts = _completion_prompts(state, body.prompt)
        return await _serve(state, request, body, variant, prompts, chat=False,
                            max_tokens=body.max_tokens if body.max_tokens is not None else 16)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        _refuse_unsupported(bool(body.logprobs), "logprobs")
        variant = state.variant_of(body.model)
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"The model '{escape(body.model)}' has no chat template (its tokenizer sets none): "
                                "use /v1/completions", param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": _content(m, i)} for i, m in enumerate(body.messages)]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that refuses these messages (roles out of order...)
            raise APIError(400, f"the chat template refused the messages: {exc}".splitlines()[0],
                           param="messages") from None
        ids = tok(text, add_special_tokens=False)["input_ids"]
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is None:
            limit = CHAT_MAX_TOKENS if state.context is None else max(1, min(CHAT_MAX_TOKENS, state.context - len(ids)))
        return await _serve(state, request, body, variant, [ids], chat=True, max_tokens=limit)


def _add_admin_routes(app: FastAPI, state: _State) -> None:
    scheduler = state.scheduler

    @app.post("/v1/variants")
    async def add_variant(body: VariantBody) -> dict:
        _require_admin(state)
        if body.name == state.base_name or body.name in state.variants:
            raise APIError(400, f"a model named '{escape(body.name)}' is served already", param="name",
                           code="model_exists")

        def add(bank) -> None:
            bank.add(body.name, body.artifact)

        await _on_worker(scheduler, add, "artifact")
        state.variants.append(body.name)
        return state.model_card(body.name)

    @app.delete("/v1/variants/{name:path}")
    async def remove_variant(name: str) -> dict:
        _require_admin(state)
        if name == state.base_name:
            raise APIError(400, "the base cannot be removed", param="name")
        state.variant_of(name)
        state.variants.remove(name)  # new requests for it get 404 now; queued ones at their batch
        await _on_worker(scheduler, lambda bank: bank.remove(name), "name")
        return {"id": name, "object": "model", "deleted": True}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(where) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else first.get("msg", "invalid request")
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _refuse_unsupported(given: bool, param: str) -> None:
    if given:
        raise APIError(400, f"{param} is not supported by deltastream serve", param=param, code="unsupported")


def _require_admin(state: _State) -> None:
    if state.api_key is None:
        raise APIError(403, "variants can be added and removed only on a server started with --api-key",
                       type="permission_error", code="admin_disabled")


async def _on_worker(scheduler: Scheduler, fn, param: str) -> Any:
    try:
        return await asyncio.wrap_future(scheduler.call(fn))
    except DeltastreamError as exc:
        raise APIError(400, escape(str(exc)), param=param) from None
    except (OSError, KeyError, ValueError) as exc:
        raise APIError(400, escape(f"{type(exc).__name__}: {exc}"), param=param) from None


def _content(message: _Message, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(400, f"messages[{i}]: only text content parts are supported, not {part.type!r}",
                           param=f"messages.{i}.content")
        texts.append(part.text)
    return "".join(texts)


def _completion_prompts(state: _State, prompt: Any) -> list[list[int]]:
    """The prompts' token ids (strings tokenized as the tokenizer does, BOS and all)."""
    tok = state.bank.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    config = getattr(getattr(state.bank, "model", None), "config", None)
    vocab = getattr(config, "vocab_size", None) or len(tok)
    for p in prompt:
        ids = tok(p)["input_ids"] if isinstance(p, str) else list(p)
        if any(not 0 <= i < vocab for i in ids):
            raise APIError(400, f"prompt holds a token id outside the vocabulary (0 to {vocab - 1})", param="prompt")
        out.append(ids)
    return out


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop takes at most {MAX_STOPS} sequences, not {len(stops)}", param="stop")
    return tuple(s for s in stops if s)


def _rows(state: _State, body: _Body, variant: str | None, prompts: list[list[int]], max_tokens: int) -> list[Row]:
    n = body.n or 1
    if len(prompts) * n > state.scheduler.max_batch:
        raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is more rows than one batch holds "
                            f"({state.scheduler.max_batch}, the server's --max-batch)", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = _stops(body.stop)
    rows = []
    for i, ids in enumerate(prompts):
        if not ids:
            bos = state.bank.tokenizer.bos_token_id
            if bos is None:
                raise APIError(400, "the prompt is empty and the tokenizer has no BOS token to start from",
                               param="prompt")
            ids = [bos]
        if state.context is not None and len(ids) + max_tokens > state.context:
            raise APIError(400, f"This model's maximum context length is {state.context} tokens; the prompt has "
                                f"{len(ids)} and max_tokens asks {max_tokens} more", param="max_tokens",
                           code="context_length_exceeded")
        for j in range(n):
            seed = None if body.seed is None else (body.seed + i * n + j) % (1 << 63)
            rows.append(Row(ids, variant, max_tokens, temperature, top_p, seed, stop))
    return rows


async def _serve(state: _State, request: Request, body: _Body, variant: str | None, prompts: list[list[int]], *,
                 chat: bool, max_tokens: int):
    rows = _rows(state, body, variant, prompts, max_tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(rows, emit)
    try:
        state.scheduler.submit(job)
    except QueueFull as exc:
        raise APIError(503, str(exc), type="server_error", code="queue_full") from None
    reply = _Reply(chat, body.model, len(rows), sum(len(p) for p in prompts))
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(job, events, reply, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while reply.open:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse(status_code=499, content=error_body("client disconnected", "server_error"))
                continue
            reply.take(event)
    finally:
        if reply.open:
            job.cancel()
    return reply.whole()


class _Reply:
    """The answer to one request, built from the worker's events."""

    def __init__(self, chat: bool, model: str, rows: int, prompt_tokens: int):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [""] * rows
        self.finish: list[str | None] = [None] * rows
        self.completion_tokens = 0
        self.prompt_tokens = prompt_tokens
        self.ended = 0
        self.error: APIError | None = None

    @property
    def open(self) -> bool:
        return self.error is None and self.ended < len(self.texts)

    def take(self, event: tuple) -> None:
        kind = event[0]
        if kind == "text":
            self.texts[event[1]] += event[2]
        elif kind == "end":
            self.finish[event[1]] = event[2]
            self.completion_tokens += event[3]
            self.ended += 1
        elif kind == "error":
            status = event[1]
            self.error = APIError(status, event[2], type="server_error" if status >= 500 else "invalid_request_error",
                                  code="model_not_found" if status == 404 else None)
            raise self.error

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def head(self) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None}

    def whole(self) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(self.texts, self.finish))]
        return {**self.head(), "choices": choices, "usage": self.usage()}

    def chunk(self, index: int, text: str | None, finish: str | None = None, first: bool = False) -> str:
        head = {**self.head(), "object": "chat.completion.chunk" if self.chat else "text_completion"}
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})


def _sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)}\n\n"


async def _stream(job: Job, events: asyncio.Queue, reply: _Reply, usage: bool) -> AsyncIterator[str]:
    try:
        if reply.chat:
            for i in range(len(reply.texts)):
                yield reply.chunk(i, None, first=True)
        while reply.open:
            event = await events.get()
            try:
                reply.take(event)
            except APIError as exc:
                yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
                break
            if event[0] == "text":
                yield reply.chunk(event[1], event[2])
            elif event[0] == "end":
                yield reply.chunk(event[1], None, finish=event[2])
        if usage and reply.error is None:
            yield _sse({**reply.head(), "object": "chat.completion.chunk" if reply.chat else "text_completion",
                        "choices": [], "usage": reply.usage()})
        yield _sse("[DONE]")
    finally:  # the client left (the generator is closed mid-stream), or it ended: its rows stop
        if reply.open:
            job.cancel()


def served_name(base_dir: str) -> str:
    """The model name of the base: its folder's name."""
    return os.path.basename(os.path.normpath(base_dir)) or "base"
