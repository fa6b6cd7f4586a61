"""Trust first, numerics (issue 9, cases 13, 15, 16): normalising divisors that cancel, NaN and
infinite deltas, and dtypes a method cannot compute on. Every refusal is one line naming the
tensor and file, the inputs are byte-identical afterwards, and no output that looks valid is left."""

import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.methods import METHODS

from common import error_line, read_raw, run_cli, tensor_f32, tree_digest, write_checkpoint

W = "layers.0.w"  # the tensor the cases put a NaN or an infinity in
AT = 37  # its flat index: in the second chunk at --chunk-size 128
CHUNK = ("--chunk-size", "128")


def f32(values) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint8)


def float_pair(tmp, base_at=None, ft_at=None, seed=0, models=1, dtype="F32"):
    """A base and ``models`` fine-tunes of F32 (or BF16) tensors; ``base_at``/``ft_at``: the value
    put at element AT of W in the base / in the first fine-tune."""
    rng = np.random.default_rng(seed)
    shapes = {W: (16, 8), "layers.1.w": (16, 8), "norm": (8,)}
    base = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
    fts = [{n: (v + rng.standard_normal(v.shape).astype(np.float32) * 1e-3).astype(np.float32)
            for n, v in base.items()} for _ in range(models)]
    if base_at is not None:
        base[W].flat[AT] = base_at
    if ft_at is not None:
        fts[0][W].flat[AT] = ft_at
    raw = (lambda v: f32(v)) if dtype == "F32" else (lambda v: (v.view(np.uint32) >> 16).astype("<u2").view(np.uint8))
    folder = lambda d: {n: (dtype, v.shape, raw(v)) for n, v in d.items()}  # noqa: E731
    paths = [write_checkpoint(os.path.join(tmp, "base"), folder(base))]
    for i, ft in enumerate(fts):
        paths.append(write_checkpoint(os.path.join(tmp, f"ft{i}"), folder(ft)))
    return paths


def fails(tmp_path, capsys, *argv) -> str:
    """Run a command that must be refused: exit 2, one line, no output or work folder left."""
    out = tmp_path / "out"
    assert run_cli(*argv, "-o", out, "-q") == 2
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")], os.listdir(tmp_path)
    return error_line(capsys)


# --- 15: non-finite deltas ----------------------------------------------------------------------------

#: (method, params, compact) of every method computing a figure over the whole tensor (or row)
FIGURES = [
    ("bitdelta", (), True),
    ("bitdelta", ("per=row",), True),
    ("bitdelta", ("residual=1",), True),
    ("bitdelta", ("zero=keep",), True),
    ("multibit", ("bits=2",), True),
    ("dare", ("rescale=l1", "p=0.5"), True),
    ("dare_bitdelta", ("p=0.1",), True),
    ("lowrank", ("rank_fraction=0.5",), True),
    ("trim", (), False),
    ("trim", ("scope=global",), False),
]
#: (where, base value, fine-tune value): a NaN or an inf in the fine-tune, an inf in the base, inf - inf
INJECTIONS = [("ft", None, np.nan), ("ft", None, -np.inf), ("base", np.inf, None), ("ft", np.inf, np.inf)]


@pytest.mark.parametrize("method,params,compact", FIGURES, ids=lambda x: "-".join(x) if isinstance(x, tuple) else x)
@pytest.mark.parametrize("where,base_at,ft_at", INJECTIONS, ids=["ft-nan", "ft-inf", "base-inf", "inf-inf"])
def test_whole_tensor_figures_refuse_a_non_finite_delta(tmp_path, capsys, method, params, compact, where, base_at,
                                                        ft_at):
    base, ft = float_pair(str(tmp_path), base_at, ft_at)
    before = tree_digest(base, ft)
    argv = ["--method", method, *CHUNK] + [a for p in params for a in ("-p", p)]
    path = os.path.join(base if where == "base" else ft, "model.safetensors")
    value = base_at if where == "base" else ft_at
    for command in (["compress"] if compact else []) + ["edit"]:
        msg = fails(tmp_path, capsys, command, base, ft, *argv)
        whose = "of the base " if where == "base" else ""
        assert f"tensor '{W}' in file '{path}': element {AT} {whose}is {value:g}" in msg, msg
        assert msg.endswith(f"method '{method}' computes figures over the whole tensor and refuses a non-finite "
                            f"delta; keep it exact with --exclude '{W}'"), msg
    assert tree_digest(base, ft) == before


@pytest.mark.parametrize("method", ["bitdelta", "trim", "dare_bitdelta"])
def test_bf16_fused_paths_refuse_too(tmp_path, capsys, method):
    base, ft = float_pair(str(tmp_path), ft_at=np.nan, dtype="BF16")
    for command in ("compress", "edit") if method != "trim" else ("edit",):
        msg = fails(tmp_path, capsys, command, base, ft, "--method", method, *CHUNK, "-p",
                    "p=0.1" if method == "dare_bitdelta" else "scale=1" if method == "bitdelta" else "density=0.2")
        assert f"tensor '{W}' in file '{os.path.join(ft, 'model.safetensors')}': element {AT} is nan" in msg, msg


def test_the_remedy_keeps_the_tensor_exact(tmp_path, capsys):
    base, ft = float_pair(str(tmp_path), ft_at=np.nan)
    art = tmp_path / "a.dsz"
    assert run_cli("compress", base, ft, "-o", art, "--method", "bitdelta", "--exclude", W, "-q") == 0
    assert run_cli("apply", base, art, "-o", tmp_path / "rebuilt", "-q") == 0
    assert read_raw(str(tmp_path / "rebuilt"))[W] == read_raw(ft)[W]  # the NaN too, bit for bit
    policies = {t["name"]: t["policy"] for t in ds.info(str(art))["tensors"]}
    assert policies[W] == "lossless" and policies["layers.1.w"] == "bitdelta"


def test_the_refusal_reaches_the_user_from_a_cluster(tmp_path):
    from deltastream.methods.base import NonFiniteDelta

    base, ft = float_pair(str(tmp_path), ft_at=np.nan)
    with pytest.raises(NonFiniteDelta) as info:  # pickled back from a worker process, message whole
        ds.compress(base, ft, str(tmp_path / "a.dsz"), "bitdelta", chunk_size=128, scheduler="local:1")
    assert str(info.value).startswith(f"tensor '{W}' in file '{os.path.join(ft, 'model.safetensors')}': "
                                      f"element {AT} is nan (base: ")
    assert sorted(os.listdir(tmp_path)) == ["base", "ft0"]


def test_the_device_path_refuses_too(tmp_path):
    from deltastream.methods.base import NonFiniteDelta

    base, ft = float_pair(str(tmp_path), ft_at=np.inf)
    with pytest.raises(NonFiniteDelta, match=f"element {AT} is inf"):
        ds.compress(base, ft, str(tmp_path / "a.dsz"), "bitdelta", chunk_size=128, device="torch:cpu")
    assert not (tmp_path / "a.dsz").exists()


#: element-wise edits: (method, params); the other elements are exactly those of the clean run
ELEMENTWISE = [("dare", {"p": 0.5}), ("dare", {"p": 0.5, "rescale": "none"}), ("dare", {"p": 0.5, "k": 0.5}),
               ("biased", {}), ("extrapolate", {})]


@pytest.mark.parametrize("method,params", ELEMENTWISE, ids=lambda x: x if isinstance(x, str) else "-".join(
    f"{k}={v}" for k, v in x.items()))
@pytest.mark.parametrize("where,base_at,ft_at", INJECTIONS, ids=["ft-nan", "ft-inf", "base-inf", "inf-inf"])
def test_elementwise_edits_carry_non_finite_values(tmp_path, method, params, where, base_at, ft_at):
    clean_base, clean_ft = float_pair(str(tmp_path / "clean"))
    base, ft = float_pair(str(tmp_path / "bad"), base_at, ft_at)
    clean = tensor_f32(ds.edit(clean_base, clean_ft, str(tmp_path / "c"), method, chunk_size=128, **params), W)
    got = tensor_f32(ds.edit(base, ft, str(tmp_path / "e"), method, chunk_size=128, **params), W)
    others = np.arange(got.size) != AT
    assert np.array_equal(got.flat[others], clean.flat[others])
    b, f = tensor_f32(base, W).flat[AT], tensor_f32(ft, W).flat[AT]
    dropped = method == "dare" and params.get("k", 0) == 0 and clean.flat[AT] == tensor_f32(clean_base, W).flat[AT]
    with np.errstate(invalid="ignore"):
        expected = b if dropped else b + (f - b) * np.float32(2)  # every multiplier of a non-finite delta
    assert np.isnan(got.flat[AT]) if np.isnan(expected) else got.flat[AT] == expected
    if method == "dare":  # compress + apply gives the same bits
        art = ds.compress(base, ft, str(tmp_path / "a.dsz"), method, chunk_size=128, **params)
        assert read_raw(ds.apply(base, art, str(tmp_path / "r")))[W] == read_raw(str(tmp_path / "e"))[W]


def merge_config(tmp, method, weights=(0.6, 0.4), params="", glob="", models=("ft0", "ft1"), dtype="float32"):
    lines = [f"merge_method: {method}", "base_model: base", "models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}{', ' + params if params else ''}}}"]
    lines += [f"parameters: {{{glob}}}"] if glob else []
    path = os.path.join(tmp, f"{method}-{abs(hash((weights, params, glob))) % 10**8}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines + ([f"dtype: {dtype}"] if dtype else []) + [""]))
    return path


#: merges whose sparsifier computes a figure over the tensor or row: refused
MERGE_FIGURES = [("ties", "density: 0.5"), ("dare_ties", "density: 0.5"), ("della", "density: 0.5"),
                 ("breadcrumbs", "density: 0.5"), ("dare_linear", "density: 0.5")]


@pytest.mark.parametrize("method,params", MERGE_FIGURES)
@pytest.mark.parametrize("where,base_at,ft_at", INJECTIONS, ids=["ft-nan", "ft-inf", "base-inf", "inf-inf"])
def test_merge_sparsifiers_refuse_a_non_finite_delta(tmp_path, capsys, method, params, where, base_at, ft_at):
    base, ft0, ft1 = float_pair(str(tmp_path), base_at, ft_at, models=2)
    before = tree_digest(base, ft0, ft1)
    msg = fails(tmp_path, capsys, "merge", merge_config(str(tmp_path), method, params=params, models=("ft0",)))
    path = os.path.join(base if where == "base" else ft0, "model.safetensors")
    whose = "of the base " if where == "base" else ""
    value = base_at if where == "base" else ft_at
    assert f"tensor '{W}' in file '{path}': element {AT} {whose}is {value:g}" in msg, msg
    assert msg.endswith(f"merge_method '{method}' sparsifies by figures over the whole tensor or row and refuses a "
                        "non-finite delta (linear, task_arithmetic and a plain DARE carry it element-wise)"), msg
    assert tree_digest(base, ft0, ft1) == before


@pytest.mark.parametrize("method,params,glob", [("linear", "", ""), ("task_arithmetic", "", ""),
                                                ("dare_linear", "density: 0.5", "rescale: false"),
                                                ("ties", "density: 1.0", "")])
def test_elementwise_merges_carry_non_finite_values(tmp_path, method, params, glob):
    merged = []
    for tag, ft_at in (("clean", None), ("bad", np.nan)):
        base, _, _ = float_pair(str(tmp_path / tag), ft_at=ft_at, models=2)
        config = merge_config(str(tmp_path / tag), method, params=params, glob=glob)
        merged.append(tensor_f32(ds.merge(config, str(tmp_path / tag / "out")), W))
    clean, got = merged
    others = np.arange(got.size) != AT
    assert np.array_equal(got.flat[others], clean.flat[others])
    dropped = method == "dare_linear" and got.flat[AT] == tensor_f32(base, W).flat[AT]
    assert np.isnan(got.flat[AT]) or dropped


# --- 13: normalising divisors that cancel ------------------------------------------------------------

def topk_mask(d, density):
    """mergekit's magnitude trim: the int(density n) largest |d| (ties: later positions kept)."""
    n = d.size
    order = np.lexsort((np.arange(n), np.abs(d).ravel()))
    keep = np.zeros(n, bool)
    keep[order[n - int(density * n):]] = True
    return keep.reshape(d.shape)


def safe(divisor):
    """The documented rule: a divisor under 1e-8 in magnitude is 1."""
    return np.where(np.abs(divisor) < 1e-8, np.float32(1), divisor).astype(np.float32)


def dense_merge(method, base, models, weights):
    b = base
    w = [np.float32(float(x)) for x in weights]
    if method == "linear":
        return sum(wi * m for wi, m in zip(w, models)) / safe(np.float32(sum(w)))
    deltas = [m - b for m in models]
    if method == "task_arithmetic":  # with normalize: true
        return b + sum(wi * d for wi, d in zip(w, deltas)) / safe(np.float32(sum(w)))
    weighted = [wi * np.where(topk_mask(d, 0.5), d, 0) for wi, d in zip(w, deltas)]  # ties
    majority = sum(weighted) >= 0
    agree = [np.where(majority, x > 0, x < 0) for x in weighted]
    divisor = sum(np.where(a, wi, np.float32(0)) for a, wi in zip(agree, w))
    return b + sum(np.where(a, x, 0) for a, x in zip(agree, weighted)) / safe(divisor)


@pytest.mark.parametrize("method,params,glob", [
    ("linear", "", ""), ("task_arithmetic", "", "normalize: true"), ("ties", "density: 0.5", ""),
    ("dare_ties", "density: 0.5", "normalize: true"), ("della", "density: 0.5", ""),
    ("breadcrumbs_ties", "density: 0.5", "normalize: true")])
@pytest.mark.parametrize("weights", [(1, -1), ("4.0e-9", "4.0e-9")], ids=["cancel", "tiny"])
def test_a_normalising_divisor_near_zero_becomes_one(tmp_path, method, params, glob, weights):
    paths = float_pair(str(tmp_path), models=2)
    before = tree_digest(*paths)
    out = ds.merge(merge_config(str(tmp_path), method, weights=weights, params=params, glob=glob),
                   str(tmp_path / "out"))
    for name in (W, "layers.1.w", "norm"):
        got = tensor_f32(out, name)
        assert np.isfinite(got).all(), name
        if method in ("linear", "task_arithmetic", "ties"):
            base, *models = (tensor_f32(p, name) for p in paths)
            expected = dense_merge(method, base, models, weights)
            assert np.allclose(got, expected, rtol=2e-6, atol=1e-7), np.abs(got - expected).max()
    assert tree_digest(*paths) == before


# --- 16: dtypes a method cannot compute on ------------------------------------------------------------

DTYPE_SPECS = {"layers.0.w": ("BF16", (16, 8)), "layers.0.e4m3": ("F8_E4M3", (16, 8)),
               "layers.0.e5m2": ("F8_E5M2", (16, 8)), "layers.0.c": ("C64", (4, 8)),
               "layers.0.d": ("F64", (16, 8)), "layers.0.i": ("I32", (4, 4))}
EXACT = ("layers.0.e4m3", "layers.0.e5m2", "layers.0.c", "layers.0.i")
#: every method, with the first parameter set it declares (work on tiny tensors), else its defaults
EVERY_METHOD = [(name, (cls.examples or ({},))[0]) for name, cls in sorted(METHODS.items())]


@pytest.fixture
def mixed(tmp_path):
    from common import make_pair

    return make_pair(str(tmp_path), DTYPE_SPECS, seed=3)


@pytest.mark.parametrize("method,params", EVERY_METHOD, ids=lambda x: x if isinstance(x, str) else "-".join(
    f"{k}{v}" for k, v in x.items()))
def test_uncomputable_dtypes_are_kept_exact(tmp_path, mixed, method, params):
    from deltastream.methods import METHODS

    base, ft = mixed
    before = tree_digest(base, ft)
    fine = read_raw(ft)
    edited = read_raw(ds.edit(base, ft, str(tmp_path / "edit"), method, chunk_size=64, **params))
    for name in EXACT:
        assert edited[name] == fine[name], name
    if METHODS[method].compact:
        art = ds.compress(base, ft, str(tmp_path / "a.dsz"), method, chunk_size=64, **params)
        policies = {t["name"]: t["policy"] for t in ds.info(art)["tensors"]}
        assert all(policies[n] == "lossless" for n in EXACT), policies
        assert policies["layers.0.d"] == policies["layers.0.w"] == method
        assert read_raw(ds.apply(base, art, str(tmp_path / "rebuilt"))) == edited  # apply == edit
    assert tree_digest(base, ft) == before


@pytest.mark.parametrize("pattern,tensor,dtype", [("layers.0.e4m3", "layers.0.e4m3", "F8_E4M3"),
                                                  ("*e5m2", "layers.0.e5m2", "F8_E5M2"),
                                                  ("layers.0.c", "layers.0.c", "C64"),
                                                  ("*", "layers.0.e4m3", "F8_E4M3")])
def test_an_include_of_an_uncomputable_dtype_is_refused(tmp_path, capsys, mixed, pattern, tensor, dtype):
    base, ft = mixed
    before = tree_digest(base, ft)
    for command, method in (("compress", "dare"), ("edit", "bitdelta")):
        msg = fails(tmp_path, capsys, command, base, ft, "--method", method, "--include", pattern)
        assert msg == (f"deltastream: error: tensor '{tensor}' in file '{os.path.join(ft, 'model.safetensors')}': "
                       f"--include '{pattern}' puts it under method '{method}', which cannot compute on dtype "
                       f"{dtype} (only F64, F32, F16, BF16); keep it exact with --exclude '{tensor}'")
    assert tree_digest(base, ft) == before
    # the remedy the message gives
    out = ds.edit(base, ft, str(tmp_path / "ok"), "dare", include=("*",), exclude=EXACT)
    assert read_raw(out)["layers.0.e4m3"] == read_raw(ft)["layers.0.e4m3"]


def test_f64_is_edited_through_float32_and_keeps_the_base_exact_where_unedited(tmp_path, mixed):
    base, ft = mixed
    out = ds.edit(base, ft, str(tmp_path / "out"), "dare", p=0.5)
    b, f, got = (np.frombuffer(read_raw(p)["layers.0.d"][2], "<f8") for p in (base, ft, out))
    kept = got != b
    assert 0 < kept.sum() < b.size
    delta = (f - b).astype(np.float32)  # the exact difference, rounded once
    assert np.array_equal(got[kept], b[kept] + (delta[kept] * np.float32(2)).astype(np.float64))


@pytest.mark.parametrize("tensor,dtype", [("layers.0.e4m3", "F8_E4M3"), ("layers.0.c", "C64")])
def test_a_merge_refuses_what_it_cannot_compute(tmp_path, capsys, tensor, dtype):
    from common import make_pair

    specs = {n: DTYPE_SPECS[n] for n in ("layers.0.w", "layers.0.i", tensor)}
    base, ft = make_pair(str(tmp_path), specs, seed=4)
    os.rename(ft, str(tmp_path / "ft0"))
    before = tree_digest(base, str(tmp_path / "ft0"))
    msg = fails(tmp_path, capsys, "merge", merge_config(str(tmp_path), "task_arithmetic", models=("ft0",)))
    assert msg == (f"deltastream: error: tensor '{tensor}' in file '{os.path.join(base, 'model.safetensors')}': "
                   f"cannot merge dtype {dtype} (merges compute in float32, from F64, F32, F16, BF16); "
                   "convert the checkpoints first")
    assert tree_digest(base, str(tmp_path / "ft0")) == before


def test_a_merge_copies_integers_from_the_base_and_merges_f64(tmp_path):
    from common import make_pair

    base, ft = make_pair(str(tmp_path), {n: DTYPE_SPECS[n] for n in ("layers.0.w", "layers.0.i", "layers.0.d")})
    os.rename(ft, str(tmp_path / "ft0"))
    out = read_raw(ds.merge(merge_config(str(tmp_path), "task_arithmetic", weights=(1.0,), models=("ft0",),
                                         dtype=None), str(tmp_path / "out")))
    assert out["layers.0.i"] == read_raw(base)["layers.0.i"]
    assert out["layers.0.d"][0] == "F64"
    assert np.allclose(np.frombuffer(out["layers.0.d"][2], "<f8"),
                       np.frombuffer(read_raw(str(tmp_path / "ft0"))["layers.0.d"][2], "<f8"), rtol=1e-6)
