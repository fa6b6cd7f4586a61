"""deltastream serve: the OpenAI-compatible server over a VariantBank, answered by the official
openai client -- the same greedy text as the bank alone (and as the model rebuilt with apply) for
concurrent requests to different variants, streaming, sampling with a seed, stop strings, the
documented errors, variant admin, a client that leaves mid-stream, and the scheduler's bounded queue."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")
pytest.importorskip("transformers")
pytest.importorskip("uvicorn")

import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from llama_kit import WORDS, make_llama_pair  # noqa: E402

import deltastream as ds  # noqa: E402
from deltastream.serve.scheduler import Job, QueueFull, Row, Scheduler  # noqa: E402
from deltastream.serve.server import create_app  # noqa: E402

from common import error_line, run_cli  # noqa: E402

VOCAB = len(WORDS) + 4  # the llama_kit tokenizer's: every generated id decodes to a word
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPTS = {"ft1": "the model base fine", "ft2": "delta edit loss change drop", "base": "sign scale bit"}
KEY = "test-key"


def _bank_class():
    try:
        from deltastream.serve import VariantBank
    except ImportError:
        pytest.skip("deltastream.serve.VariantBank is not there yet")
    return VariantBank


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny base, two fine-tunes of it, compressed with bitdelta and lossless."""
    root = str(tmp_path_factory.mktemp("serve"))
    base, ft1 = make_llama_pair(os.path.join(root, "a"), scale=0.05, seed=0, vocab=VOCAB, tie=False)
    _, ft2 = make_llama_pair(os.path.join(root, "b"), scale=0.05, seed=0, vocab=VOCAB, tie=False)  # same base (seed 0)
    # b's fine-tune is the same noise as a's: perturb it once more, into a different fine-tune
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ft2)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(ft2)
    arts = {"ft1": ds.compress(base, ft1, os.path.join(root, "ft1.dsz"), "bitdelta"),
            "ft2": ds.compress(base, ft2, os.path.join(root, "ft2.dsz"), "lossless")}
    return root, base, arts


def _bank(base: str, arts: dict[str, str]):
    bank = _bank_class().from_pretrained(base, device="cpu", dtype="float32")
    for name, art in arts.items():
        bank.add(name, art)
    bank.tokenizer.chat_template = CHAT_TEMPLATE
    return bank


class Served:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.serve.scheduler

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def bank(llamas):
    _, base, arts = llamas
    return _bank(base, arts)


@pytest.fixture(scope="module")
def served(bank):
    s = Served(create_app(bank, base_name="base", max_batch=8, batch_window_ms=50))
    yield s
    s.close()


@pytest.fixture(scope="module")
def keyed(llamas):
    _, base, arts = llamas
    s = Served(create_app(_bank(base, {"ft1": arts["ft1"]}), base_name="base", api_key=KEY, batch_window_ms=0))
    yield s
    s.close()


def _ids(bank, text: str) -> list[int]:
    return bank.tokenizer(text)["input_ids"]


def _greedy(bank, model: str | None, prompt: str, max_tokens: int) -> str:
    return _greedy_tokens(bank, model, prompt, max_tokens)[0]


def _greedy_tokens(bank, model: str | None, prompt: str, max_tokens: int) -> tuple[str, int]:
    """The bank alone, one row: greedy generation up to EOS, decoded, and its token count."""
    ids = torch.tensor([_ids(bank, prompt)])
    variant = None if model in (None, "base") else model
    out = bank.generate(ids, [variant], attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                        do_sample=False, pad_token_id=2)
    new = out[0, ids.shape[1]:].tolist()
    if 2 in new:
        new = new[:new.index(2)]
    return _continuation(bank.tokenizer, ids[0].tolist(), new), len(new)


def _continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text ``new`` adds after ``prompt`` (a word's leading space included)."""
    return tokenizer.decode(prompt + new, skip_special_tokens=True)[len(tokenizer.decode(prompt,
                                                                                        skip_special_tokens=True)):]


def test_models_lists_the_base_then_the_variants(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["base", "ft1", "ft2"]
    assert {m.object for m in models.data} == {"model"}
    assert served.client().models.retrieve("ft2").id == "ft2"


def test_concurrent_requests_to_two_variants_share_a_batch_and_match_the_bank(served, bank, llamas):
    client = served.client()
    before = served.scheduler.stats["batches"]

    def ask(model):
        return client.completions.create(model=model, prompt=PROMPTS[model], max_tokens=12, temperature=0)

    gate = threading.Event()
    served.scheduler.call(lambda _: gate.wait(30))  # hold the worker until the three requests wait together
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(ask, m) for m in PROMPTS]
        deadline = time.monotonic() + 30
        while served.scheduler.waiting < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()
        answers = {m: f.result() for m, f in zip(PROMPTS, futures)}
    assert served.scheduler.stats["batches"] == before + 1  # one mixed batch of three variants
    assert served.scheduler.stats["largest_batch"] >= 3
    for model, answer in answers.items():
        expected, tokens = _greedy_tokens(bank, model, PROMPTS[model], 12)
        assert answer.choices[0].text == expected, model
        assert answer.model == model
        assert answer.usage.prompt_tokens == len(_ids(bank, PROMPTS[model]))
        assert answer.usage.completion_tokens == tokens
        assert answer.choices[0].finish_reason in ("length", "stop")
    assert answers["ft1"].choices[0].text != _greedy(bank, None, PROMPTS["ft1"], 12)  # `model` picks the variant
    # and the same as the fine-tune rebuilt with apply, loaded as users load it
    from transformers import LlamaForCausalLM

    root, base, arts = llamas
    for name in ("ft1", "ft2"):
        out = ds.apply(base, arts[name], os.path.join(root, f"{name}-rebuilt"), overwrite=True)
        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
        ids = torch.tensor([_ids(bank, PROMPTS[name])])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=2)[0, ids.shape[1]:].tolist()
        new = new[:new.index(2)] if 2 in new else new
        assert answers[name].choices[0].text == _continuation(bank.tokenizer, ids[0].tolist(), new), name


def test_streaming_yields_the_same_text_token_by_token(served, bank):
    client = served.client()
    chunks = list(client.completions.create(model="ft1", prompt=PROMPTS["ft1"], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _greedy(bank, "ft1", PROMPTS["ft1"], 12)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # not one lump at the end
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_chat_uses_the_template_and_streams(served, bank):
    client = served.client()
    messages = [{"role": "user", "content": "the model base"}, {"role": "user", "content": "fine"}]
    answer = client.chat.completions.create(model="ft2", messages=messages, max_tokens=8, temperature=0)
    prompt = bank.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = bank.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == _greedy(bank, "ft2", prompt, 8)
    streamed = client.chat.completions.create(model="ft2", messages=messages, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content


def test_stop_cuts_the_output_before_it(served, bank):
    full = _greedy(bank, "ft1", PROMPTS["ft1"], 12)
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    cut = full[:full.index(stop)]
    client = served.client()
    answer = client.completions.create(model="ft1", prompt=PROMPTS["ft1"], max_tokens=12, temperature=0,
                                       stop=[stop, "never there"])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="ft1", prompt=PROMPTS["ft1"], max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_a_seed_reproduces_sampling_and_n_gives_several_choices(served):
    client = served.client()

    def sample(seed, n=1):
        return client.completions.create(model="ft2", prompt=["the model", "delta edit"], max_tokens=10,
                                         temperature=1.5, top_p=0.95, seed=seed, n=n)

    first, again, other = sample(5, n=2), sample(5, n=2), sample(6, n=2)
    texts = [c.text for c in first.choices]
    assert len(texts) == 4 and [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in again.choices] == texts
    assert [c.text for c in other.choices] != texts
    assert len(set(texts)) > 1


def test_bad_requests_get_openai_errors(served, bank):
    client = served.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="the", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "nope" in e.value.body["message"]
    for bad in (dict(temperature=3), dict(max_tokens=0), dict(top_p=0), dict(n=9), dict(max_tokens=10_000)):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="ft1", prompt="the", **{"max_tokens": 2, **bad})
        assert e.value.body["param"] == next(iter(bad)), bad
    r = httpx.post(f"{served.url}/v1/completions", json={"model": "ft1"})  # no prompt: FastAPI's check, our shape
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="ft1", prompt=[[4, 5, 10**6]], max_tokens=2)
    by_ids = client.completions.create(model="ft1", prompt=[_ids(bank, PROMPTS["ft1"])], max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == _greedy(bank, "ft1", PROMPTS["ft1"], 5)  # token ids as the prompt
    r = httpx.get(f"{served.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_no_chat_template_is_a_400(served, bank):
    template, bank.tokenizer.chat_template = bank.tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="chat template"):
            served.client().chat.completions.create(model="ft1", messages=[{"role": "user", "content": "the"}])
    finally:
        bank.tokenizer.chat_template = template


def test_admin_needs_the_key(served):
    r = httpx.post(f"{served.url}/v1/variants", json={"name": "x", "artifact": "x.dsz"})
    assert r.status_code == 403 and "--api-key" in r.json()["error"]["message"]
    assert httpx.delete(f"{served.url}/v1/variants/ft1").status_code == 403


def test_the_key_guards_every_request_and_allows_variant_admin(keyed, llamas, bank):
    _, _, arts = llamas
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert httpx.get(f"{keyed.url}/v1/models").status_code == 401
    client = keyed.client(KEY)
    assert [m.id for m in client.models.list().data] == ["base", "ft1"]
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{keyed.url}/v1/variants", json={"name": "ft2", "artifact": arts["ft2"]}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    added = client.completions.create(model="ft2", prompt=PROMPTS["ft2"], max_tokens=6, temperature=0)
    assert added.choices[0].text == _greedy(bank, "ft2", PROMPTS["ft2"], 6)
    r = httpx.post(f"{keyed.url}/v1/variants", json={"name": "bad", "artifact": "/no/such.dsz"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.delete(f"{keyed.url}/v1/variants/ft2", headers=auth).json()["deleted"] is True
    assert [m.id for m in client.models.list().data] == ["base", "ft1"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="ft2", prompt="the", max_tokens=3)


def test_a_client_that_leaves_mid_stream_frees_its_slot(served):
    cancelled = served.scheduler.stats["cancelled"]
    body = {"model": "ft1", "prompt": "the", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"text": "' in line:
                break  # the first token came: leave
    deadline = time.monotonic() + 30
    while served.scheduler.stats["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the row of a client that left was never dropped"
        time.sleep(0.05)
    answer = served.client().completions.create(model="ft2", prompt="the", max_tokens=2, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")


# --- the scheduler alone: the bounded queue ---------------------------------------------------
class _StalledBank:
    """A bank whose generate blocks until released: the worker is busy, the queue fills."""

    names: list[str] = []
    device = torch.device("cpu")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.release = threading.Event()
        self.entered = threading.Event()

    def generate(self, input_ids, variants, **kw):
        self.entered.set()
        self.release.wait(30)
        return input_ids


def test_a_full_queue_refuses_without_blocking(bank):
    stalled = _StalledBank(bank.tokenizer)
    scheduler = Scheduler(stalled, max_batch=1, window_s=0, max_queue=2, eos_token_ids=[2])
    scheduler.start()
    ends: list[tuple] = []
    try:
        jobs = [Job([Row([4, 5], None, 3)], ends.append) for _ in range(3)]
        scheduler.submit(jobs[0])
        assert stalled.entered.wait(10)  # the worker runs job 0 and stalls
        scheduler.submit(jobs[1])
        scheduler.submit(jobs[2])
        start = time.monotonic()
        with pytest.raises(QueueFull, match="full"):
            scheduler.submit(Job([Row([4], None, 3)], ends.append))
        assert time.monotonic() - start < 0.1
    finally:
        stalled.release.set()
        scheduler.stop()
    assert scheduler.stats["rejected"] == 1


def test_a_full_queue_is_a_503(bank):
    stalled = _StalledBank(bank.tokenizer)
    s = Served(create_app(stalled, base_name="base", max_batch=1, batch_window_ms=0, max_queue=1))
    try:
        client = s.client()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.completions.create, model="base", prompt="the", max_tokens=2)
            assert stalled.entered.wait(10)
            second = pool.submit(client.completions.create, model="base", prompt="the", max_tokens=2)
            deadline = time.monotonic() + 10
            while s.scheduler.waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="base", prompt="the", max_tokens=2)
            assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
            stalled.release.set()
            first.result(30), second.result(30)
    finally:
        stalled.release.set()
        s.close()


# --- the command line ----------------------------------------------------------------------
def test_serve_refuses_a_bad_variant_option_in_one_line(tmp_path, capsys):
    assert run_cli("serve", str(tmp_path), "--variant", "no-equals-sign") == 2
    assert "NAME=ARTIFACT" in error_line(capsys)
    assert run_cli("serve", str(tmp_path), "--max-batch", "0") == 2
    assert "--max-batch" in error_line(capsys)


def test_serve_without_the_extra_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # import fastapi raises ImportError
    assert run_cli("serve", str(tmp_path)) == 2
    assert error_line(capsys) == ("deltastream: error: deltastream serve needs the 'serve' extra: "
                                  "pip install 'deltastream[serve]'")
