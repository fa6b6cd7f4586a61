"""Serve several fine-tunes of one base from their compressed deltas, in one mixed batch.

    python examples/serve_variants.py BASE_DIR NAME=ARTIFACT [NAME=ARTIFACT ...] [--prompt "..."]

Without arguments it builds a tiny random Llama and two fine-tunes of it under a temporary
folder (no download), compresses them (1-bit BitDelta and DARE) and serves those.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import deltastream as ds
from deltastream.serve import VariantBank


def demo_models(root: str) -> tuple[str, dict[str, str]]:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from llama_kit import make_llama_pair

    base, ft = make_llama_pair(root, scale=0.02)
    return base, {"onebit": ds.compress(base, ft, os.path.join(root, "onebit.dsz"), method="bitdelta"),
                  "dare": ds.compress(base, ft, os.path.join(root, "dare.dsz"), method="dare", p=0.9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?")
    ap.add_argument("variants", nargs="*", help="NAME=ARTIFACT")
    ap.add_argument("--prompt", default="the model base")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.base is None:
        base, variants = demo_models(tmp.name)
    else:
        base, variants = args.base, dict(v.split("=", 1) for v in args.variants)

    bank = VariantBank.from_pretrained(base, device="auto")  # the base loads once
    for name, artifact in variants.items():
        bank.add(name, artifact)  # checked against the base; kept compressed on the device
    print({k: f"{v / 2**20:.2f} MiB" for k, v in bank.memory().items()})

    # one batch, one row per variant (None: the base), left-padded as generate expects
    tok = bank.tokenizer
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = [*variants, None]
    batch = tok([args.prompt] * len(rows), return_tensors="pt", padding=True).to(bank.device)
    t = time.perf_counter()
    out = bank.generate(batch.input_ids, rows, attention_mask=batch.attention_mask,
                        max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    print(f"mixed batch of {len(rows)} rows in {time.perf_counter() - t:.2f} s")
    for name, seq in zip(rows, out):
        print(f"{name or 'base':>8}: {tok.decode(seq[batch.input_ids.shape[1]:], skip_special_tokens=True)}")

    # many calls to one variant: switch instead (working copies in, the base's bits back after)
    first = next(iter(variants))
    with bank.use(first) as model, torch.no_grad():
        print(f"{first} via use(): next token {int(model(batch.input_ids[:1]).logits[0, -1].argmax())}")


if __name__ == "__main__":
    main()
