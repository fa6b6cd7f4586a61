"""VariantBank: mixed batches from compressed deltas equal the models ``apply`` rebuilds.

A tiny transformers Llama (tests/llama_kit.py, no download) and a fine-tune of it (every weight,
norms included, perturbed), compressed with several methods; each variant's reference is the
checkpoint ``apply`` writes from its artifact (BitDelta and DARE are lossy: the bank must give
what apply gives, not the fine-tune). float32: logits within 1e-5 relative; bf16: the bank adds
the delta in float32 where apply rounds the rebuilt weight to bf16, so logits differ by the bf16
rounding of the weights carried through the net (docs/serve.md; bound checked loosely below).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from llama_kit import make_llama_pair, save_llama  # noqa: E402

import deltastream as ds  # noqa: E402
from deltastream.errors import ParameterError, WrongBaseError  # noqa: E402
from deltastream.methods.base import Method  # noqa: E402
from deltastream.serve import UnknownVariantError, VariantBank  # noqa: E402
from deltastream.serve.bank import _Chunks  # noqa: E402
from deltastream.serve.forms import CodebookDelta, DenseDelta, SignDelta, SparseDelta  # noqa: E402
from deltastream.serve.kernels import SIGNS, decode_signs, sign_products  # noqa: E402
from deltastream.serve.layers import LUT_MAX_TOKENS, DenseOnDevice, SignOnDevice, linear_delta, to_device  # noqa: E402
from deltastream.sources import open_model  # noqa: E402

from common import make_pair  # noqa: E402

#: name -> (method, params): every serving form, and both a sparse and a dense DARE
VARIANTS = {
    "bd": ("bitdelta", {}),
    "bd_row": ("bitdelta", {"per": "row", "residual": 1}),
    "bd_keep": ("bitdelta", {"zero": "keep"}),
    "mb": ("multibit", {"bits": 2}),
    "dare": ("dare", {"p": 0.9}),
    "dare_dense": ("dare", {"p": 0.3}),
    "ll": ("lossless", {}),
}


def _perturb_norms(ft_dir: str, seed: int = 5) -> None:
    """The fine-tune's norm gains changed too (1-D: stored exact, served per row)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_llama(model, ft_dir)


def _load(folder: str, dtype=None):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {})).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bank"))
    base, ft = make_llama_pair(root, scale=0.02)
    _perturb_norms(ft)
    artifacts, refs = {}, {}
    for name, (method, params) in VARIANTS.items():
        artifacts[name] = ds.compress(base, ft, os.path.join(root, f"{name}.dsz"), method=method, **params)
        refs[name] = _load(ds.apply(base, artifacts[name], os.path.join(root, f"{name}.out")))
    refs[None] = _load(base)
    bank = VariantBank.from_pretrained(base, device="cpu")
    for name, path in artifacts.items():
        bank.add(name, path)
    return {"root": root, "base": base, "ft": ft, "artifacts": artifacts, "refs": refs, "bank": bank}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ids(rows: int, seq: int = 9, seed: int = 0):
    return torch.randint(4, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", [*VARIANTS, None])
def test_single_variant_logits_equal_apply(zoo, name):
    ids = _ids(2)
    got = zoo["bank"].logits(ids, [name, name])
    with torch.no_grad():
        want = zoo["refs"][name](ids).logits
    assert _rel(got, want) < 1e-5


def test_mixed_batch_logits_equal_apply(zoo):
    names = [*VARIANTS, None, "bd"]
    ids = _ids(len(names), seed=1)
    got = zoo["bank"].logits(ids, names)
    for i, name in enumerate(names):
        with torch.no_grad():
            want = zoo["refs"][name](ids[i:i + 1]).logits[0]
        assert _rel(got[i], want) < 1e-5, name


def test_greedy_generate_left_padded_same_tokens(zoo):
    names = ["bd", "dare", None, "ll", "mb"]
    ids = _ids(len(names), seq=7, seed=2)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((3, 0, 1, 5, 2)):  # left padding of different lengths
        ids[row, :pad], mask[row, :pad] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = zoo["bank"].generate(ids, names, **kw)
    for i, name in enumerate(names):
        want = zoo["refs"][name].generate(ids, **kw)
        assert got[i].tolist() == want[i].tolist(), name


def test_generate_sampling_and_copies_per_row(zoo):
    """Copies of a row (num_return_sequences, beams) keep its variant; sampling options pass through."""
    ids = _ids(2, seed=3)
    torch.manual_seed(0)
    out = zoo["bank"].generate(ids, ["bd", None], do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=3,
                               num_return_sequences=2, pad_token_id=0)
    assert out.shape == (4, ids.shape[1] + 3)
    kw = dict(do_sample=False, num_beams=2, num_return_sequences=2, max_new_tokens=3, pad_token_id=0)
    beams = zoo["bank"].generate(ids, ["bd", "ll"], **kw)  # beam search: rows copied per beam
    for i, name in enumerate(["bd", "ll"]):
        want = zoo["refs"][name].generate(ids[i:i + 1], **kw)
        assert beams[2 * i:2 * i + 2].tolist() == want.tolist(), name


def test_use_equals_variant_and_restores_base_bits(zoo):
    bank = zoo["bank"]
    before = {n: p.detach().clone() for n, p in bank.model.named_parameters()}
    ids = _ids(2, seed=4)
    for name in VARIANTS:
        with bank.use(name) as model, torch.no_grad():
            assert model is bank.model
            assert _rel(model(ids).logits, zoo["refs"][name](ids).logits) < 1e-5
            if name in ("bd", "bd_row", "ll"):  # BitDelta's switch does apply's arithmetic: the same bits
                ref = dict(zoo["refs"][name].named_parameters())
                assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters()), name
            with pytest.raises(ParameterError, match="not inside use"):
                bank.logits(ids, [name, None])
    assert all(torch.equal(before[n], p) for n, p in bank.model.named_parameters())
    with torch.no_grad():  # and plain calls outside are the base again
        assert torch.equal(bank.model(ids).logits, zoo["refs"][None](ids).logits)


def test_memory_one_bit_variant_is_small(zoo):
    bank = zoo["bank"]
    mem = bank.memory()
    model = bank.model
    tensors = [*model.parameters(), *model.buffers()]  # a tied weight once
    assert mem["base"] == sum(t.numel() * t.element_size() for t in tensors)
    embed = model.get_input_embeddings().weight
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight is not embed]
    norms = [p for p in model.parameters() if p.dim() == 1]
    one_bit = sum(w.shape[0] * math.ceil(w.shape[1] / 8) + 4 * w.shape[0] for w in linears)
    exact = 4 * (embed.numel() + sum(p.numel() for p in norms))  # stored exact: dense float32 deltas
    assert mem["bd"] == one_bit + exact
    assert mem["bd"] - exact < (mem["base"] - exact) / 10  # 1 bit + a float32 scale per row (32 columns here)
    assert mem["dare"] < mem["ll"] and mem["ll"] <= mem["base"]


def test_wrong_base_refused_with_one_line(zoo, tmp_path, capsys):
    other, other_ft = make_llama_pair(str(tmp_path), seed=7)
    wrong = ds.compress(other, other_ft, str(tmp_path / "other.dsz"), method="bitdelta")
    bank = zoo["bank"]
    with pytest.raises(WrongBaseError) as err:
        bank.add("other", wrong)
    assert "\n" not in str(err.value) and "wrong base" in str(err.value)
    assert "other" not in bank.names
    with pytest.raises(ParameterError, match="already in the bank"):
        bank.add("bd", zoo["artifacts"]["bd"])
    with pytest.raises(ds.errors.ArtifactError, match="not a deltastream artifact"):
        bank.add("x", zoo["base"])


def test_remove_and_unknown_names(zoo):
    bank = VariantBank.from_pretrained(zoo["base"], device="cpu", dtype="float32")
    bank.add("a", zoo["artifacts"]["bd"])
    bank.add("b", zoo["artifacts"]["ll"])
    assert bank.names == ["a", "b"] and set(bank.memory()) == {"base", "a", "b"}
    with pytest.raises(UnknownVariantError, match="unknown variant 'zzz'"):
        bank.logits(_ids(1), ["zzz"])
    with pytest.raises(KeyError):
        bank.remove("zzz")
    with pytest.raises(ParameterError, match="one per row"):
        bank.logits(_ids(2), ["a"])
    bank.remove("a")
    assert bank.names == ["b"]
    ids = _ids(1)
    with torch.no_grad():
        assert _rel(bank.logits(ids, ["b"]), zoo["refs"]["ll"](ids).logits) < 1e-5
    bank.remove("b")
    assert bank.names == [] and all(not m._forward_hooks for m in bank.model.modules())  # no hook left


def test_bf16_bank_within_bound(tmp_path):
    """bf16: the bank's base + delta (added in float32, never rounded) vs apply's rebuilt bf16
    weights: the logits agree to a few percent of their range (bf16 has 8 significant bits)."""
    base, ft = make_llama_pair(str(tmp_path), scale=0.02, dtype="bfloat16")
    bank = VariantBank.from_pretrained(base, device="cpu")
    assert bank.dtype == torch.bfloat16
    ids = _ids(3, seed=5)
    names = ["bd", "ll", None]
    refs = {}
    for name, method in (("bd", "bitdelta"), ("ll", "lossless")):
        art = ds.compress(base, ft, str(tmp_path / f"{name}.dsz"), method=method)
        bank.add(name, art)
        refs[name] = _load(ds.apply(base, art, str(tmp_path / f"{name}.out")))
    got = bank.logits(ids, names)
    for i, name in enumerate(names[:2]):
        with bank.use(name) as model, torch.no_grad():  # switching: apply's bits exactly
            assert torch.equal(model(ids).logits, refs[name](ids).logits)
            want = refs[name](ids[i:i + 1]).logits[0]
        assert _rel(got[i].float(), want.float()) < 0.05


def _forms_pair(tmp_path):
    """Rows of 13 and 20 columns (not whole bytes) and chunks of one row: the repacking path."""
    return make_pair(str(tmp_path), {"a.weight": ("F32", (6, 13)), "b.weight": ("BF16", (5, 20)),
                                     "c.weight": ("F32", (4, 16))}, seed=3)


@pytest.mark.parametrize("method,params,form", [
    ("bitdelta", {}, SignDelta), ("bitdelta", {"per": "row", "residual": 2, "zero": "keep"}, SignDelta),
    ("multibit", {"bits": 3}, CodebookDelta), ("dare", {"p": 0.7}, SparseDelta),
    ("dare", {"p": 0.5, "k": 0.5}, DenseDelta), ("lossless", {}, DenseDelta)])
def test_serving_forms_equal_the_decoded_delta(tmp_path, method, params, form):
    from deltastream.checkpoint import open_checkpoint

    base, ft = _forms_pair(tmp_path)
    art = ds.compress(base, ft, str(tmp_path / "x.dsz"), method=method, chunk_size=64, **params)
    model = open_model(art, open_checkpoint(base))
    for source in model.tensors.values():
        chunks = _Chunks(source)
        got = source.method.serving_form(chunks)
        decoded = Method.serving_form(source.method, chunks).dense()  # the default: the decoded delta, dense
        assert isinstance(got, form)
        assert got.dense().shape == decoded.shape
        ulp = 2.0 ** (-8 if source.dtype.name == "BF16" else -23) * 0.2  # the rebuilt weight's rounding (|w| < 0.2)
        np.testing.assert_allclose(got.dense(), decoded, rtol=0, atol=ulp)
        on_device = to_device(got, torch.device("cpu"), torch.float32)
        assert torch.equal(on_device.dense(), torch.from_numpy(got.dense().astype(np.float32)))
        x = torch.randn(3, got.dense().reshape(-1, source.entry.shape[-1]).shape[1])
        want = x @ torch.from_numpy(got.dense().reshape(-1, x.shape[1])).T
        torch.testing.assert_close(on_device.matmul(x), want, rtol=1e-5, atol=1e-6)


def _random_signs(rng, variants, levels, rows, cols):
    bits = [rng.random((levels, rows, cols)) < 0.5 for _ in range(variants)]
    alphas = [rng.random((levels, rows)).astype(np.float32) for _ in range(variants)]
    return bits, alphas


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), variants=st.integers(1, 3), levels=st.integers(1, 2), rows=st.integers(1, 40),
       cols=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_sign_products_equal_dense_reference(n, variants, levels, rows, cols, seed):
    """Each token against its own variant's planes, any rows range: the dense product, float64."""
    from numba.typed import List

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    bits, alphas = _random_signs(rng, variants, levels, rows, cols)
    tokens = rng.permutation(n)[:max(1, n - 1)].astype(np.int64)  # one token may be served by none
    which = rng.integers(0, variants, tokens.size).astype(np.int64)
    lo = int(rng.integers(0, rows))
    out = np.full((n, rows), 7.0, np.float32)
    sign_products(x, tokens, which, List([np.packbits(b, axis=2) for b in bits]), List(alphas), out, lo, rows,
                  np.empty(((cols + 7) // 8, 256), np.float32))
    for t, v in zip(tokens, which):
        dense = sum(np.where(bits[v][j], 1.0, -1.0) * alphas[v][j][:, None].astype(np.float64) for j in range(levels))
        want = x[t].astype(np.float64) @ dense.T
        np.testing.assert_allclose(out[t, lo:], want[lo:], rtol=0, atol=1e-5 * (1 + np.abs(x[t]).sum() * levels))
        assert (out[t, :lo] == 7.0).all()  # rows outside [lo, rows) untouched
    for t in set(range(n)) - set(tokens.tolist()):
        assert (out[t] == 7.0).all()


@settings(max_examples=30, deadline=None)
@given(levels=st.integers(1, 3), rows=st.integers(1, 20), cols=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_decode_signs_equals_form_dense(levels, rows, cols, seed):
    rng = np.random.default_rng(seed)
    bits, alphas = _random_signs(rng, 1, levels, rows, cols)
    planes = np.packbits(bits[0], axis=2)
    form = SignDelta((rows, cols), tuple(planes), alphas[0])
    out = np.empty((rows, cols), np.float32)
    decode_signs(planes, alphas[0], SIGNS, out)
    assert np.array_equal(out, form.dense())  # the same sums, in the same order: the same bits


def test_linear_delta_mixes_sign_and_other_forms():
    """One call: two sign variants through the lookup table (one on the block path, too many tokens),
    a dense one, and tokens of the base (zeros)."""
    rng = np.random.default_rng(3)
    rows, cols, m = 12, 21, 60
    bits, alphas = _random_signs(rng, 2, 1, rows, cols)
    signs = [SignOnDevice(SignDelta((rows, cols), (np.packbits(b[0], axis=1),), a), torch.device("cpu"))
             for b, a in zip(bits, alphas)]
    dense = DenseOnDevice(torch.from_numpy(rng.standard_normal((rows, cols)).astype(np.float32)))
    x = torch.from_numpy(rng.standard_normal((m, cols)).astype(np.float32))
    order = torch.from_numpy(rng.permutation(m))
    served = [order[:3], order[3:3 + LUT_MAX_TOKENS + 1], order[52:57]]  # the second: past the LUT's tokens
    got = linear_delta(x, list(zip(served, [signs[0], signs[1], dense])))
    want = torch.zeros(m, rows, dtype=torch.float64)
    for tokens, d in zip(served, [signs[0], signs[1], dense]):
        want[tokens] = x[tokens].double() @ d.dense().double().T
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    assert (got[order[57:]] == 0).all()



def test_serve_doc_states_the_lookup_table_threshold():
    """docs/serve.md quotes layers.LUT_MAX_TOKENS: the number must be the code's."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "serve.md"), encoding="utf-8").read()
    assert f"`LUT_MAX_TOKENS` = {LUT_MAX_TOKENS} tokens" in doc


def test_overlap_gives_the_sequential_bits_and_restores_threads(zoo):
    """The delta products on the bank's thread beside the base product (bank.overlap) are the same
    sums as one after the other: the same logits bit for bit; torch's thread count comes back."""
    bank, names = zoo["bank"], [*VARIANTS, None, "bd"]
    ids = _ids(len(names), seed=4)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bank.overlap = False
        sequential = bank.logits(ids, names)
        bank.overlap = True
        overlapped = bank.logits(ids, names)
        assert torch.get_num_threads() == 2
        bank.overlap = True
        out = bank.generate(ids, names, max_new_tokens=3, do_sample=False, pad_token_id=0)
        bank.overlap = False
        assert torch.equal(out, bank.generate(ids, names, max_new_tokens=3, do_sample=False, pad_token_id=0))
    finally:
        bank.overlap = True
        torch.set_num_threads(saved)
    assert torch.equal(sequential, overlapped)


def test_delta_job_shared_by_threads_equals_linear_delta():
    """Items taken by four threads in any order: each output row is written by one item."""
    import threading

    from deltastream.serve.layers import DeltaJob

    rng = np.random.default_rng(5)
    rows, cols, m = 16, 24, 40
    bits, alphas = _random_signs(rng, 3, 1, rows, cols)
    signs = [SignOnDevice(SignDelta((rows, cols), (np.packbits(b[0], axis=1),), a), torch.device("cpu"))
             for b, a in zip(bits, alphas)]
    x = torch.from_numpy(rng.standard_normal((m, cols)).astype(np.float32))
    parts = [(torch.arange(0, 5), signs[0]), (torch.arange(5, 10), signs[1]), (torch.arange(10, 30), signs[2])]
    job = DeltaJob(x, parts)
    threads = [threading.Thread(target=job.run) for _ in range(3)]
    for t in threads:
        t.start()
    job.run()
    for t in threads:
        t.join()
    assert torch.equal(job.result(), linear_delta(x, parts))
