"""deltastream analyze: the Riemann-sum term against closed forms, on a tiny Llama against the
measured loss change, and its bad-input errors."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from llama_kit import llama_config, make_llama_pair, make_text, save_llama  # noqa: E402

import deltastream as ds  # noqa: E402
from deltastream.analysis import Analyzer  # noqa: E402
from deltastream.analysis.data import Windows  # noqa: E402
from deltastream.analysis.sweep import most_aggressive, parse_sweep  # noqa: E402
from deltastream.errors import ParameterError  # noqa: E402

from common import error_line, run_cli, tensor_f32, write_checkpoint  # noqa: E402

TOKENS = dict(max_tokens=512, seq_len=32)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("llama"))
    base, ft = make_llama_pair(root)
    return base, ft, make_text(os.path.join(root, "data.txt"))


@pytest.fixture(scope="module")
def analyzer(llama):
    with Analyzer(*llama, **TOKENS) as an:
        yield an


# --- closed forms: a model whose loss is a known function of its one weight ------------------
class Weight(torch.nn.Module):
    def __init__(self, values: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(values.copy()))


class OneWeight(torch.nn.Module):
    """One parameter, named ``layers.0.w`` as in the checkpoints."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.layers = torch.nn.ModuleList([Weight(values)])

    @property
    def w(self):
        return self.layers[0].w


def _weight_pair(tmp, rng, shape=(6, 8)):
    post = rng.standard_normal(shape).astype(np.float32)
    base = (post - 0.1 * rng.standard_normal(shape)).astype(np.float32)
    for name, values in (("base", base), ("ft", post)):
        write_checkpoint(os.path.join(tmp, name), {"layers.0.w": ("F32", shape, values.view(np.uint8).reshape(-1))})
    return os.path.join(tmp, "base"), os.path.join(tmp, "ft"), base, post


def _windows(n=6, seq_len=5):
    return Windows(np.zeros((n, seq_len), np.int64), "none")


def _scaled(q):
    """An objective whose mean over the predicted positions is q(model), whatever the batching."""
    return lambda model, ids: q(model) * (ids.shape[0] * (ids.shape[1] - 1))


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_quadratic_loss_gives_the_exact_left_riemann_sum(tmp_path, steps):
    rng = np.random.default_rng(0)
    base, ft, base_w, post_w = _weight_pair(str(tmp_path), rng)
    h = rng.uniform(0.5, 2.0, post_w.shape)
    a = rng.standard_normal(post_w.shape)
    H, A = torch.from_numpy(h), torch.from_numpy(a)

    def q(model):
        return 0.5 * (H * (model.w.double() - A) ** 2).sum()

    model = OneWeight(post_w)
    alpha = 0.7
    with Analyzer.with_model(base, ft, model, _windows(), _scaled(q), steps=steps, batch_size=4) as an:
        got = an.run("extrapolate", {"alpha": alpha})
    # the reference: the edit's dW~ from edit's own output, the gradient in closed form
    ds.edit(base, ft, str(tmp_path / "ref"), "extrapolate", alpha=alpha)
    d = tensor_f32(str(tmp_path / "ref"), "layers.0.w").astype(np.float64) - post_w
    terms = [np.sum(h * (post_w + c / steps * d - a) * d) for c in range(steps)]
    assert got.term == pytest.approx(np.mean(terms), rel=1e-6)
    assert got.first_order == pytest.approx(terms[0], rel=1e-6)
    assert got.per_step == pytest.approx(terms, rel=1e-6)
    assert got.tensors == {"layers.0.w": pytest.approx(got.term, rel=1e-12)}
    assert got.layers == {"0": pytest.approx(got.term, rel=1e-12)}


def test_linear_loss_term_equals_the_measured_change(tmp_path):
    rng = np.random.default_rng(1)
    base, ft, _, post_w = _weight_pair(str(tmp_path), rng)
    G = torch.from_numpy(rng.standard_normal(post_w.shape))
    model = OneWeight(post_w)
    with Analyzer.with_model(base, ft, model, _windows(), _scaled(lambda m: (G * m.w.double()).sum())) as an:
        for method, params in (("extrapolate", {"alpha": 0.5}), ("dare", {"p": 0.5}), ("bitdelta", {})):
            got = an.run(method, params)
            assert got.term == pytest.approx(got.delta_loss, rel=1e-6, abs=1e-9), method
            assert got.first_order == pytest.approx(got.term, rel=1e-9)
        # every run leaves W_POST as it was, bit for bit
        assert np.array_equal(model.w.detach().numpy(), post_w)


# --- a tiny Llama -------------------------------------------------------------------------------
def test_term_converges_to_the_measured_change_as_the_edit_shrinks(analyzer):
    errors = []
    for alpha in (0.2, 0.05, 0.01):
        got = analyzer.run("extrapolate", {"alpha": alpha})
        assert got.delta_loss != 0
        errors.append(abs(got.term - got.delta_loss) / abs(got.delta_loss))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01


def test_batch_size_changes_nothing_but_rounding(llama):
    results = []
    for batch_size in (1, 3, 16):
        with Analyzer(*llama, batch_size=batch_size, **TOKENS) as an:
            results.append(an.run("dare", {"p": 0.5}, seed=3))
    for other in results[1:]:
        for key in ("term", "first_order", "loss_post", "loss_edit"):
            assert getattr(other, key) == pytest.approx(getattr(results[0], key), rel=1e-5, abs=1e-7), key
        assert other.tokens == results[0].tokens == 512


def test_method_and_edited_of_edits_output_give_the_same_figures(llama, analyzer, tmp_path):
    base, ft, data = llama
    for method, params in (("dare", {"p": 0.7, "k": -0.5}), ("bitdelta", {}), ("lowrank", {})):
        by_method = analyzer.run(method, params, seed=11).as_dict()
        out = ds.edit(base, ft, str(tmp_path / method), method, seed=11, **params)
        by_edited = analyzer.run(edited=out).as_dict()
        for key in ("term", "first_order", "loss_post", "loss_edit", "delta_loss", "per_step", "tensors", "layers"):
            assert by_method[key] == by_edited[key], (method, key)


def test_recompute_changes_nothing_but_rounding(llama, analyzer):
    recomputed = analyzer.run("bitdelta", {})
    with Analyzer(*llama, recompute=False, **TOKENS) as plain:
        stored = plain.run("bitdelta", {})
    for key in ("term", "first_order", "loss_post", "loss_edit"):
        assert getattr(recomputed, key) == pytest.approx(getattr(stored, key), rel=1e-5, abs=1e-7), key


def test_the_saved_gradient_gives_the_same_first_order_term(llama, tmp_path):
    with Analyzer(*llama, **TOKENS) as fresh:
        first = fresh.run("extrapolate", {"alpha": 0.3})
        path = fresh.save_gradient(str(tmp_path / "grad"))
        again = fresh.run("extrapolate", {"alpha": 0.3})  # c = 0 now from the saved gradient
    # the same figures up to rounding: the saved gradient is the float32 sum over the batches,
    # a run's own pass takes each batch's products in float64
    assert again.first_order == pytest.approx(first.first_order, rel=1e-6)
    assert again.term == pytest.approx(first.term, rel=1e-6)
    assert sorted(os.listdir(path)) == ["model.safetensors"]


def test_bfloat16_model_is_close_to_float32(llama, analyzer):
    exact = analyzer.run("extrapolate", {"alpha": 0.5})
    with Analyzer(*llama, dtype="bfloat16", **TOKENS) as an:
        approx = an.run("extrapolate", {"alpha": 0.5})
    assert approx.dtype == "bfloat16"
    assert approx.loss_post == pytest.approx(exact.loss_post, rel=1e-2)
    assert approx.term == pytest.approx(exact.term, rel=0.25, abs=1e-3)


# --- the gradient-biased Table 1 edit ----------------------------------------------------------
def test_biased_by_grad_follows_the_dense_reference(llama, analyzer, tmp_path):
    base, ft, _ = llama
    grad_dir = analyzer.save_gradient(str(tmp_path / "grad"))
    p, k = 0.5, 0.3
    out = ds.edit(base, ft, str(tmp_path / "edited"), "biased", p=p, k=k, by="grad", gradient=grad_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    b, f, g = (tensor_f32(d, name).astype(np.float64) for d in (base, ft, grad_dir))
    delta = f - b
    multiplier = np.where(delta * g < 0, k, (1 - k * p) / (1 - p))
    expected = (b + (delta * multiplier).astype(np.float32)).astype(np.float32)
    np.testing.assert_allclose(tensor_f32(out, name), expected, rtol=1e-6, atol=1e-7)
    # analyze computes its own gradient for by=grad: the same edit, the same figures
    auto = analyzer.run("biased", {"p": p, "k": k, "by": "grad"}).as_dict()
    given = analyzer.run(edited=out).as_dict()
    assert auto["term"] == given["term"] and auto["delta_loss"] == given["delta_loss"]
    # and the collapse the paper reports starts here: k < 1 raises the loss, by more than DARE's
    assert auto["delta_loss"] > 0
    assert auto["delta_loss"] > analyzer.run("dare", {"p": p, "k": k}).delta_loss


def test_biased_by_grad_needs_a_gradient_of_the_right_shape(llama, tmp_path):
    base, ft, _ = llama
    with pytest.raises(ParameterError, match="by=grad needs gradient="):
        ds.edit(base, ft, str(tmp_path / "x"), "biased", by="grad")
    wrong = {"model.layers.0.mlp.up_proj.weight": ("F32", (2, 2), np.zeros(16, np.uint8))}
    write_checkpoint(str(tmp_path / "g"), wrong)
    assert run_cli("edit", base, ft, "-o", tmp_path / "y", "--method", "biased", "-p", "by=grad",
                   "-p", f"gradient={tmp_path / 'g'}", "-q") == 2
    assert not os.path.exists(tmp_path / "y")


# --- sweeps -------------------------------------------------------------------------------------
def test_parse_sweep():
    assert parse_sweep("p=0.1,0.5,0.9").values == (0.1, 0.5, 0.9)
    assert parse_sweep("bits=1,2,3").values == (1, 2, 3)
    alphas = parse_sweep("alpha=-1:1:0.1").values
    assert len(alphas) == 21 and alphas[0] == -1 and alphas[13] == 0.3 and alphas[-1] == 1
    for bad in ("p", "p=", "p=a,b", "p=1:0:0.1", "p=0:1:0", "p=0:1", "p=nan"):
        with pytest.raises(ParameterError):
            parse_sweep(bad)


def test_most_aggressive_is_the_largest_edit_inside_the_tolerance():
    rows = [{"method": "m", "value": v, "term": t, "edit_norm": n}
            for v, t, n in ((0.1, 0.001, 1.0), (0.5, 0.004, 3.0), (0.9, 0.02, 9.0))]
    assert most_aggressive(rows, 0.005)["m"]["value"] == 0.5
    assert most_aggressive(rows, 0.0001) == {"m": None}


def test_cli_sweep_writes_table_json_and_plot(llama, tmp_path, capsys):
    base, ft, data = llama
    out = tmp_path
    assert run_cli("analyze", base, ft, "--data", data, "--method", "dare", "--method", "dare:k=0.5",
                   "--sweep", "p=0.1,0.9", "--max-tokens", 256, "--seq-len", 32, "--steps", 2,
                   "--csv", out / "s.csv", "--json", out / "s.json", "--plot", out / "s.png", "-q") == 0
    text = capsys.readouterr().out
    assert "most aggressive setting" in text and "dare k=0.5" in text
    doc = json.loads((out / "s.json").read_text())
    assert [(r["method"], r["value"]) for r in doc["rows"]] == [("dare", 0.1), ("dare", 0.9), ("dare k=0.5", 0.1),
                                                                ("dare k=0.5", 0.9)]
    assert all(math.isfinite(r["term"]) and r["steps"] == 2 for r in doc["rows"])
    assert (out / "s.csv").read_text().count("\n") == 5
    assert (out / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_single_analysis_json_keys(llama, tmp_path, capsys):
    base, ft, data = llama
    assert run_cli("analyze", base, ft, "--data", data, "--method", "bitdelta", "--max-tokens", 256,
                   "--seq-len", 32, "--json", tmp_path / "a.json", "-q") == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    for key in ("term", "first_order", "loss_post", "loss_edit", "delta_loss", "steps", "tokens", "tensors",
                "layers"):
        assert key in doc
    assert doc["steps"] == 5 and doc["tokens"] == 256 and set(doc["layers"]) == {"0", "1"}
    assert doc["delta_loss"] == doc["loss_edit"] - doc["loss_post"]
    assert "term" in capsys.readouterr().out


# --- bad input: one line each, nothing left behind -----------------------------------------
def test_text_shorter_than_one_window(llama, tmp_path, capsys):
    base, ft, _ = llama
    short = tmp_path / "short.txt"
    short.write_text("the model.")
    assert run_cli("analyze", base, ft, "--data", short, "--method", "bitdelta") == 2
    assert "shorter than one window" in error_line(capsys)


def test_missing_tokenizer(llama, tmp_path, capsys):
    base, ft, data = llama
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(os.path.join(base, name), bare / name)
    assert run_cli("analyze", bare, ft, "--data", data, "--method", "bitdelta") == 2
    assert "no tokenizer" in error_line(capsys)


def test_architecture_transformers_cannot_build(llama, tmp_path, capsys):
    base, ft, data = llama
    odd = tmp_path / "odd"
    shutil.copytree(ft, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "no_such_model", "architectures": ["X"]}))
    assert run_cli("analyze", base, odd, "--data", data, "--method", "bitdelta") == 2
    assert "transformers cannot" in error_line(capsys)


def test_edited_checkpoint_of_another_shape(llama, tmp_path, capsys):
    base, ft, data = llama
    from transformers import LlamaForCausalLM

    other = save_llama(LlamaForCausalLM(llama_config(hidden=48)), str(tmp_path / "other"))
    assert run_cli("analyze", base, ft, "--data", data, "--edited", other) == 2
    line = error_line(capsys)
    assert "shape" in line and "not an edit of this fine-tune" in line


def test_option_errors(llama, capsys):
    base, ft, data = llama
    for argv in (["--method", "dare", "--edited", ft], [], ["--sweep", "p=0.1"], ["--edited", ft, "--plot", "x.png"],
                 ["--method", "dare", "--steps", "0"], ["--method", "lossless"]):
        assert run_cli("analyze", base, ft, "--data", data, *argv) == 2, argv
        error_line(capsys)


def test_analysis_doc_states_the_codes_figures():
    from deltastream.analysis.model import HEAD_ROWS
    from deltastream.analysis.weights import CHUNK_ELEMS

    doc = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "docs", "analysis.md"),
                        encoding="utf-8").read().split())
    assert f"{HEAD_ROWS} positions' logits" in doc
    assert f"{CHUNK_ELEMS >> 20}M elements at a time" in doc
