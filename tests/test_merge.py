"""merge: mergekit's configs and semantics, streamed; equal to a dense reference written here from
mergekit's formulas (METHODS.md §2, docs/merge.md), bit-identical under any chunking."""

import os

import numpy as np
import pytest

import deltastream as ds
from deltastream.errors import MismatchError, ParameterError
from deltastream.merging import DeltastreamWarning

from common import perturb, random_bits, read_raw, run_cli, tensor_f32, write_checkpoint

SPECS = {"model.embed_tokens.weight": ("F32", (40, 16)), "model.layers.0.mlp.w": ("F32", (32, 24)),
         "model.layers.1.mlp.w": ("F32", (24, 24)), "model.layers.0.norm": ("F32", (24,))}
W = (0.6, 0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("merge"))


def write_models(tmp):
    """A base (with config and tokenizer files) and three fine-tunes ft0..ft2 of SPECS."""
    rng = np.random.default_rng(11)
    base, fts = {}, [{}, {}, {}]
    for name, (dtype, shape) in SPECS.items():
        raw = random_bits(rng, dtype, shape)
        base[name] = (dtype, shape, raw)
        for ft in fts:
            ft[name] = (dtype, shape, perturb(rng, dtype, raw))
    write_checkpoint(str(tmp / "base"), base, side_files={"config.json": '{"torch_dtype": "float32"}',
                                                          "tokenizer.json": "{}"})
    for i, ft in enumerate(fts):
        write_checkpoint(str(tmp / f"ft{i}"), ft)
    return tmp


def config(tmp, method, models=("ft0", "ft1"), weights=W, extra="", glob="", name=None):
    lines = [f"merge_method: {method}", "base_model: base", "models:"]
    for m, w in zip(models, weights):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {w}{', ' + extra if extra else ''}}}"]
    if glob:
        lines.append(f"parameters: {{{glob}}}")
    lines += ["dtype: float32", "tokenizer_source: base"]
    path = tmp / (name or f"{method}-{abs(hash((models, weights, extra, glob))) % 10**8}.yaml")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def deltas(tmp, name, models=("ft0", "ft1")):
    b = tensor_f32(str(tmp / "base"), name)
    return b, [tensor_f32(str(tmp / m), name) - b for m in models]


def topk_mask(d, density):
    """mergekit's magnitude trim: the int(density n) largest |d| (ties: later positions kept)."""
    n = d.size
    k = int(density * n)
    order = np.lexsort((np.arange(n), np.abs(d).ravel()))  # by value, then position
    keep = np.zeros(n, bool)
    keep[order[n - k:]] = True
    return keep.reshape(d.shape)


def ties_reference(ds_, w, lam=1.0, normalize=True):
    weighted = [np.float32(wi) * d for wi, d in zip(w, ds_)]
    majority = sum(weighted) >= 0
    agree = [np.where(majority, x > 0, x < 0) for x in weighted]
    mixed = sum(np.where(a, x, 0) for a, x in zip(agree, weighted))
    if normalize:
        div = sum(np.where(a, np.float32(wi), np.float32(0)) for a, wi in zip(agree, w))
        div[div == 0] = 1
        mixed = mixed / div
    return mixed * np.float32(lam)


def close(got, expected):
    assert np.allclose(got, expected, rtol=2e-6, atol=1e-7), np.abs(got - expected).max()


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_deterministic_methods_equal_mergekit_semantics(models, method):
    extra = "density: 0.4" if method == "ties" else ""
    glob = "lambda: 0.9" if method != "linear" else ""
    out = ds.merge(config(models, method, extra=extra, glob=glob), str(models / f"out-{method}"))
    for name in SPECS:
        b, (d0, d1) = deltas(models, name)
        if method == "task_arithmetic":
            expected = b + np.float32(0.9) * (np.float32(W[0]) * d0 + np.float32(W[1]) * d1)
        elif method == "linear":
            m0, m1 = b + d0, b + d1
            expected = (np.float32(W[0]) * m0 + np.float32(W[1]) * m1) / np.float32(sum(W))
        else:
            trimmed = [np.where(topk_mask(d, 0.4), d, 0) for d in (d0, d1)]
            expected = b + ties_reference(trimmed, W, lam=0.9)
        close(tensor_f32(out, name), expected)


def test_official_ties_rule(models):
    out = ds.merge(config(models, "ties", extra="density: 0.5", glob="consensus: official"), str(models / "off"))
    b, ds_ = deltas(models, "model.layers.0.mlp.w")
    trimmed = [np.where(topk_mask(d, 0.5), d, 0) for d in ds_]
    majority = sum(trimmed) >= 0
    agree = [np.where(majority, t > 0, t < 0) for t in trimmed]
    mean = sum(np.where(a, t, 0) for a, t in zip(agree, trimmed)) / np.maximum(sum(a.astype(np.float32)
                                                                                   for a in agree), 1)
    close(tensor_f32(out, "model.layers.0.mlp.w"), b + mean)


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_sparsifiers_statistics(models, method):
    density = 0.5
    glob = "rescale: false"
    out = ds.merge(config(models, method, models=("ft0",), weights=(1.0,), extra=f"density: {density}",
                          glob=glob), str(models / f"stats-{method}"))
    b, (d,) = deltas(models, "model.layers.0.mlp.w", ("ft0",))
    got = tensor_f32(out, "model.layers.0.mlp.w") - b
    kept = got != 0
    n = d.size
    assert abs(kept.mean() - density) < 6 * np.sqrt(density * (1 - density) / n)
    assert np.allclose(got[kept], d[kept], rtol=1e-5, atol=1e-7)  # no rescale: kept entries unchanged
    rescaled = ds.merge(config(models, method, models=("ft0",), weights=(1.0,), extra=f"density: {density}"),
                        str(models / f"stats-{method}-l1"))
    got = tensor_f32(rescaled, "model.layers.0.mlp.w") - b
    factor = np.abs(d).astype(np.float64).sum() / np.abs(d[kept]).astype(np.float64).sum()
    assert np.allclose(got[kept], d[kept] * factor, rtol=1e-4, atol=1e-7)  # the same mask, L1-rescaled
    assert np.array_equal(got != 0, kept)


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "breadcrumbs_ties"])
def test_same_bits_for_any_chunking_workers_order_or_added_model(models, method):
    extra = "density: 0.5" + (", gamma: 0.05" if "breadcrumbs" in method else "")
    reference = ds.merge(config(models, method, extra=extra), str(models / f"ref-{method}"))
    for kw in ({"chunk_size": 200, "workers": 1}, {"chunk_size": "1KiB", "workers": 3}, {"scheduler": "sync"}):
        out = ds.merge(config(models, method, extra=extra), str(models / f"inv-{method}"), overwrite=True, **kw)
        assert read_raw(out) == read_raw(reference), kw


def test_masks_do_not_change_when_a_model_is_added(models):
    one = ds.merge(config(models, "dare_linear", models=("ft0",), weights=(1.0,), extra="density: 0.3"),
                   str(models / "one"))
    two = ds.merge(config(models, "dare_linear", models=("ft0", "ft2"), weights=(1.0, 0.0), extra="density: 0.3"),
                   str(models / "two"))
    assert read_raw(one) == read_raw(two)  # ft0's mask is the same; ft2 adds 0


def test_filters_and_gradients(models):
    glob = ""
    path = models / "filters.yaml"
    path.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n"
                    "      weight: [{filter: mlp, value: 0.5}, {value: 1.0}]\n  - model: ft1\n"
                    "    parameters: {weight: [0.0, 1.0]}\ndtype: float32\n")
    out = ds.merge(str(path), str(models / "filters"))
    for name, w0, w1 in [("model.layers.0.mlp.w", 0.5, 0.0), ("model.layers.1.mlp.w", 0.5, 1.0),
                         ("model.layers.0.norm", 1.0, 0.0), ("model.embed_tokens.weight", 1.0, 0.0)]:
        b, (d0, d1) = deltas(models, name)
        close(tensor_f32(out, name), b + (np.float32(w0) * d0 + np.float32(w1) * d1))
    assert glob == ""


def test_outputs_a_user_can_load(models):
    out = ds.merge(config(models, "ties", extra="density: 0.5", name="card.yaml"), str(models / "card"))
    files = sorted(os.listdir(out))
    assert files == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors", "tokenizer.json"]
    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\nbase_model:\n- base\n") and "- merge\n- deltastream\n" in card
    assert "random seed 0" in card and "merge_method: ties" in card
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert f.metadata()["deltastream_merge"] == "ties"


def test_config_errors_are_clear_and_leave_nothing(models, capsys):
    cases = {
        "merge_method: tiez\nbase_model: base\nmodels: [ft0]\n": "line 1: unknown merge_method 'tiez'",
        "merge_method: ties\nmodels:\n  - model: ft0\n    parameters: {weight: 1}\n": "needs a base_model",
        "merge_method: ties\nbase_model: nowhere\nmodels: [ft0]\n": "line 2: base_model not found",
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: gone\n": "line 4: model 'gone' not found",
        "merge_method: ties\nbase_model: base\nmodels: [ft0]\nfoo: 1\n": "line 4: unknown key 'foo'",
        "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters: {weight: 1, dens: 1}\n":
            "line 5: unknown parameter 'dens'",
        "merge_method: ties\nbase_model: base\ntokenizer_source: union\nmodels: [ft0]\n":
            "line 3: cannot load the tokenizer of",  # union is supported: this base's tokenizer.json is no tokenizer
    }
    for i, (text, message) in enumerate(cases.items()):
        path = models / f"bad{i}.yaml"
        path.write_text(text)
        assert run_cli("merge", path, "-o", models / "never", "-q") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and str(path) in err[-1], (message, err)
        assert not (models / "never").exists() and not (models / "never.partial").exists()


def test_shape_and_vocabulary_mismatch(models, tmp_path):
    rng = np.random.default_rng(3)
    base = {n: (d, s, random_bits(rng, d, s)) for n, (d, s) in SPECS.items()}
    grown = dict(base)
    grown["model.embed_tokens.weight"] = ("F32", (44, 16), random_bits(rng, "F32", (44, 16)))
    write_checkpoint(str(tmp_path / "base"), base)
    write_checkpoint(str(tmp_path / "grown"), grown)
    odd = dict(base)
    odd["model.layers.0.mlp.w"] = ("F32", (32, 25), random_bits(rng, "F32", (32, 25)))
    write_checkpoint(str(tmp_path / "odd"), odd)
    cfg = config(tmp_path, "task_arithmetic", models=("grown",), weights=(1.0,))
    with pytest.warns(DeltastreamWarning, match="cropped to the base's 40 rows"):
        out = ds.merge(cfg, str(tmp_path / "cropped"))
    assert read_raw(out)["model.embed_tokens.weight"][1] == (40, 16)
    with pytest.raises(MismatchError, match="vocabulary 44 differs from the base's 40"):
        ds.merge(cfg, str(tmp_path / "strict"), strict=True)
    with pytest.raises(MismatchError, match=r"tensor 'model.layers.0.mlp.w' in file .*odd.*shape \(32, 25\)"):
        ds.merge(config(tmp_path, "ties", models=("odd",), weights=(1.0,), extra="density: 0.5"),
                 str(tmp_path / "odd-out"))
    with pytest.raises(ParameterError):
        ds.merge(config(tmp_path, "ties", models=("grown",), weights=(1.0,), extra="epsilon: 0.5"),
                 str(tmp_path / "eps"))


def test_an_artifact_can_be_a_model(models):
    art = ds.compress(str(models / "base"), str(models / "ft1"), str(models / "ft1.dsz"))
    from_art = ds.merge(config(models, "ties", models=("ft0", "ft1.dsz"), extra="density: 0.5"),
                        str(models / "from-art"))
    from_ckpt = ds.merge(config(models, "ties", models=("ft0", "ft1"), extra="density: 0.5"),
                         str(models / "from-ckpt"))
    assert read_raw(from_art) == read_raw(from_ckpt)
    assert art


def test_batch_compression_reads_the_base_once_for_all(models, monkeypatch):
    import deltastream.jobs.compress as job

    reads = []
    original = job.read_pair_base
    monkeypatch.setattr(job, "read_pair_base", lambda *a: reads.append(a[2]) or original(*a))
    fts = [str(models / f"ft{i}") for i in range(3)]
    outs = ds.compress(str(models / "base"), fts, str(models / "batch"), "dare", p=0.5)
    assert [os.path.basename(o) for o in outs] == ["ft0.dsz", "ft1.dsz", "ft2.dsz"]
    assert len(reads) == len(SPECS)  # one base read per chunk (one chunk per tensor here), not three
    for ft, art in zip(fts, outs):
        single = ds.compress(str(models / "base"), ft, str(models / "single.dsz"), "dare", p=0.5, overwrite=True)
        assert read_raw(ds.apply(str(models / "base"), art, str(models / "a1"), overwrite=True)) == \
            read_raw(ds.apply(str(models / "base"), single, str(models / "a2"), overwrite=True))


def test_batch_compression_from_the_cli(models, capsys):
    assert run_cli("compress", models / "base", models / "ft0", models / "ft1", "-o", models / "cli-batch",
                   "--method", "bitdelta", "-q") == 0
    assert sorted(os.listdir(models / "cli-batch")) == ["ft0.dsz", "ft1.dsz"]
    (models / "batch.yaml").write_text(f"method: lossless\nfine_tunes: [{models / 'ft0'}, {models / 'ft2'}]\n")
    assert run_cli("compress", models / "base", "-o", models / "cfg-batch", "--config", models / "batch.yaml",
                   "-q") == 0
    assert sorted(os.listdir(models / "cfg-batch")) == ["ft0.dsz", "ft2.dsz"]
    assert read_raw(ds.apply(str(models / "base"), str(models / "cfg-batch" / "ft2.dsz"), str(models / "r2"))) == \
        read_raw(str(models / "ft2"))
