"""The loss ``analyze`` measures, defined exactly so another implementation gets the same figure.

The text file is tokenized as one string with the base's tokenizer (``add_special_tokens=False``);
its first ``max_tokens`` tokens are cut into ``floor(max_tokens / seq_len)`` full, non-overlapping
windows of ``seq_len`` tokens, and L is the mean next-token cross-entropy over every predicted
position of every window (token-weighted). The batch size changes speed and memory only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError, tensor_context
from .errors import AnalysisError

__all__ = ["Windows", "load_tokenizer", "make_windows"]


@dataclass(frozen=True)
class Windows:
    """The evaluation windows: ``ids`` [n_windows, seq_len] int64."""

    ids: np.ndarray
    source: str

    @property
    def tokens(self) -> int:
        return int(self.ids.size)

    @property
    def predicted(self) -> int:
        """Positions with a next token to predict: seq_len - 1 per window."""
        return int(self.ids.shape[0] * (self.ids.shape[1] - 1))

    def batches(self, batch_size: int) -> list[np.ndarray]:
        return [self.ids[i:i + batch_size] for i in range(0, self.ids.shape[0], batch_size)]


def load_tokenizer(folder: str):
    """The tokenizer saved beside a checkpoint (transformers' AutoTokenizer), or one clear error."""
    from transformers import AutoTokenizer

    where = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    try:
        return AutoTokenizer.from_pretrained(where)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a missing tokenizer
        raise AnalysisError(f"{tensor_context(where)}: no tokenizer to tokenize the data with "
                            f"(tokenizer.json or tokenizer_config.json; {type(exc).__name__})") from None


def make_windows(tokenizer, data: str, max_tokens: int, seq_len: int) -> Windows:
    """The windows of ``data`` (a text file), as the module docstring defines them."""
    if seq_len < 2:
        raise ParameterError(f"--seq-len {seq_len}: a window needs at least 2 tokens (one to predict)")
    if max_tokens < seq_len:
        raise ParameterError(f"--max-tokens {max_tokens} is under one window of --seq-len {seq_len}")
    try:
        with open(data, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnalysisError(f"{tensor_context(data)}: cannot read the data as UTF-8 text: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise AnalysisError(f"{tensor_context(data)}: {len(ids)} tokens, shorter than one window of "
                            f"{seq_len} (--seq-len): give more text or a shorter window")
    return Windows(np.asarray(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len), os.path.abspath(data))
