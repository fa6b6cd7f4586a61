"""deltastream analyze on a SmolLM2-135M-shaped model: time and peak memory, as ratios.

Builds (once, under --out) a random Llama with SmolLM2-135M-Instruct's config (30 layers, hidden
576, vocab 49152, tied embeddings), a bf16 base and a fine-tune 1e-3 away, and a text file; then
runs ``deltastream analyze`` at C = 5 under memtrack and reports

- wall time / the time of one forward+backward pass over the same tokens (a pass is the unit
  the term costs: C passes with gradients and one without);
- peak RssAnon / the float32 model's bytes (the issue's target: under 3x).

    python benchmarks/bench_analyze.py [--out bench-data/analyze] [--max-tokens 4096] [--method dare]

Random weights time and size the job exactly like the real model (same shapes, same tokens);
the real model's figures are in benchmarks/quality/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from memtrack import run_tracked  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)


def build(out: str) -> tuple[str, str, str]:
    import torch
    from llama_kit import make_text, make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    base, ft, data = (os.path.join(out, n) for n in ("base", "ft", "data.txt"))
    if not os.path.exists(os.path.join(ft, "config.json")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16)
        tok = make_tokenizer()
        model.save_pretrained(base)
        tok.save_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.add_((1e-3 * torch.randn(p.shape)).to(p.dtype))
        model.save_pretrained(ft)
        tok.save_pretrained(ft)
        make_text(data, words=20000)
    return base, ft, data


def one_pass_seconds(ft: str, data: str, max_tokens: int, seq_len: int, batch_size: int) -> float:
    """One forward+backward over the same windows, float32, nothing else (the term's unit of cost)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deltastream.analysis.data import load_tokenizer, make_windows
    from deltastream.analysis.model import causal_lm_objective

    windows = make_windows(load_tokenizer(ft), data, max_tokens, seq_len)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    next_token_loss = causal_lm_objective(model, recompute=False)
    start = time.perf_counter()
    for batch in windows.batches(batch_size):
        (next_token_loss(model, torch.from_numpy(batch)) / windows.predicted).backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-data/analyze")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--method", default="dare")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-recompute", action="store_true", help="analyze --no-recompute (more memory, faster)")
    args = ap.parse_args()
    base, ft, data = build(args.out)
    unit = one_pass_seconds(ft, data, args.max_tokens, args.seq_len, args.batch_size)
    report = os.path.join(args.out, "analysis.json")
    r = run_tracked([sys.executable, "-m", "deltastream.cli", "analyze", base, ft, "--data", data, "--method",
                     args.method, "--max-tokens", str(args.max_tokens), "--seq-len", str(args.seq_len),
                     "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--json", report, "-q",
                     *(["--no-recompute"] if args.no_recompute else [])])
    if r.returncode:
        sys.exit(r.stderr)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        n_params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).parameters())
    fp32 = 4 * n_params
    doc = json.load(open(report))
    print(f"model: SmolLM2-135M shape, {n_params / 1e6:.1f}M parameters, float32 {fp32 / 2**20:.0f} MiB; "
          f"{doc['tokens']} tokens, C = {doc['steps']}, method {args.method}, dtype {args.dtype}, "
          f"recompute {'off' if args.no_recompute else 'on'}")
    print(f"one forward+backward pass: {unit:.1f} s")
    print(f"analyze: {r.wall_s:.1f} s = {r.wall_s / unit:.2f} passes; peak RssAnon {r.peak_rss_anon / 2**20:.0f} MiB "
          f"= {r.peak_rss_anon / fp32:.2f}x the float32 model")


if __name__ == "__main__":
    main()
