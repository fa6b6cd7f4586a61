"""Serving many variants off one base: the VariantBank's memory, switch and mixed-batch figures.

    python benchmarks/bench_serve.py --part bank [--out bench-data/serve] [--variants 8] [--layers 24]
                                     [--dtype bfloat16] [--prompt 16] [--new-tokens 16]

``--part bank`` builds (once, under --out) a random model of Qwen2.5-0.5B's shape (24 layers,
hidden 896, vocab 151936, tied embeddings; bf16) and ``--variants`` fine-tunes of it (every >= 2-D
weight plus noise), each compressed with 1-bit BitDelta, embeddings included (``--include
'*embed_tokens*'``: kept exact, a dense embedding delta would be 28% of the model per variant);
then reports, as ratios:

- device memory of the bank with every variant / one model (target: under 1.6x; 8 copies: 8x);
- switch latency: ``with bank.use(name)`` entered and left (working copies in, base back);
- mixed-batch decode throughput: one ``bank.generate`` of ``variants`` rows, one per variant,
  against the same rows run one by one on models rebuilt with ``apply`` (target: at least 2x);
  and the base alone on the same batch (the floor: no delta products).

Two variants are rebuilt with ``apply``; the one-by-one reference cycles the rows over them (a
row's time does not depend on its weights' values), and their greedy tokens are compared with
the bank's. Random weights time the job exactly like a real model of the shape.
``--part server``: the HTTP server under concurrent clients (below); ``--part kernels``: the CPU
sign product of one variant on each of the shape's matrices, the lookup-table kernel against block
unpack + bf16 BLAS, for 1 to 128 tokens (where ``layers.LUT_MAX_TOKENS`` comes from); ``--part all``
runs bank and server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True)


def build(out: str, variants: int, layers: int, dtype: str, scale: float) -> tuple[str, list[str]]:
    """base/ and v<i>.dsz under out (reused when present)."""
    import torch
    from llama_kit import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import deltastream as ds

    base = os.path.join(out, "base")
    arts = [os.path.join(out, f"v{i}.dsz") for i in range(variants)]
    if os.path.isdir(base) and all(os.path.isdir(a) for a in arts):
        return base, arts
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**{**QWEN_05B, "num_hidden_layers": layers})).to(getattr(torch, dtype))
    if not os.path.isdir(base):
        model.save_pretrained(base)
        make_tokenizer().save_pretrained(base)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2}
    for i, art in enumerate(arts):
        if os.path.isdir(art):
            continue
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in originals:
                    p.copy_(originals[n] + scale * torch.randn(p.shape, generator=gen).to(p.dtype))
        ft = os.path.join(out, "ft")
        model.save_pretrained(ft)
        t = time.perf_counter()
        ds.compress(base, ft, art, method="bitdelta", include=("*embed_tokens*",))
        print(f"compressed variant {i} in {time.perf_counter() - t:.1f} s", flush=True)
        shutil.rmtree(ft)
    return base, arts


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def bench_bank(out: str, variants: int = 8, layers: int = 24, dtype: str = "bfloat16", prompt: int = 16,
               new_tokens: int = 16, scale: float = 2e-3) -> dict:
    """The bank's figures (module docstring) as a dict."""
    import torch
    from transformers import AutoModelForCausalLM

    import deltastream as ds
    from deltastream.serve import VariantBank

    base, arts = build(out, variants, layers, dtype, scale)
    names = [f"v{i}" for i in range(variants)]
    bank = VariantBank.from_pretrained(base, device="cpu", dtype=dtype)
    add_s = []
    for name, art in zip(names, arts):
        t = time.perf_counter()
        bank.add(name, art)
        add_s.append(time.perf_counter() - t)
    mem = bank.memory()
    variant_bytes = sum(mem[n] for n in names)

    def switch(name: str) -> None:
        with bank.use(name):
            pass

    first_switch_s, _ = _timed(lambda: switch(names[1]))  # the first: fresh memory (and numba's cache)
    switch_s, _ = _timed(lambda: switch(names[1]), 3)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, QWEN_05B["vocab_size"], (variants, prompt), generator=gen)

    def kw(n: int) -> dict:
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    bank.generate(ids[:, :4], names, **kw(2))  # warm-up, compile
    mixed_s, mixed = _timed(lambda: bank.generate(ids, names, **kw(new_tokens)))
    mixed_prefill_s, _ = _timed(lambda: bank.generate(ids, names, **kw(1)))
    bank.overlap = False  # the delta products after each base product, on the same threads
    sequential_s, _ = _timed(lambda: bank.generate(ids, names, **kw(new_tokens)))
    bank.overlap = True
    base_s, _ = _timed(lambda: bank.generate(ids, [None] * variants, **kw(new_tokens)))

    refs = [AutoModelForCausalLM.from_pretrained(ds.apply(base, arts[i], os.path.join(out, f"rebuilt{i}"),
                                                          overwrite=True), dtype=getattr(torch, dtype)).eval()
            for i in range(2)]
    refs[0].generate(ids[:1, :4], **kw(2))

    def one_by_one(n: int) -> tuple[float, list]:
        rows = []
        t = time.perf_counter()
        for i in range(variants):
            with torch.inference_mode():
                rows.append(refs[i % 2].generate(ids[i:i + 1], **kw(n)))
        return time.perf_counter() - t, rows

    one_by_one_s, rows = one_by_one(new_tokens)
    one_prefill_s, _ = one_by_one(1)
    same = [float((rows[i][0, prompt:] == mixed[i, prompt:]).float().mean()) for i in range(2)]
    tokens = variants * new_tokens
    decode_tokens = variants * (new_tokens - 1)
    return {
        "shape": f"Qwen2.5-0.5B ({layers} layers), {dtype}", "variants": variants, "prompt": prompt,
        "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "base_bytes": mem["base"], "variant_bytes_each": variant_bytes // variants,
        "memory_ratio": (mem["base"] + variant_bytes) / mem["base"], "copies_ratio": float(variants),
        "add_s_median": statistics.median(add_s), "first_switch_s": first_switch_s, "switch_s": switch_s,
        "mixed_tokens_per_s": tokens / mixed_s, "one_by_one_tokens_per_s": tokens / one_by_one_s,
        "base_batch_tokens_per_s": tokens / base_s, "mixed_speedup": one_by_one_s / mixed_s,
        "mixed_prefill_s": mixed_prefill_s, "one_by_one_prefill_s": one_prefill_s,
        "mixed_sequential_tokens_per_s": tokens / sequential_s,
        "mixed_decode_tokens_per_s": decode_tokens / (mixed_s - mixed_prefill_s),
        "one_by_one_decode_tokens_per_s": decode_tokens / (one_by_one_s - one_prefill_s),
        "decode_speedup": (one_by_one_s - one_prefill_s) / (mixed_s - mixed_prefill_s),
        "mixed_vs_base_batch": base_s / mixed_s, "greedy_token_agreement_with_apply": same,
    }


def report(r: dict) -> str:
    mb = 1 << 20
    agree = ", ".join(f"{s:.0%}" for s in r["greedy_token_agreement_with_apply"])
    return "\n".join([
        f"# bench_serve --part bank: {r['shape']}, {r['variants']} 1-bit BitDelta variants, "
        f"{r['threads']} threads", "",
        "| figure | value |", "|---|---|",
        f"| base model on the device | {r['base_bytes'] / mb:.0f} MiB |",
        f"| one variant (packed signs + scales, embeddings included) | {r['variant_bytes_each'] / mb:.1f} MiB |",
        f"| bank with every variant / one model | {r['memory_ratio']:.2f}x (target < 1.6x; "
        f"{r['variants']} copies: {r['copies_ratio']:.0f}x) |",
        f"| add one variant (median) | {r['add_s_median']:.2f} s |",
        f"| switch (`use()` in and out, median of 3; target well under 1 s) | {r['switch_s']:.3f} s |",
        f"| the first switch of the process (fresh memory) | {r['first_switch_s']:.3f} s |",
        f"| mixed batch, {r['variants']} rows on {r['variants']} variants | {r['mixed_tokens_per_s']:.1f} tokens/s |",
        f"| the same, `bank.overlap = False` (delta products after each base product) | "
        f"{r['mixed_sequential_tokens_per_s']:.1f} tokens/s |",
        f"| same rows one by one on apply-rebuilt models | {r['one_by_one_tokens_per_s']:.1f} tokens/s |",
        f"| **mixed / one by one**, prompt + generation | **{r['mixed_speedup']:.2f}x** (target >= 2x) |",
        f"| prompt (generate 1 token): mixed / one by one | {r['mixed_prefill_s']:.2f} s / "
        f"{r['one_by_one_prefill_s']:.2f} s |",
        f"| decode alone (the other {r['new_tokens'] - 1} tokens): mixed / one by one | "
        f"{r['mixed_decode_tokens_per_s']:.1f} / {r['one_by_one_decode_tokens_per_s']:.1f} tokens/s = "
        f"**{r['decode_speedup']:.2f}x** |",
        f"| base alone, same batch (no deltas) | {r['base_batch_tokens_per_s']:.1f} tokens/s |",
        f"| mixed / base alone | {r['mixed_vs_base_batch']:.2f}x |",
        f"| greedy tokens equal to apply's (2 variants) | {agree} |",
        "", f"prompt {r['prompt']} tokens, {r['new_tokens']} new tokens per row, greedy; load average at the end "
        f"{r['load']}.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("bank", "server", "kernels", "all"), default="bank")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "bench-data", "serve"))
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--doc", default=None, metavar="FILE",
                    help="also write each part's table into FILE's bench_serve:PART block (docs/benchmarks.md)")
    args = ap.parse_args()
    if args.part in ("bank", "all"):
        r = bench_bank(args.out, args.variants, args.layers, args.dtype, args.prompt, args.new_tokens)
        text = report(r)
        print(text)
        stem = os.path.join(args.results, f"bench_serve_bank_{args.layers}L_{args.dtype}")
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump(r, f, indent=1)
        _to_doc(args.doc, "bank", text)
    if args.part in ("server", "all"):
        _to_doc(args.doc, "server", server_report(bench_server(args)))
    if args.part == "kernels":
        text = kernels_report(bench_kernels(), bench_dare())
        print(text)
        with open(os.path.join(args.results, "bench_serve_kernels.md"), "w") as f:
            f.write(text)
        _to_doc(args.doc, "kernels", text)


def _to_doc(doc: str | None, part: str, report_text: str) -> None:
    """The report under its command, its title a plain line, into doc's bench_serve:PART block."""
    if doc:
        from docfill import fill_doc

        title, rest = report_text.split("\n", 1)
        when = time.strftime("%Y-%m-%d")
        fill_doc(doc, f"bench_serve:{part}", f"`python benchmarks/bench_serve.py --part {part}` ({when}): "
                 f"{title.lstrip('# ').split(': ', 1)[-1]}.\n{rest}")


def bench_kernels(tokens=(1, 2, 4, 8, 16, 128), repeat: int = 5) -> list[dict]:
    """ms per product of one 1-bit variant, lookup table vs block unpack + bf16 BLAS, per matrix shape."""
    import numpy as np
    import torch

    from deltastream.serve import layers
    from deltastream.serve.forms import SignDelta

    h, i, kv = QWEN_05B["hidden_size"], QWEN_05B["intermediate_size"], 128
    rng = np.random.default_rng(0)
    rows = []
    for name, (r, c) in {"q/o_proj": (h, h), "k/v_proj": (kv, h), "gate/up_proj": (i, h), "down_proj": (h, i)}.items():
        form = SignDelta((r, c), (rng.integers(0, 256, (r, c // 8), dtype=np.uint8),), rng.random((1, r), np.float32))
        delta = layers.SignOnDevice(form, torch.device("cpu"))
        for n in tokens:
            x = torch.randn(n, c).bfloat16()
            times = {}
            for path, limit in (("lut", 1 << 30), ("block", 0)):  # the product the bank takes either side
                saved = layers.LUT_MAX_TOKENS
                layers.LUT_MAX_TOKENS = limit
                try:
                    delta.matmul(x)
                    times[path], _ = _timed(lambda x=x, d=delta: d.matmul(x), repeat)
                finally:
                    layers.LUT_MAX_TOKENS = saved
            rows.append({"matrix": f"{name} {r}x{c}", "tokens": n, "lut_ms": times["lut"] * 1e3,
                         "block_ms": times["block"] * 1e3})
            print(rows[-1], flush=True)
    return rows


def bench_dare(p: float = 0.9, repeat: int = 5) -> dict:
    """DARE's serving form: the CSR product of a gate_proj-shaped delta at 1 and 16 tokens against
    what regenerating its mask from the seed costs per product (the alternative the issue names)."""
    import numpy as np
    import torch

    from deltastream.dtypes import dtype_by_name
    from deltastream.methods.base import ChunkContext
    from deltastream.methods.dare import keep_mask
    from deltastream.serve import layers
    from deltastream.serve.forms import SparseDelta

    r, c = QWEN_05B["intermediate_size"], QWEN_05B["hidden_size"]
    ctx = ChunkContext("model.layers.0.mlp.gate_proj.weight", dtype_by_name("BF16"), (r, c), 0, r * c, seed=0)
    regen_s, keep = _timed(lambda: keep_mask(ctx, p).copy(), repeat)
    index = np.flatnonzero(keep)
    form = SparseDelta((r, c), index, np.random.default_rng(0).standard_normal(index.size).astype(np.float32))
    delta = layers.to_device(form, torch.device("cpu"), torch.bfloat16)
    out = {"matrix": f"gate/up_proj {r}x{c}", "p": p, "kept": index.size, "regenerate_mask_ms": regen_s * 1e3}
    for n in (1, 16):
        x = torch.randn(n, c).bfloat16()
        delta.matmul(x)
        out[f"csr_ms_{n}"] = _timed(lambda x=x: delta.matmul(x), repeat)[0] * 1e3
    return out


def kernels_report(rows: list[dict], dare: dict) -> str:
    import torch

    lines = [f"# bench_serve --part kernels: one 1-bit variant's delta product, {torch.get_num_threads()} threads", "",
             "| matrix | tokens | lookup table ms | block unpack + bf16 BLAS ms | table / block |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['matrix']} | {r['tokens']} | {r['lut_ms']:.3f} | {r['block_ms']:.3f} | "
              f"{r['lut_ms'] / r['block_ms']:.2f}x |" for r in rows]
    note = "bf16 inputs; the bank takes the table up to layers.LUT_MAX_TOKENS tokens of a variant."
    lines += ["", note, "", f"DARE p={dare['p']} on {dare['matrix']} ({dare['kept']} kept): the CSR product "
              f"{dare['csr_ms_1']:.3f} ms at 1 token, {dare['csr_ms_16']:.3f} ms at 16; regenerating the mask "
              f"from the seed alone {dare['regenerate_mask_ms']:.3f} ms a product "
              f"({dare['regenerate_mask_ms'] / dare['csr_ms_1']:.1f}x the CSR product at 1 token): the bank builds "
              "the sparse index once."]
    return "\n".join(lines + [""])


# --- the server: `deltastream serve` under concurrent clients ---------------------------------
# Throughput and latency of the HTTP server with N closed-loop clients (each sends its next request
# when its last is answered), every request to a different variant than the one before, for S
# seconds; against the same server with --max-batch 1 (no mixed batches). Nothing may be dropped:
# every request must get a 200.

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(base_dir: str, arts: dict[str, str], port: int, *, max_batch: int, window_ms: float,
                  device: str, dtype: str, max_queue: int):
    import subprocess

    import httpx

    cmd = [sys.executable, "-m", "deltastream.cli", "serve", base_dir, "--port", str(port), "--quiet",
           "--max-batch", str(max_batch), "--batch-window-ms", str(window_ms), "--max-queue", str(max_queue),
           "--device", device, "--dtype", dtype]
    for name, art in arts.items():
        cmd += ["--variant", f"{name}={art}"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"deltastream serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("deltastream serve did not start")
        time.sleep(0.5)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))] if ordered else 0.0


def _server_run(base_dir: str, arts: dict[str, str], *, clients: int = 16, seconds: float = 30.0,
                 max_tokens: int = 32, max_batch: int = 8, window_ms: float = 10.0, device: str = "cpu",
                 dtype: str = "bfloat16", prompt_words: int = 16) -> dict:
    """One server, ``clients`` closed-loop clients for ``seconds``: tokens/s, requests/s, latency
    percentiles, requests dropped (any answer but 200), and the server's batches."""
    import concurrent.futures

    import httpx

    proc, url = _start_server(base_dir, arts, _free_port(), max_batch=max_batch, window_ms=window_ms,
                              device=device, dtype=dtype, max_queue=max(64, 2 * clients))
    from llama_kit import WORDS as words

    models = list(arts)
    try:
        with httpx.Client(timeout=600) as warm:  # the first pass of each variant pays its one-time costs
            for m in models:
                warm.post(f"{url}/v1/completions", json={"model": m, "prompt": "the model", "max_tokens": 2})
        before = httpx.get(f"{url}/health").json()
        start = time.monotonic()
        deadline = start + seconds

        def client(index: int) -> list[tuple[float, int, int, float]]:
            out = []
            with httpx.Client(timeout=600) as http:
                k = 0
                while time.monotonic() < deadline:
                    prompt = " ".join(words[(index * 7 + k * 3 + j) % len(words)] for j in range(prompt_words))
                    body = {"model": models[(index + k) % len(models)], "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0}
                    t0 = time.monotonic()
                    r = http.post(f"{url}/v1/completions", json=body)
                    done = time.monotonic()
                    tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    out.append((done - t0, r.status_code, tokens, done))
                    k += 1
            return out

        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = [x for part in pool.map(client, range(clients)) for x in part]
        after = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(60)
    wall = max(r[3] for r in results) - start
    ok = [r for r in results if r[1] == 200]
    latencies = [r[0] for r in ok]
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "seconds": round(wall, 1), "max_batch": max_batch, "window_ms": window_ms,
            "requests": len(results), "dropped": len(results) - len(ok),
            "tokens_per_s": round(sum(r[2] for r in ok) / wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "p50_s": round(_percentile(latencies, 50), 3), "p99_s": round(_percentile(latencies, 99), 3),
            "mean_rows_per_batch": round((after["rows"] - before["rows"]) / max(1, batches), 2)}


def server_report(r: dict) -> str:
    b, one = r["batched"], r["one_row"]
    rows = [("tokens/s", "tokens_per_s", "{:.1f}"), ("requests/s", "requests_per_s", "{:.2f}"),
            ("p50 latency", "p50_s", "{:.2f} s"), ("p99 latency", "p99_s", "{:.2f} s"),
            ("requests answered / dropped", None, None), ("mean rows per batch", "mean_rows_per_batch", "{:.1f}")]
    lines = [f"# bench_serve --part server: {r['shape']}, {r['variants']} 1-bit BitDelta variants, "
             f"{b['clients']} closed-loop clients sending for {r['seconds']:g} s, {r['max_tokens']} tokens per "
             f"request, greedy, {r['threads']} threads", "",
             f"The last answer came at {b['seconds']:g} s (batched) and {one['seconds']:g} s (one row): requests "
             f"in flight at {r['seconds']:g} s are finished and counted. Load average at the start: "
             f"{r.get('load', '?')}.", "",
             f"| figure | --max-batch {b['max_batch']} (window {b['window_ms']:g} ms) | --max-batch 1 | ratio |",
             "|---|---|---|---|"]
    for label, key, fmt in rows:
        if key is None:
            lines.append(f"| {label} | {b['requests'] - b['dropped']} / {b['dropped']} | "
                         f"{one['requests'] - one['dropped']} / {one['dropped']} | |")
            continue
        ratio = b[key] / one[key] if one[key] else float("nan")
        lines.append(f"| {label} | {fmt.format(b[key])} | {fmt.format(one[key])} | {ratio:.2f}x |")
    return "\n".join(lines + ["", "Every request goes to the next variant round the list; a client sends its next "
                                   "request when its last is answered.", ""])


def bench_server(args) -> dict:
    """--part server: ``deltastream serve`` (a subprocess, as users run it) on the bank part's model
    and variants under N closed-loop clients for S seconds (N, S: $BENCH_SERVE_CLIENTS, 16, and
    $BENCH_SERVE_SECONDS, 30; --new-tokens tokens per request, --prompt words per prompt), with
    mixed batches (--max-batch 8) and without (--max-batch 1)."""
    import torch

    base, arts = build(args.out, args.variants, args.layers, args.dtype, 2e-3)
    named = {f"v{i}": a for i, a in enumerate(arts)}
    clients = int(os.environ.get("BENCH_SERVE_CLIENTS", "16"))
    seconds = float(os.environ.get("BENCH_SERVE_SECONDS", "30"))
    kw = dict(clients=clients, seconds=seconds, max_tokens=args.new_tokens, dtype=args.dtype,
              prompt_words=args.prompt)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews every figure
    batched = _server_run(base, named, max_batch=8, window_ms=10.0, **kw)
    print(json.dumps({"batched": batched}), flush=True)
    one_row = _server_run(base, named, max_batch=1, window_ms=0.0, **kw)
    print(json.dumps({"one_row": one_row}), flush=True)
    r = {"shape": f"Qwen2.5-0.5B ({args.layers} layers), {args.dtype}", "variants": args.variants,
         "seconds": seconds, "max_tokens": args.new_tokens, "threads": torch.get_num_threads(), "load": load,
         "batched": batched, "one_row": one_row}
    text = server_report(r)
    print(text)
    os.makedirs(args.results, exist_ok=True)
    stem = os.path.join(args.results, f"bench_serve_server_{args.layers}L_{args.dtype}")
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
