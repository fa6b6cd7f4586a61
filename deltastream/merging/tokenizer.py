"""mergekit's tokenizer merging (its ``tokenizer/`` package), with the embedding rows streamed.

The output tokenizer is built as mergekit's ``build_tokenizer`` builds it, with
``transformers``/``tokenizers``: ``source: base`` the base's tokenizer (tokens at ids >= its
config's ``vocab_size`` stripped, BPE only, as ``get_stripped_tokenizer``); ``source: MODEL``
that model's; ``source: union`` the base's plus, in order, every other model's tokens it lacks
(``build_union_tokenizer``: plain tokens first, then the added tokens with their first settings);
then each ``tokens:`` key it lacks, added. Each model's *permutation* maps an output id to the
model's id of the same token string (absent: -1; a model without a loadable tokenizer uses the
base's vocabulary).

Every vocabulary tensor (``embed_tokens``, ``lm_head`` and the other names of
``policy.DEFAULT_KEEP_EXACT``; rows are tokens) of every model is then read through a
:class:`PermutedRows` source: the rows of the output vocabulary, each the model's own row of the
token (read chunk by chunk from the model, runs of consecutive rows in one read), or a default
row, as mergekit's ``PermutedVocabulary``:

- a token in one model only: that model's row (for every model); in none: zeros; in several but
  not all: the base's row if the base has it, else the average of the rows of the models that
  have it (added one at a time in the tensors' dtype, then divided, as mergekit's torch code);
- a ``tokens:`` entry: its ``source`` (a model's row of the token, ``{kind: model_token, model,
  token | token_id}`` another token's row, ``{kind: zero}``), used where a model lacks the token,
  or for every model with ``force: true``;
- ``pad_to_multiple_of``: the rows up to the multiple are each model's mean row of its output
  vocabulary (summed in float64 in a fixed order, then rounded once).

The merge method then merges those rows as any tensor. Only the default rows (a few tokens) and
the mean rows are held in memory: the plan reads them when it is built.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..dtypes import DType, from_float32, to_float32
from ..errors import DeltastreamWarning, MismatchError, ParameterError, tensor_context
from ..policy import DEFAULT_KEEP_EXACT
from ..sources import Model, Source
from .config import MergeConfig, TokenSource, builtin_template

__all__ = ["PermutedRows", "VocabPlan", "build_vocab_plan", "build_union_tokenizer", "stripped_tokenizer"]

LOG = logging.getLogger(__name__)
_MEAN_BLOCK_ROWS = 1024  # the padding mean's summation blocks: fixed, whatever the chunking


@dataclass(frozen=True, eq=False)
class PermutedRows:
    """A vocabulary tensor read in the output's vocabulary: row ``i`` is the model's row
    ``rows[i]``, or (``rows[i] < 0``) the default row ``extra[-1 - rows[i]]`` (bits of the
    source's dtype)."""

    source: Source
    rows: np.ndarray  # int64, one per output row
    extra: np.ndarray  # (k, hidden) bits

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def path(self) -> str:
        return self.source.path

    @property
    def dtype(self) -> DType:
        return self.source.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),) + tuple(self.source.shape[1:])

    def cropped(self, shape: tuple[int, ...]) -> PermutedRows:
        return replace(self, rows=self.rows[:shape[0]])

    def read(self, start: int, stop: int) -> np.ndarray:
        width = math.prod(self.source.shape[1:])
        r0, r1 = start // width, -(-stop // width)
        rows = self.rows[r0:r1]
        out = np.empty((r1 - r0, width), self.extra.dtype)
        neg = rows < 0
        if neg.any():
            out[neg] = self.extra[-1 - rows[neg]]
        pos = np.flatnonzero(~neg)
        if pos.size:  # runs of consecutive rows, one read each
            breaks = np.flatnonzero((np.diff(pos) != 1) | (np.diff(rows[pos]) != 1)) + 1
            for run in np.split(pos, breaks):
                a, b = int(rows[run[0]]), int(rows[run[-1]]) + 1
                out[run[0]:run[-1] + 1] = self.source.read(a * width, b * width).reshape(b - a, width)
        return out.reshape(-1)[start - r0 * width:stop - r0 * width]


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path)


def _config_vocab_size(model: Model | None) -> int | None:
    path = model.side_files.get("config.json") if model is not None else None
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    value = doc.get("vocab_size") if isinstance(doc, dict) else None
    if value is None and isinstance(doc, dict) and isinstance(doc.get("text_config"), dict):
        value = doc["text_config"].get("vocab_size")
    return value if isinstance(value, int) and value > 0 else None


def _load(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_folder(path), use_fast=True)


def stripped_tokenizer(path: str, vocab_size: int | None):
    """mergekit's ``get_stripped_tokenizer``: the tokenizer without tokens at ids >= vocab_size."""
    import tokenizers

    tok = _load(path)
    vocab_size = vocab_size or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    if not tok.is_fast:
        raise ParameterError(f"{tensor_context(path)}: the tokenizer has tokens past vocab_size and no fast "
                             "tokenizer: it cannot be stripped for a tokenizer merge")
    doc = json.loads(tok._tokenizer.to_str())
    if doc["model"]["type"] != "BPE":
        raise ParameterError(f"{tensor_context(path)}: the tokenizer has tokens past vocab_size and is a "
                             f"{doc['model']['type']} model: only BPE can be stripped (as mergekit)")
    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        doc["model"]["vocab"].pop(t, None)

    def keep(m) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return tok


def build_union_tokenizer(base_tok, toks: list[tuple[Any, int]]):
    """mergekit's ``build_union_tokenizer``: toks is [(tokenizer, vocab_size)], the base's first."""
    import transformers

    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for tok, vocab_size in toks:
        added = tok.added_tokens_decoder
        added_content = {info.content for info in added.values()}
        for t, i in tok.get_vocab().items():
            if i >= vocab_size or t in added_content:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < vocab_size and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as p:  # a copy: the base's tokenizer is left as it is
        base_tok.save_pretrained(p)
        res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


class VocabPlan:
    """The output tokenizer, each model's permutation, and how each vocabulary row is made."""

    def __init__(self, cfg: MergeConfig, tokenizer, permutations: dict[str, np.ndarray] | None,
                 vocabs: dict[str, dict[str, int]], base: str):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.permutations = permutations  # None: the tokenizer is only re-saved (a chat_template alone)
        self.vocabs = vocabs
        self.base = base
        self.vocab = tokenizer.get_vocab()
        self.tokens: dict[str, TokenSource] = dict(cfg.tokenizer.tokens) if cfg.tokenizer else {}
        pad = cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer else None
        n = len(self.vocab)
        self.rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad

    def config_updates(self) -> dict[str, Any]:
        return {"vocab_size": self.rows} if self.permutations is not None else {}

    def is_vocab(self, name: str, ref: Source) -> bool:
        return (self.permutations is not None and len(ref.shape) == 2
                and any(fnmatch.fnmatchcase(name, p) for p in DEFAULT_KEEP_EXACT))

    def save(self, folder: str) -> None:
        self.tokenizer.save_pretrained(folder)

    def permute(self, name: str, paths: list[str], sources: list[Source], base: str | None) -> list[PermutedRows]:
        """Each model's tensor ``name`` in the output vocabulary (paths: the models of the tensor)."""
        assert self.permutations is not None
        tokens = list(self.vocab.items())
        perms = np.stack([self.permutations[p] for p in paths])
        for p, src, perm in zip(paths, sources, perms):
            if perm.size and perm.max() >= src.shape[0]:
                tok = tokens[int(np.argmax(perm))][0]
                raise MismatchError(f"{tensor_context(src.path, name)}: token {tok!r} has id {perm.max()} in the "
                                    f"tokenizer of '{p}', past the tensor's {src.shape[0]} rows")
        configs, average = self._assign(name, tokens, perms, paths, base)
        defaults = self._defaults(name, tokens, configs, average, paths, sources, perms)
        return [self._model_rows(tokens, configs, defaults, src, perm, p)
                for src, perm, p in zip(sources, perms, paths)]

    def _assign(self, name: str, tokens: list[tuple[str, int]], perms: np.ndarray, paths: list[str],
                base: str | None) -> tuple[dict[str, TokenSource], set[str]]:
        """mergekit's ``assign_embedding_sources``: each token's source where a model lacks it."""
        configs = dict(self.tokens)
        average = set()
        for token, tid in tokens:
            if token in configs:
                continue
            has = perms[:, tid] >= 0
            count = int(has.sum())
            if count == 1:
                configs[token] = TokenSource("model", paths[int(np.argmax(has))])
            elif count == 0:
                configs[token] = TokenSource("zero")
                warnings.warn(f"token {token!r} is in no model's vocabulary: its rows of '{name}' are zero",
                              DeltastreamWarning, stacklevel=2)
            elif base in paths and perms[paths.index(base), tid] >= 0:
                configs[token] = TokenSource("model", base)
            else:
                average.add(token)
        return configs, average

    def _defaults(self, name: str, tokens: list[tuple[str, int]], configs: dict[str, TokenSource], average: set[str],
                  paths: list[str], sources: list[Source], perms: np.ndarray) -> dict[str, np.ndarray]:
        """The default rows (float32, rounded to the dtype) of the tokens a model lacks or that are forced."""
        dtype = _promoted([s.dtype for s in sources])
        width = math.prod(sources[0].shape[1:])
        defaults: dict[str, np.ndarray] = {}  # token -> float32 row (rounded to dtype)
        for token, tid in tokens:
            cfg = configs.get(token)
            forced = cfg is not None and cfg.force
            if not forced and (perms[:, tid] >= 0).all():
                continue
            if token in average:
                acc = np.zeros(width, np.float32)
                count = 0
                for k in np.flatnonzero(perms[:, tid] >= 0):
                    acc = _round(acc + self._row(sources[k], int(perms[k, tid])), dtype)
                    count += 1
                defaults[token] = _round(acc / np.float32(count), dtype)
            elif cfg is not None:
                defaults[token] = self._default(name, token, tid, cfg, paths, sources, perms, width)
        return defaults

    def _model_rows(self, tokens: list[tuple[str, int]], configs: dict[str, TokenSource],
                    defaults: dict[str, np.ndarray], src: Source, perm: np.ndarray, path: str) -> PermutedRows:
        """One model's rows: its own where it has the token (not forced), else the default."""
        n = len(tokens)
        width = math.prod(src.shape[1:])
        rows = np.empty(self.rows, np.int64)
        extra: list[np.ndarray] = []
        rows[:n] = perm
        for token, tid in tokens:
            cfg = configs.get(token)
            if rows[tid] >= 0 and not (cfg is not None and cfg.force):
                continue
            if token in defaults:
                extra.append(defaults[token])
            else:
                LOG.error("no embedding for token %r in model %s", token, path)
                extra.append(np.zeros(width, np.float32))
            rows[tid] = -len(extra)
        bits = np.stack(extra) if extra else np.zeros((0, width), np.float32)
        permuted = PermutedRows(src, rows, _bits(bits, src.dtype))
        if self.rows > n:  # mergekit: the padding rows are the mean row
            mean = _mean_row(replace(permuted, rows=rows[:n]), width)
            bits = np.concatenate([bits, mean[None, :]])
            rows[n:] = -len(bits)
            permuted = PermutedRows(src, rows, _bits(bits, src.dtype))
        return permuted

    @staticmethod
    def _row(source: Source, row: int) -> np.ndarray:
        width = math.prod(source.shape[1:])
        bits = source.read(row * width, (row + 1) * width)
        return to_float32(bits, source.dtype, out=np.empty(width, np.float32))

    def _default(self, name: str, token: str, tid: int, cfg: TokenSource, paths: list[str], sources: list[Source],
                 perms: np.ndarray, width: int) -> np.ndarray:
        """mergekit's ``compute_default_embedding``."""
        where = self.cfg.where("tokenizer", "tokens", token)
        if cfg.kind == "zero":
            return np.zeros(width, np.float32)
        if cfg.kind is None or cfg.model is None:
            raise ParameterError(f"{where}: token {token!r} is missing from a model and its entry names no source")
        if cfg.model not in paths:
            raise ParameterError(f"{where}: token {token!r} takes its row from a model that does not take part in "
                                 f"tensor '{name}' ({cfg.model})")
        k = paths.index(cfg.model)
        if cfg.kind == "model_token":
            row = cfg.token_id
            if row is None:
                row = self.vocabs.get(cfg.model, self.vocabs[self.base]).get(cfg.token or "")
                if row is None:
                    raise ParameterError(f"{where}: token {cfg.token!r} is not in the vocabulary of {cfg.model}")
            if not 0 <= row < sources[k].shape[0]:
                raise ParameterError(f"{where}: token_id {row} is out of range for {cfg.model} "
                                     f"({sources[k].shape[0]} rows)")
            return self._row(sources[k], row)
        if perms[k, tid] < 0:
            raise ParameterError(f"{where}: token {token!r} is not in the vocabulary of {cfg.model}")
        return self._row(sources[k], int(perms[k, tid]))


def _promoted(dtypes: list[DType]) -> DType:
    """torch's promotion of the models' dtypes (float32 if they differ)."""
    from ..dtypes import DTYPES

    return dtypes[0] if all(d.name == dtypes[0].name for d in dtypes) else DTYPES["F32"]


def _round(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values rounded to ``dtype`` (the torch arithmetic of mergekit in that dtype)."""
    if not dtype.computable or dtype.name == "F32":
        return values.astype(np.float32)
    bits = from_float32(np.ascontiguousarray(values, np.float32), dtype, out=np.empty(values.size, dtype.bits))
    return to_float32(bits, dtype, out=np.empty(values.size, np.float32))


def _bits(rows: np.ndarray, dtype: DType) -> np.ndarray:
    flat = np.ascontiguousarray(rows, np.float32).reshape(-1)
    return from_float32(flat, dtype, out=np.empty(flat.size, dtype.bits)).reshape(rows.shape)


def _mean_row(source: PermutedRows, width: int) -> np.ndarray:
    """The mean of the rows, summed in float64 in fixed blocks of rows, rounded once."""
    n = source.shape[0]
    total = np.zeros(width, np.float64)
    for a in range(0, n, _MEAN_BLOCK_ROWS):
        b = min(n, a + _MEAN_BLOCK_ROWS)
        block = to_float32(source.read(a * width, b * width), source.dtype, out=np.empty((b - a) * width, np.float32))
        total += block.reshape(b - a, width).astype(np.float64).sum(axis=0)
    return (total / max(n, 1)).astype(np.float32)


def build_vocab_plan(cfg: MergeConfig, reference: Model, models: dict[str, Model], base: str) -> VocabPlan:
    """The tokenizer of a config's ``tokenizer`` (or legacy ``tokenizer_source``) and
    ``chat_template``; models: path as in the config -> opened model (the base, ``base``, included)."""
    spec = cfg.tokenizer
    key = (spec.key,) if spec and spec.key == "tokenizer_source" else ("tokenizer", "source")
    base_size = _config_vocab_size(reference)
    try:
        base_tok = stripped_tokenizer(base, base_size)
    except ParameterError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        what = cfg.where(*key) if spec else cfg.where("chat_template")
        raise ParameterError(f"{what}: cannot load the tokenizer of {_folder(base)}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    toks: dict[str, Any] = {base: base_tok}
    for path in models:
        if path == base or path in toks:
            continue
        try:
            toks[path] = _load(path)
        except Exception:  # noqa: BLE001 - as mergekit: a model without one is taken to use the base's
            LOG.warning("no tokenizer for %s: taken to be the base's", path)
    if spec is None:  # a chat_template alone: the base's tokenizer, re-saved with it
        tokenizer, permutations = base_tok, None
    else:
        tokenizer = _output_tokenizer(cfg, key, base_tok, toks, models)
        vocab = tokenizer.get_vocab()
        permutations = {}
        for path, model in models.items():
            mv = (toks.get(path) or base_tok).get_vocab()
            size = _config_vocab_size(model) or len(mv)
            perm = np.full(len(vocab), -1, np.int64)
            for tok, new in vocab.items():
                old = mv.get(tok)
                if old is not None and old < size:
                    perm[new] = old
            permutations[path] = perm
    _set_chat_template(cfg, tokenizer, toks)
    return VocabPlan(cfg, tokenizer, permutations, {p: t.get_vocab() for p, t in toks.items()}, base)


def _output_tokenizer(cfg: MergeConfig, key: tuple, base_tok, toks: dict[str, Any], models: dict[str, Model]):
    """mergekit's output tokenizer: the base's, the union, or a model's; then the ``tokens:`` added."""
    spec = cfg.tokenizer
    assert spec is not None
    if spec.source == "base":
        tokenizer = base_tok
    elif spec.source == "union":
        tokenizer = build_union_tokenizer(base_tok, [(t, _config_vocab_size(models.get(p)) or len(t.get_vocab()))
                                                     for p, t in toks.items()])
    else:
        try:
            tokenizer = _load(spec.source)
        except Exception as exc:  # noqa: BLE001
            raise ParameterError(f"{cfg.where(*key)}: cannot load the tokenizer of {spec.source_ref}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    existing = set(tokenizer.get_vocab())
    for tok in spec.tokens:
        if tok not in existing:
            tokenizer.add_tokens(tok)
            existing.add(tok)
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= len(vocab):
        raise ParameterError(f"{cfg.where(*key)}: the output tokenizer's ids are not 0..{len(vocab) - 1}")
    return tokenizer


def _set_chat_template(cfg: MergeConfig, tokenizer, toks: dict[str, Any]) -> None:
    """mergekit's ``_set_chat_template``: auto (the models' most common), built-in, or the text."""
    template = cfg.chat_template
    if not template:
        return
    if template == "auto":
        found = []
        for tok in toks.values():
            t = tok.chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        if not found:
            return
        template = Counter(found).most_common(1)[0][0]
    else:
        template = builtin_template(template) or template
    tokenizer.chat_template = template
