"""Each lossy method equals a dense reference written here from the formulas (METHODS.md), for
several shapes and dtypes, and gives the same bits for any chunking; apply of an artifact equals
edit, bit for bit, for every compact method."""

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltastream as ds
from deltastream.errors import ParameterError
from deltastream.rng import tensor_key, threshold_u32, uniform_u32

from common import check_edit_matches, make_pair, read_raw, tensor_f32, write_checkpoint

SPECS = {"layers.0.mlp.w": ("BF16", (48, 40)), "layers.0.attn.w": ("F32", (33, 17)),
         "layers.1.mlp.w": ("F16", (16, 64)), "layers.0.norm": ("BF16", (40,))}
EDITED = [n for n, (_, shape) in SPECS.items() if len(shape) == 2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("pair"))
    return tmp, *make_pair(tmp, SPECS, seed=5)


def dense(pair, name):
    _, base, ft = pair
    b, f = tensor_f32(base, name), tensor_f32(ft, name)
    return b, f, f - b


def mask(name, shape, p, seed=0):
    draws = uniform_u32(tensor_key(seed, name), 0, math.prod(shape)).reshape(shape)
    return draws >= threshold_u32(p)  # True = kept


def run_edit(pair, method, tag, **kw):
    tmp, base, ft = pair
    return ds.edit(base, ft, os.path.join(tmp, tag), method, overwrite=True, **kw)


REFERENCES = {
    "dare": lambda d, n, p=0.9, **_: np.where(mask(n, d.shape, p), d * np.float32(1 / (1 - p)), 0),
    "dare_k": lambda d, n, p=0.5, k=-0.5, **_: d * np.where(mask(n, d.shape, p), np.float32((1 - k * p) / (1 - p)),
                                                          np.float32(k)),
    "dare_none": lambda d, n, p=0.3, **_: np.where(mask(n, d.shape, p), d, 0),
    "biased": lambda d, n, p=0.5, k=0.7, **_: d * np.where(d < 0, np.float32(k), np.float32((1 - k * p) / (1 - p))),
    "extrapolate": lambda d, n, alpha=0.4, **_: d * np.float32(1 + alpha),
}
CASES = {
    "dare": ("dare", {"p": 0.9}),
    "dare_k": ("dare", {"p": 0.5, "k": -0.5}),
    "dare_none": ("dare", {"p": 0.3, "rescale": "none"}),
    "biased": ("biased", {"p": 0.5, "k": 0.7}),
    "extrapolate": ("extrapolate", {"alpha": 0.4}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_elementwise_methods_equal_the_dense_reference(pair, case):
    method, params = CASES[case]
    out = run_edit(pair, method, case, chunk_size=200, **params)
    for name in EDITED:
        b, f, d = dense(pair, name)
        check_edit_matches(pair[0], pair[1], pair[2], out, name, REFERENCES[case](d, name, **params), SPECS[name][0])
    assert read_raw(out)["layers.0.norm"] == read_raw(pair[2])["layers.0.norm"]  # 1-D: exact by default


def test_dare_l1_rescale_and_bitdelta_scales_equal_the_reference(pair):
    out = run_edit(pair, "dare", "l1", p=0.6, rescale="l1")
    bd = run_edit(pair, "bitdelta", "bd", scale=1.5)
    bd_row = run_edit(pair, "bitdelta", "bdrow", per="row")
    bd_keep = run_edit(pair, "bitdelta", "bdkeep", zero="keep")
    for name in EDITED:
        b, f, d = dense(pair, name)
        keep = mask(name, d.shape, 0.6)
        factor = np.float32(np.abs(d).astype(np.float64).sum() / np.abs(d[keep]).astype(np.float64).sum())
        check_edit_matches(*pair, out, name, np.where(keep, d * factor, 0), SPECS[name][0], exact=False)
        sign = np.where(d >= 0, np.float32(1), np.float32(-1))
        alpha = np.float32(1.5 * np.abs(d).astype(np.float64).mean())
        check_edit_matches(*pair, bd, name, alpha * sign, SPECS[name][0], exact=False)
        rows = np.abs(d).astype(np.float64).mean(axis=1).astype(np.float32)[:, None]
        check_edit_matches(*pair, bd_row, name, rows * sign, SPECS[name][0], exact=False)
        nz = d != 0
        alpha_nz = np.float32(np.abs(d[nz]).astype(np.float64).mean())
        check_edit_matches(*pair, bd_keep, name, np.where(nz, alpha_nz * sign, 0), SPECS[name][0], exact=False)


def test_dare_bitdelta_equals_the_reference(pair):
    out = run_edit(pair, "dare_bitdelta", "dbd", p=0.8)
    for name in EDITED:
        b, f, d = dense(pair, name)
        keep = mask(name, d.shape, 0.8)
        alpha = np.float32(np.abs(d[keep]).astype(np.float64).mean() / 0.2)
        ref = np.where(keep, np.where(d >= 0, alpha, -alpha), 0)
        check_edit_matches(*pair, out, name, ref, SPECS[name][0], exact=False)


def test_bitdelta_residual_with_kept_zeros_equals_the_reference(pair):
    out = run_edit(pair, "bitdelta", "res_keep", residual=1, zero="keep")
    for name in EDITED:
        b, f, d = dense(pair, name)
        nz = d != 0  # of the delta itself, at every level
        sign0 = np.where(d >= 0, np.float32(1), np.float32(-1))
        alpha0 = np.float32(np.abs(d[nz]).astype(np.float64).mean())
        r1 = d - alpha0 * sign0
        sign1 = np.where(r1 >= 0, np.float32(1), np.float32(-1))
        alpha1 = np.float32(np.abs(r1[nz]).astype(np.float64).mean())
        ref = np.where(nz, alpha0 * sign0 + alpha1 * sign1, 0)
        check_edit_matches(*pair, out, name, ref, SPECS[name][0], exact=False)


def test_residual_levels_reduce_the_error_monotonically(pair):
    errors = []
    for n in range(4):
        out = run_edit(pair, "bitdelta", f"res{n}", residual=n)
        err = 0.0
        for name in EDITED:
            b, f, d = dense(pair, name)
            err += float(((tensor_f32(out, name) - f).astype(np.float64) ** 2).sum())
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_dare_statistics(tmp_path):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("F32", (512, 512))}, seed=2)
    b, f = tensor_f32(base, "layers.0.w"), tensor_f32(ft, "layers.0.w")
    d = f - b
    n = d.size
    for p in (0.1, 0.5, 0.9):
        out = ds.edit(base, ft, str(tmp_path / f"p{p}"), "dare", p=p, overwrite=True)
        e = tensor_f32(out, "layers.0.w") - b
        kept = (e != 0) & (d != 0)
        assert abs(kept.sum() / (d != 0).sum() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
        # kept entries are rescaled by exactly 1/(1-p), up to the fp32 rounding of base + delta
        err = np.abs(e[kept] - d[kept] * np.float32(1 / (1 - p)))
        assert (err <= 2.0**-22 * (np.abs(b[kept]) + np.abs(e[kept]))).all()
    for k in (-1.0, -0.5, 0.5, 0.8):  # DARE-k is unbiased: mean multiplier 1
        out = ds.edit(base, ft, str(tmp_path / f"k{k}"), "dare", p=0.5, k=k, overwrite=True)
        e = tensor_f32(out, "layers.0.w") - b
        mult = (e[d != 0] / d[d != 0]).astype(np.float64)
        spread = abs(k - (1 - k * 0.5) / 0.5) / 2  # std of the two-valued multiplier
        assert abs(mult.mean() - 1) < 6 * spread / math.sqrt(mult.size) + 1e-4


COMPACT = [("dare", {"p": 0.9}), ("dare", {"p": 0.6, "rescale": "l1"}), ("dare", {"p": 0.5, "k": 0.5}),
           ("bitdelta", {}), ("bitdelta", {"per": "row", "residual": 1}), ("bitdelta", {"zero": "keep"}),
           ("dare_bitdelta", {"p": 0.9}), ("lossless", {})]


@pytest.mark.parametrize("method,params", COMPACT)
def test_apply_of_the_artifact_equals_edit_bit_for_bit(pair, method, params):
    tmp, base, ft = pair
    tag = f"{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
    art = ds.compress(base, ft, os.path.join(tmp, tag + ".dsz"), method, seed=3, overwrite=True, **params)
    applied = ds.apply(base, art, os.path.join(tmp, tag + "-applied"), overwrite=True)
    edited = run_edit(pair, method, tag + "-edited", seed=3, **params)
    assert read_raw(applied) == read_raw(edited)
    ds.verify(art, base)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(2, 5000), workers=st.integers(1, 3),
       case=st.sampled_from([("dare", {"p": 0.7}), ("bitdelta", {"per": "row", "residual": 1}),
                             ("dare_bitdelta", {"p": 0.5}), ("dare", {"p": 0.4, "rescale": "l1"})]))
def test_lossy_outputs_do_not_depend_on_chunking_or_workers(pair, chunk, workers, case):
    method, params = case
    reference = run_edit(pair, method, f"ref-{method}", **params)
    out = run_edit(pair, method, f"inv-{method}", chunk_size=chunk, workers=workers, **params)
    assert read_raw(out) == read_raw(reference)


def test_parameters_are_checked_before_any_io(tmp_path, pair):
    _, base, ft = pair
    cases = [({"q": 1}, "unknown parameter 'q'"), ({"p": 1.5}, "p=1.5 is out of range"),
             ({"p": "lots"}, "parameter p must be float"), ({"rescale": "l2"}, "must be one of inverse, l1, none")]
    for params, message in cases:
        with pytest.raises(ParameterError, match=message):
            ds.edit(base, ft, str(tmp_path / "never"), "dare", **params)
        assert not (tmp_path / "never").exists()
    with pytest.raises(ParameterError, match="no compact form"):
        ds.compress(base, ft, str(tmp_path / "x.dsz"), "extrapolate")


def test_policy_include_exclude_and_tied_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(64 * 8) * 0.02).astype(np.float32)
    base = {"model.embed_tokens.weight": ("F32", (64, 8), w.view(np.uint8)),
            "lm_head.weight": ("F32", (64, 8), w.view(np.uint8)),
            "layers.0.mlp.w": ("F32", (64, 8), w.view(np.uint8))}
    w2 = (w + rng.standard_normal(w.size).astype(np.float32) * 1e-3).astype(np.float32)
    ft = {k: (v[0], v[1], w2.view(np.uint8)) for k, v in base.items()}
    b = write_checkpoint(str(tmp_path / "b"), base)
    f = write_checkpoint(str(tmp_path / "f"), ft, side_files={"config.json": '{"tie_word_embeddings": true}'})
    default = ds.edit(b, f, str(tmp_path / "default"), "dare", p=0.5)
    raw, fraw = read_raw(default), read_raw(f)
    assert raw["model.embed_tokens.weight"] == fraw["model.embed_tokens.weight"]  # exact by default
    assert raw["layers.0.mlp.w"] != fraw["layers.0.mlp.w"]
    inc = ds.edit(b, f, str(tmp_path / "inc"), "dare", p=0.5, include=("*embed*", "lm_head*"),
                  exclude=("layers.*",))
    raw = read_raw(inc)
    assert raw["layers.0.mlp.w"] == fraw["layers.0.mlp.w"]
    assert raw["lm_head.weight"] == raw["model.embed_tokens.weight"] != fraw["lm_head.weight"]  # one mask
    art = ds.compress(b, f, str(tmp_path / "a.dsz"), "dare", p=0.5, include=("*embed*", "lm_head*"))
    policies = {t["name"]: t["policy"] for t in ds.info(art)["tensors"]}
    assert policies == {"model.embed_tokens.weight": "dare", "lm_head.weight": "dare", "layers.0.mlp.w": "dare"}


def test_vocabulary_grown_in_the_fine_tune(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(64 * 8) * 0.02).astype("<f2").view(np.uint8)
    grown = (rng.standard_normal(70 * 8) * 0.02).astype("<f2").view(np.uint8)
    b = write_checkpoint(str(tmp_path / "b"), {"embed_tokens.weight": ("F16", (64, 8), w)})
    f = write_checkpoint(str(tmp_path / "f"), {"embed_tokens.weight": ("F16", (70, 8), grown)})
    art = ds.compress(b, f, str(tmp_path / "a.dsz"), "bitdelta", include=("*",))
    assert ds.info(art)["tensors"][0]["policy"] == "grown"
    assert read_raw(ds.apply(b, art, str(tmp_path / "out"))) == read_raw(f)


def test_every_method_module_is_registered():
    import pkgutil

    import deltastream.methods as methods

    helpers = {"base", "packing", "backends", "torch_ops", "dare_kernels", "bitdelta_kernels"}
    modules = {m.name for m in pkgutil.iter_modules(methods.__path__)} - helpers
    registered = {cls.__module__.rsplit(".", 1)[1] for cls in methods.METHODS.values()}
    assert modules <= registered, modules - registered
