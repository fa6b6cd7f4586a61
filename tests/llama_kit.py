"""Tiny transformers Llama pairs built from a config, with an offline tokenizer: no download."""

from __future__ import annotations

import os

import numpy as np

WORDS = ("the model base fine tune delta edit loss change drop rate sign scale bit merge layer "
         "weight token window batch step term sum grad norm rank mask seed chunk").split()


def make_text(path: str, words: int = 3000, seed: int = 0) -> str:
    """Deterministic pseudo-English: words drawn with a skewed frequency, in sentences."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, len(WORDS) + 1)
    picks = rng.choice(len(WORDS), size=words, p=probs / probs.sum())
    sentences = [" ".join(WORDS[i] for i in picks[j:j + 12]) + "." for j in range(0, words, 12)]
    with open(path, "w", encoding="utf-8") as f:
        f.write(" ".join(sentences))
    return path


def make_tokenizer():
    """A word-level tokenizer over WORDS and '.', wrapped as transformers expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, ".": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama_config(vocab: int = 64, hidden: int = 32, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tie)


def save_llama(model, folder: str, tokenizer=None, dtype: str = "float32") -> str:
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(folder)
    (tokenizer or make_tokenizer()).save_pretrained(folder)
    return folder


def make_llama_pair(root: str, scale: float = 0.02, dtype: str = "float32", seed: int = 0, **config) -> tuple[str, str]:
    """base/ and ft/ under root: a random tiny Llama and it plus Gaussian noise of std ``scale``
    on every >= 2-D weight (a stand-in for a fine-tune's delta)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    base = LlamaForCausalLM(llama_config(**config))
    base_dir = save_llama(base, os.path.join(root, "base"), dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in base.named_parameters():
            if p.dim() >= 2:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))
    ft_dir = save_llama(base, os.path.join(root, "ft"), dtype=dtype)
    return base_dir, ft_dir
