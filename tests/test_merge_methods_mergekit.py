"""merge: mergekit's slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap, arcee_fusion
and passthrough, streamed; each equal to a dense reference written from mergekit's code (the
methods' own ``reference``, torch or numpy, on whole tensors), bit-identical under any chunking,
worker count or scheduler, with one-line config errors (docs/merge.md)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import deltastream as ds
from deltastream.merging import STREAMED
from deltastream.merging.config import resolve
from deltastream.merging.methods import sums

from common import error_line, perturb, random_bits, read_raw, run_cli, tensor_f32, write_checkpoint

SPECS = {"model.embed_tokens.weight": (12, 8), "model.layers.0.mlp.w": (8, 6), "model.layers.1.mlp.w": (6, 6),
         "model.layers.0.self_attn.q": (6, 8), "model.layers.1.self_attn.q": (6, 8), "model.layers.0.norm": (6,),
         "model.layers.0.cube": (3, 2, 4)}
LAYERS = 2


@pytest.fixture(scope="module", params=["F32", "BF16"])
def models(request, tmp_path_factory):
    """A base (config and tokenizer files) and four fine-tunes ft0..ft3, in F32 or BF16, plus an
    int tensor (copied) and ft_same: the base itself."""
    dtype = request.param
    tmp = tmp_path_factory.mktemp(f"mk-{dtype}")
    rng = np.random.default_rng(5)
    base, fts = {}, [{} for _ in range(4)]
    for name, shape in SPECS.items():
        raw = random_bits(rng, dtype, shape)
        base[name] = (dtype, shape, raw)
        for ft in fts:
            ft[name] = (dtype, shape, perturb(rng, dtype, raw))
    steps = random_bits(rng, "I64", (3,))
    base["step"] = ("I64", (3,), steps)
    write_checkpoint(str(tmp / "base"), base, side_files={"config.json": '{"torch_dtype": "float32"}',
                                                          "tokenizer.json": "{}"})
    for i, ft in enumerate(fts):
        write_checkpoint(str(tmp / f"ft{i}"), {**ft, "step": ("I64", (3,), steps)})
    write_checkpoint(str(tmp / "ft_same"), base)
    return tmp


def dtype_of(models) -> str:
    return "BF16" if models.name.startswith("mk-BF16") else "F32"


def write_config(tmp, method, models, per_model=None, glob="", base=True, name="cfg"):
    lines = [f"merge_method: {method}"] + (["base_model: base"] if base else []) + ["models:"]
    for i, m in enumerate(models):
        lines.append(f"  - model: {m}")
        if per_model:
            lines.append(f"    parameters: {{{per_model[i]}}}")
    if glob:
        lines.append(f"parameters: {glob}")
    path = tmp / f"{name}-{method}-{abs(hash((tuple(models), str(per_model), glob, base))) % 10**8}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# (method, models, per-model parameters, global parameters (YAML flow), base given, reference kwargs)
CASES = {
    "slerp": ("slerp", ["base", "ft0"], None, "{t: 0.3}", True, {"t": 0.3}),
    "slerp-filters": ("slerp", ["ft0"], None, "{t: [{filter: self_attn, value: [0.0, 1.0]}, {value: 0.7}]}", True,
                      {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.7}]}),
    "nuslerp-base": ("nuslerp", ["ft0", "ft1"], ["weight: 0.3", "weight: 0.7"], "", True,
                     {"weight": (0.3, 0.7)}),
    "nuslerp-rows": ("nuslerp", ["ft0", "ft1"], ["weight: 1.0", "weight: 0.5"], "{nuslerp_flatten: false}", False,
                     {"weight": (1.0, 0.5), "nuslerp_flatten": False}),
    "nuslerp-first": ("nuslerp", ["ft0", "ft1"], ["weight: 0.4", "weight: 0.4"],
                      "{nuslerp_flatten: false, nuslerp_row_wise: true}", True,
                      {"weight": (0.4, 0.4), "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": ("multislerp", ["ft0", "ft1", "ft2"], ["weight: 0.5", "weight: 0.3", "weight: 0.4"], "", True,
                   {"weight": (0.5, 0.3, 0.4)}),
    "multislerp-nobase": ("multislerp", ["ft0", "ft1"], ["weight: 1.0", "weight: 2.0"],
                          "{normalize_weights: false}", False, {"weight": (1.0, 2.0), "normalize_weights": False}),
    "karcher": ("karcher", ["ft0", "ft1", "ft2"], None, "{max_iter: 20, tol: 1.0e-7}", True,
                {"max_iter": 20, "tol": 1e-7}),
    "model_stock": ("model_stock", ["ft0", "ft1", "ft2"], None, "", True, {}),
    "model_stock-filter": ("model_stock", ["base", "ft0", "ft1", "ft3"], None, "{filter_wise: true}", True,
                           {"filter_wise": True}),
    "sce": ("sce", ["ft0", "ft1", "ft2"], None, "{select_topk: 0.4}", True, {"select_topk": 0.4}),
    "sce-all": ("sce", ["ft0", "ft1"], None, "", True, {}),
    "nearswap": ("nearswap", ["ft0"], None, "{t: 0.0005}", True, {"t": 0.0005}),
    "arcee_fusion": ("arcee_fusion", ["ft0"], None, "", True, {}),
    "passthrough": ("passthrough", ["ft1"], ["scale: 0.5"], "", False, {"scale": 0.5}),
}


def reference(tmp, case, name):
    method, names, _, _, base, kwargs = CASES[case]
    m = STREAMED[method]
    b = tensor_f32(str(tmp / "base"), name) if base else None
    xs = [tensor_f32(str(tmp / n), name) for n in names if not (base and n == "base")]
    if m.base_model == "member" and base:
        xs = [b] + xs
    kwargs = {k: resolve(v, name, LAYERS) for k, v in kwargs.items()}
    return np.asarray(m.reference(b if m.base_model != "member" else None, xs, **kwargs), np.float32)


def check_close(got, expected, dtype, loose=False):
    if dtype == "BF16":  # one bf16 ulp where the float32 results round differently
        rtol, atol = 2**-7, 1e-6
    else:
        rtol, atol = (2e-4, 2e-7) if loose else (2e-5, 2e-8)
    assert np.allclose(got, expected, rtol=rtol, atol=atol), (np.abs(got - expected).max(), rtol)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_mergekit_reference(models, case, tmp_path):
    method, names, per_model, glob, base, _ = CASES[case]
    cfg = write_config(models, method, names, per_model, glob, base)
    out = str(tmp_path / "out")
    assert run_cli("merge", cfg, "-o", out) == 0
    raw = read_raw(out)
    assert raw["step"] == read_raw(str(models / "base"))["step"]  # an int tensor is copied
    for name in SPECS:
        assert raw[name][0] == dtype_of(models)
        check_close(tensor_f32(out, name), reference(models, case, name), dtype_of(models),
                    loose=method in ("karcher", "multislerp"))


@pytest.mark.parametrize("case", ["slerp", "nuslerp-rows", "nuslerp-first", "multislerp", "karcher",
                                  "model_stock-filter", "sce", "nearswap", "arcee_fusion"])
def test_same_bits_for_any_chunking_workers_or_scheduler(models, case, tmp_path):
    if dtype_of(models) == "F32" and case in ("nearswap", "karcher"):
        pytest.skip("covered in BF16")
    method, names, per_model, glob, base, _ = CASES[case]
    cfg = write_config(models, method, names, per_model, glob, base, name="inv")
    reference_out = ds.merge(cfg, str(tmp_path / "ref"))
    for kw in ({"chunk_size": 1, "scheduler": "sync"}, {"chunk_size": 100, "workers": 3}):
        out = ds.merge(cfg, str(tmp_path / "inv"), overwrite=True, **kw)
        assert read_raw(out) == read_raw(reference_out), kw


def test_slerp_of_colinear_tensors_is_lerp_and_sce_without_selection_is_the_base(models, tmp_path):
    out = ds.merge(write_config(models, "slerp", ["ft_same"], None, "{t: 0.4}"), str(tmp_path / "lerp"))
    for name in SPECS:  # mergekit's lerp, (1 - t) a + t a in float32
        a = tensor_f32(str(models / "base"), name)
        lerp = np.float32(1 - 0.4) * a + np.float32(0.4) * a
        if dtype_of(models) == "F32":
            assert np.array_equal(tensor_f32(out, name), lerp)
        check_close(tensor_f32(out, name), lerp, dtype_of(models))
    out = ds.merge(write_config(models, "sce", ["ft0", "ft1"], None, "{select_topk: 0.0}"), str(tmp_path / "none"))
    assert read_raw(out) == read_raw(str(models / "base"))
    out = ds.merge(write_config(models, "nuslerp", ["ft_same", "ft_same"], ["weight: 1", "weight: 3"], "",
                                base=False), str(tmp_path / "colinear"))
    for name in SPECS:
        assert np.allclose(tensor_f32(out, name), tensor_f32(str(models / "base"), name), rtol=2**-7)


@pytest.mark.parametrize("method,names,per_model,glob,base,expected", [
    ("slerp", ["ft0", "ft1"], None, "{t: 0.5}", True, "slerp interpolates the base_model and one other model, "
                                                       "not 2 others"),
    ("slerp", ["ft0"], None, "", True, "missing parameter 't' for slerp"),
    ("slerp", ["ft0"], None, "{t: 0.5, weight_decay: 1}", True, "unknown parameter 'weight_decay' for slerp "
                                                                "(global: t"),
    ("slerp", ["ft0"], ["t: 0.5"], "", True, "unknown parameter 't' for slerp per model"),
    ("slerp", ["ft0"], None, "{t: yes}", True, "t must be a number"),
    ("slerp", ["ft0"], None, "{t: 0.5}", False, "merge_method 'slerp' needs a base_model"),
    ("nuslerp", ["ft0", "ft1"], ["weight: 1", "weight: 1"], "{nuslerp_row_wise: 2}", True,
     "nuslerp_row_wise must be true or false"),
    ("nuslerp", ["base", "ft1"], ["weight: 1", "weight: 1"], "", True, "the base can not be one of them"),
    ("nuslerp", ["ft0", "ft1"], ["weight: 1", "{}"], "", True, "missing parameter 'weight' for model 'ft1'"),
    ("model_stock", ["ft0"], None, "", True, "model_stock needs at least two models"),
    ("karcher", ["ft0"], None, "{max_iter: -1}", True, "max_iter must be an integer >= 0"),
    ("multislerp", ["ft0", "ft1"], ["weight: 1", "weight: -1"], "", True, "the weights sum to 0"),
    ("nearswap", ["ft0", "ft1"], None, "{t: 0.1}", True, "nearswap takes the base_model and one other model"),
    ("passthrough", ["ft0"], None, "", True, "passthrough takes exactly one model"),
    ("sleep", ["ft0"], None, "", True, "unknown merge_method 'sleep'"),
])
def test_config_errors_are_one_line(models, tmp_path, capsys, method, names, per_model, glob, base, expected):
    if dtype_of(models) == "BF16":
        pytest.skip("the config, not the dtype")
    per_model = [p if p != "{}" else "" for p in per_model] if per_model else None
    cfg = write_config(models, method, names, per_model, glob, base, name="err")
    assert run_cli("merge", cfg, "-o", str(tmp_path / "never")) != 0
    line = error_line(capsys)
    assert expected in line and cfg.rsplit("/", 1)[-1] in line, line
    assert not (tmp_path / "never").exists()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=60), st.integers(1, 7), st.integers(1, 4))
def test_product_sums_do_not_depend_on_the_chunking(values, step, cols):
    x = np.array(values, np.float32)
    y = np.roll(x, 1) * np.float32(0.7)
    n = (x.size // cols) * cols or x.size
    x, y = x[:n], y[:n]
    shape = (n // cols, cols) if n % cols == 0 and n >= cols else (n,)
    for along in ("whole", "rows", "first"):
        vectors = sums.vectors_of(shape, along)
        whole = sums.product_sum(x, y, 0, vectors)
        parts = None
        for s in range(0, n, step):
            p = sums.product_sum(x[s:s + step], y[s:s + step], s, vectors)
            parts = p if parts is None else _add(parts, p)
        assert np.array_equal(np.asarray(sums.value(parts)), np.asarray(sums.value(whole)))
        exact = np.zeros(vectors.count)
        np.add.at(exact, vectors.of(0, n), x.astype(np.float64) * y.astype(np.float64))
        assert np.allclose(sums.value(whole), exact if vectors.count > 1 else exact[0], rtol=1e-12, atol=1e-20)


def _add(a, b):
    from deltastream.methods.base import combine_partials

    if isinstance(a, int):
        return a + b
    return combine_partials(a, b)


def test_a_non_finite_value_is_refused_by_a_method_with_passes_in_one_line(models, tmp_path, capsys):
    if dtype_of(models) == "BF16":
        pytest.skip("the value, not the dtype")
    rng = np.random.default_rng(1)
    bad = {name: ("F32", shape, random_bits(rng, "F32", shape)) for name, shape in SPECS.items()}
    values = bad["model.layers.0.mlp.w"][2].view(np.float32).copy()
    values[7] = np.nan
    bad["model.layers.0.mlp.w"] = ("F32", (8, 6), values.view(np.uint8))
    bad["step"] = ("I64", (3,), random_bits(rng, "I64", (3,)))
    write_checkpoint(str(tmp_path / "nan"), bad)
    cfg = write_config(models, "model_stock", ["ft0", str(tmp_path / "nan")], None, "", name="nan")
    assert run_cli("merge", cfg, "-o", str(tmp_path / "never")) != 0
    line = error_line(capsys)
    assert "model.layers.0.mlp.w" in line and "NaN or infinite" in line and "model_stock" in line, line


def test_docs_list_every_method_and_parameter():
    import os

    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "merge.md"), encoding="utf-8").read()
    for name, method in STREAMED.items():
        assert f"| `{name}` |" in text, name
        for key in method.params:
            assert f"`{key}`" in text, (name, key)


def test_a_killed_streamed_merge_resumes_to_the_same_bits(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from common import make_pair

    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (128, 512)), "layers.1.w": ("BF16", (128, 512))})
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\n"
                   "parameters: {t: [0.2, 0.8]}\n")
    reference_out = ds.merge(str(cfg), str(tmp_path / "ref"), chunk_size="2KiB")
    out = str(tmp_path / "out")
    journal = os.path.join(out + ".partial", ".journal")
    proc = subprocess.Popen([sys.executable, "-m", "deltastream.cli", "merge", str(cfg), "--chunk-size", "2KiB",
                             "-o", out, "-q", "--workers", "1"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while sum(len([f for f in files if f.endswith(".json") and f != "plan.json"])
              for _, _, files in os.walk(journal)) < 20:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run([sys.executable, "-m", "deltastream.cli", "merge", str(cfg), "--chunk-size", "2KiB",
                           "-o", out, "-q", "--resume"]).returncode == 0
    assert read_raw(out) == read_raw(reference_out)
