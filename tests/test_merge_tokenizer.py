"""merge with mergekit's tokenizer sources: ``tokenizer: {source: base | union | MODEL, tokens,
pad_to_multiple_of}``, the legacy ``tokenizer_source`` and ``chat_template``; each model's
embedding and head rows placed in the output vocabulary as mergekit's PermutedVocabulary does,
the tokenizer saved with the union vocabulary, compared with mergekit where it runs offline."""

import json
import os

import numpy as np
import pytest
from test_merge_slices import run_mergekit

import deltastream as ds

from common import error_line, read_raw, run_cli, tensor_f32

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A/ and B/: tiny Llamas (40 rows) whose tokenizers share the word vocabulary and add
    different tokens: A <a1>, <both>; B <b1>, <both>, <b2> (so <both> has different ids)."""
    import torch
    from llama_kit import llama_config, make_tokenizer, save_llama
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tok")
    for name, added, seed in (("A", ["<a1>", "<both>"], 0), ("B", ["<b1>", "<both>", "<b2>"], 1)):
        tok = make_tokenizer()
        tok.add_tokens(added)
        if name == "B":
            tok.chat_template = TEMPLATE
        torch.manual_seed(seed)
        save_llama(LlamaForCausalLM(llama_config(vocab=40, layers=2, tie=False)), str(root / name), tok)
    return root


def write(root, name, text):
    path = root / name
    for key in ("model: ", "base_model: ", "source: "):
        text = text.replace(key + "A", f"{key}{root / 'A'}").replace(key + "B", f"{key}{root / 'B'}")
    path.write_text(text)
    return str(path)


def vocab(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


UNION = """merge_method: linear
base_model: A
models:
  - model: A
    parameters: {weight: 1.0}
  - model: B
    parameters: {weight: 0.0}
parameters: {normalize: false}
tokenizer: {source: union}
dtype: float32
"""


def test_union_places_each_models_rows_as_mergekit(pair, tmp_path):
    cfg = write(pair, "union.yaml", UNION)
    out = ds.merge(cfg, str(tmp_path / "out"))
    va, vb, vu = vocab(str(pair / "A")), vocab(str(pair / "B")), vocab(out)
    assert set(vu) == set(va) | set(vb) and len(vu) == len(set(va) | set(vb))
    assert all(vu[t] == i for t, i in va.items())  # the base's ids kept; the others appended
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == len(vu)
    for name in VOCAB_TENSORS:  # weight 1 on A, 0 on B: the output is A's permuted rows exactly
        a, b, got = tensor_f32(str(pair / "A"), name), tensor_f32(str(pair / "B"), name), tensor_f32(out, name)
        assert got.shape == (len(vu), a.shape[1])
        for tok, i in vu.items():
            # in A: A's row (<both> too, at A's id); in B only (<b1>, <b2>): B's row, at its id in B
            expected = a[va[tok]] if tok in va else b[vb[tok]]
            assert np.array_equal(got[i], expected), (name, tok)
    for kw in ({"chunk_size": 256, "scheduler": "sync"}, {"chunk_size": 100, "workers": 3}):
        assert read_raw(ds.merge(cfg, str(tmp_path / "inv"), overwrite=True, **kw)) == read_raw(out), kw


def test_union_with_overrides_and_padding_equals_mergekit(pair, tmp_path):
    cfg = write(pair, "over.yaml", UNION.replace("tokenizer: {source: union}", """tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    "<b2>": {source: {kind: zero}}
    "<new>": {source: {kind: model_token, model: B, token: "<b1>"}}
    "<both>": {source: B, force: true}"""))
    out = ds.merge(cfg, str(tmp_path / "out"))
    vu = vocab(out)
    n = len(vu)
    assert "<new>" in vu and json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 48 > n
    va, vb = vocab(str(pair / "A")), vocab(str(pair / "B"))
    for name in VOCAB_TENSORS:  # weight 1 on A: A's permuted rows
        a, b, got = tensor_f32(str(pair / "A"), name), tensor_f32(str(pair / "B"), name), tensor_f32(out, name)
        assert got.shape[0] == 48
        assert not got[vu["<b2>"]].any()  # A lacks it: its row is the configured zero
        assert np.array_equal(got[vu["<new>"]], b[vb["<b1>"]])  # in no model: B's row of <b1>
        assert np.array_equal(got[vu["<both>"]], b[vb["<both>"]])  # forced: B's row, though A has one
        assert np.array_equal(got[vu["<a1>"]], a[va["<a1>"]])
        assert np.array_equal(got[n], got[:n].astype(np.float64).mean(0).astype(np.float32))  # the mean row
        assert (got[n:] == got[n]).all()
    for kw in ({"chunk_size": 256, "scheduler": "sync"}, {"chunk_size": 64, "workers": 3}):
        assert read_raw(ds.merge(cfg, str(tmp_path / "inv"), overwrite=True, **kw)) == read_raw(out), kw
    mk = str(tmp_path / "mergekit")
    if not run_mergekit(cfg, mk):
        pytest.skip("mergekit does not run here")
    assert vocab(mk) == vu
    for name in VOCAB_TENSORS:  # the vocabulary's rows bit for bit; the padding (a mean) to float32 rounding
        x, y = tensor_f32(out, name), tensor_f32(mk, name)
        assert np.array_equal(x[:n], y[:n]), name
        assert np.allclose(x[n:], y[n:], rtol=1e-5, atol=1e-7), name


def test_base_model_and_legacy_sources(pair, tmp_path):
    va, vb = vocab(str(pair / "A")), vocab(str(pair / "B"))
    b = tensor_f32(str(pair / "B"), "lm_head.weight")
    base_cfg = UNION.replace("{weight: 1.0}", "{weight: W}").replace("{weight: 0.0}", "{weight: 1.0}")
    base_cfg = base_cfg.replace("W", "0.0")
    for key, source, expect in (("tokenizer: {source: base}", "A", va), ("tokenizer_source: B", "B", vb),
                                ("tokenizer_source: union", "union", {**va, **vb})):
        out = ds.merge(write(pair, f"src-{source}.yaml", base_cfg.replace("tokenizer: {source: union}", key)),
                       str(tmp_path / source))
        got_vocab = vocab(out)
        assert set(got_vocab) == set(expect)
        got = tensor_f32(out, "lm_head.weight")  # weight 1 on B: B's rows, placed by token
        for tok, i in got_vocab.items():
            if tok in vb:
                assert np.array_equal(got[i], b[vb[tok]]), (source, tok)
    legacy = ds.merge(write(pair, "legacy-union.yaml", UNION.replace("tokenizer: {source: union}",
                                                                     "tokenizer_source: union")), str(tmp_path / "l"))
    new = ds.merge(write(pair, "new-union.yaml", UNION), str(tmp_path / "n"))
    assert read_raw(legacy) == read_raw(new)


def test_chat_template(pair, tmp_path):
    from transformers import AutoTokenizer

    out = ds.merge(write(pair, "tpl.yaml", UNION.replace("tokenizer: {source: union}", f'chat_template: "{TEMPLATE}"')),
                   str(tmp_path / "text"))
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    assert read_raw(out)["lm_head.weight"] == read_raw(str(pair / "A"))["lm_head.weight"]  # rows untouched
    out = ds.merge(write(pair, "auto.yaml", UNION.replace("source: union", "source: base") + "chat_template: auto\n"),
                   str(tmp_path / "auto"))
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE.strip()  # B's: the only one


@pytest.mark.parametrize("extra, key, message", [
    ("tokenizer: {source: nowhere}", "tokenizer", "tokenizer source model 'nowhere' not found"),
    ("tokenizer:\n  tokens: {\"<x>\": {source: nowhere}}", "tokenizer", "source model 'nowhere' is not a model"),
    ("tokenizer: {source: union}\ntokenizer_source: union", "tokenizer", "give 'tokenizer' or the legacy"),
    ("tokenizer: {pad_to_multiple_of: 0}", "tokenizer", "pad_to_multiple_of must be an integer >= 1, not 0"),
    ("tokenizer:\n  tokens: {\"<x>\": {source: {kind: model_token, model: B}}}", "tokenizer",
     "a model_token source takes one of token or token_id"),
    ("chat_template: hi", "chat_template", "invalid chat_template 'hi'"),
])
def test_tokenizer_errors_are_one_line(pair, capsys, extra, key, message):
    path = write(pair, f"bad-{abs(hash(extra)) % 10**8}.yaml", UNION.replace("tokenizer: {source: union}\n", "")
                 + extra + "\n")
    out = pair / "never"
    assert run_cli("merge", path, "-o", out, "-q") == 2
    line = error_line(capsys)
    assert f"file '{path}' line" in line and message in line, line
    assert not out.exists() and not (pair / "never.partial").exists()
