"""merge with mergekit's ``slices``: frankenmerges (passthrough over layer ranges, renamed tensors,
config.json's layer count rewritten) and merge methods per slice, equal to the sources' tensors
bit for bit or to a dense reference, the same bits for any chunking, compared with mergekit
itself where it runs offline; config errors one line each, before any output (docs/merge.md)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from llama_kit import make_llama_pair

import deltastream as ds
from deltastream.merging import STREAMED

from common import error_line, read_raw, run_cli, tensor_f32


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base/ and ft/: tiny 3-layer Llamas (untied head), ft = base + noise."""
    root = tmp_path_factory.mktemp("slices")
    make_llama_pair(str(root), layers=3, tie=False)
    return root


def write(root, name: str, text: str) -> str:
    path = root / name
    path.write_text(text)
    return str(path)


FRANKEN = """merge_method: passthrough
slices:
  - sources: [{model: base, layer_range: [0, 2]}]
  - sources: [{model: ft, layer_range: [1, 3]}]
dtype: float32
"""


def run_mergekit(config: str, out: str) -> bool:
    """mergekit's own merge of a config (absolute paths), offline; False if it cannot run here."""
    code = ("import sys, yaml\nfrom mergekit.config import MergeConfiguration\nfrom mergekit.merge import run_merge\n"
            "from mergekit.options import MergeOptions\n"
            "cfg = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))\n"
            "run_merge(cfg, sys.argv[2], options=MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", code, config, out], env=env, capture_output=True, timeout=240)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def absolute(root, text: str) -> str:
    for name in ("base", "ft"):
        text = text.replace(f"model: {name}", f"model: {root / name}").replace(f"base_model: {name}",
                                                                                  f"base_model: {root / name}")
    return text


def test_passthrough_frankenmerge_renames_layers_and_rewrites_the_config(pair, tmp_path):
    cfg = write(pair, "franken.yaml", FRANKEN)
    out = ds.merge(cfg, str(tmp_path / "out"))
    got, base, ft = read_raw(out), read_raw(str(pair / "base")), read_raw(str(pair / "ft"))
    layer = [n.split("model.layers.0.")[1] for n in base if n.startswith("model.layers.0.")]
    for k, (src, i) in enumerate([(base, 0), (base, 1), (ft, 1), (ft, 2)]):  # [0, 2) of base + [1, 3) of ft
        for suffix in layer:
            assert got[f"model.layers.{k}.{suffix}"] == src[f"model.layers.{i}.{suffix}"], (k, suffix)
    assert got["model.embed_tokens.weight"] == base["model.embed_tokens.weight"]  # before the layers: slice 0
    assert got["model.norm.weight"] == ft["model.norm.weight"]  # after them: the last slice
    assert got["lm_head.weight"] == ft["lm_head.weight"]
    assert not any(n.startswith("model.layers.4.") for n in got)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_hidden_layers"] == 4 and config["torch_dtype"] == "float32"
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 4, 5, 6]])).logits).all()
    for kw in ({"chunk_size": 256, "scheduler": "sync"}, {"chunk_size": 100, "workers": 3}):
        assert read_raw(ds.merge(cfg, str(tmp_path / "inv"), overwrite=True, **kw)) == got, kw
    mk = str(tmp_path / "mergekit")
    if not run_mergekit(write(pair, "franken-abs.yaml", absolute(pair, FRANKEN)), mk):
        pytest.skip("mergekit does not run here (offline, without its dependencies)")
    assert read_raw(mk) == got
    assert json.load(open(os.path.join(mk, "config.json")))["num_hidden_layers"] == 4


SLERP = """merge_method: slerp
base_model: base
slices:
  - sources:
      - {model: base, layer_range: [0, 2]}
      - {model: ft, layer_range: [0, 2]}
    parameters: {t: [0.2, 0.8]}
  - sources:
      - {model: base, layer_range: [2, 3]}
      - {model: ft, layer_range: [2, 3], parameters: {}}
parameters:
  t: [{filter: mlp, value: 0.3}, {value: 0.6}]
dtype: float32
"""


def test_slerp_per_slice_equals_the_dense_reference(pair, tmp_path):
    cfg = write(pair, "slerp.yaml", SLERP)
    out = ds.merge(cfg, str(tmp_path / "out"))
    slerp = STREAMED["slerp"].reference
    b, f = str(pair / "base"), str(pair / "ft")
    # slice 0: its own gradient at o / (2 - 1); slice 1 (one layer): the global filtered values
    for name in read_raw(out):
        if ".layers." in name:
            k = int(name.split(".layers.")[1].split(".")[0])
            t = [0.2, 0.8][k] if k < 2 else (0.3 if "mlp" in name else 0.6)
        else:  # before the layers: the first slice's scopes at t = 0; after them, the last slice's
            t = 0.2 if "embed" in name else 0.6
        expected = slerp(tensor_f32(b, name), [tensor_f32(f, name)], t=t)
        assert np.allclose(tensor_f32(out, name), expected, rtol=2e-5, atol=2e-8), name
    for kw in ({"chunk_size": 256, "scheduler": "sync"}, {"chunk_size": 100, "workers": 3}):
        assert read_raw(ds.merge(cfg, str(tmp_path / "inv"), overwrite=True, **kw)) == read_raw(out), kw
    mk = str(tmp_path / "mergekit")
    if not run_mergekit(write(pair, "slerp-abs.yaml", absolute(pair, SLERP)), mk):
        pytest.skip("mergekit does not run here")
    for name in read_raw(out):
        assert np.allclose(tensor_f32(out, name), tensor_f32(mk, name), rtol=2e-5, atol=2e-8), name


def test_linear_per_slice_takes_the_sources_then_slice_then_global_weights(pair, tmp_path):
    cfg = write(pair, "linear.yaml", """merge_method: linear
slices:
  - sources:
      - {model: base, layer_range: [1, 3], parameters: {weight: 3.0}}
      - {model: ft, layer_range: [0, 2]}
    parameters: {weight: 1.0}
parameters: {normalize: true}
dtype: float32
""")
    out = ds.merge(cfg, str(tmp_path / "out"))
    b, f = str(pair / "base"), str(pair / "ft")
    for k in range(2):
        for suffix in ("mlp.up_proj.weight", "input_layernorm.weight"):
            x, y = tensor_f32(b, f"model.layers.{k + 1}.{suffix}"), tensor_f32(f, f"model.layers.{k}.{suffix}")
            expected = (np.float32(3.0) * x + np.float32(1.0) * y) / np.float32(4.0)
            assert np.allclose(tensor_f32(out, f"model.layers.{k}.{suffix}"), expected, rtol=1e-6, atol=1e-8)
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 2


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_one_full_slice_is_the_models_form(pair, tmp_path, method):
    """A slice over every layer is mergekit's own normalization of ``models:``: the same bits
    (sparsifier passes, random streams and gradients included)."""
    params = "{weight: [0.2, 1.0], density: [{filter: mlp, value: 0.4}, {value: 0.7}]}"
    sliced = write(pair, f"full-{method}.yaml", f"""merge_method: {method}
base_model: base
slices:
  - sources:
      - {{model: base, layer_range: [0, 3]}}
      - {{model: ft, layer_range: [0, 3], parameters: {params}}}
dtype: float32
""")
    plain = write(pair, f"plain-{method}.yaml", f"""merge_method: {method}
base_model: base
models:
  - model: ft
    parameters: {params}
dtype: float32
""")
    a = ds.merge(sliced, str(tmp_path / "sliced"), seed=3, chunk_size=200, workers=2)
    assert read_raw(a) == read_raw(ds.merge(plain, str(tmp_path / "plain"), seed=3))
    assert json.load(open(os.path.join(a, "config.json")))["num_hidden_layers"] == 3


@pytest.mark.parametrize("text, key, message", [
    ("merge_method: passthrough\nslices:\n  - sources: [{model: base, layer_range: [2, 1]}]\n",
     "line 3", "layer_range must be [start, stop] with 0 <= start < stop, not [2, 1]"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: base, layer_range: [0, 5]}]\n",
     "line 3", "layer_range [0, 5] goes past model 'base''s 3 layers"),
    ("merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
     "      - {model: base, layer_range: [0, 2]}\n      - {model: ft, layer_range: [0, 3]}\n",
     "line 7", "every source of a slice spans the same number of layers: [0, 3] has 3, [0, 2] has 2"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - {model: base, layer_range: [0, 2]}\n"
     "      - {model: ft, layer_range: [0, 2]}\n", "line 3", "passthrough takes exactly one model"),
    ("merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
     "      - {model: ft, layer_range: [0, 2]}\n", "line 5", "the base_model is not among this slice's sources"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {model: ft, layer_range: [0, 2]}\n"
     "      - {model: ft, layer_range: [1, 3]}\n", "line 5", "model 'ft' is already source 0 of this slice"),
    ("merge_method: passthrough\nmodels: [base]\nslices:\n  - sources: [{model: base, layer_range: [0, 1]}]\n",
     "line 3", "give 'models' or 'slices', not both"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: base, layers: [0, 1]}]\n",
     "line 3", "unknown key 'layers' in a slice source"),
    ("merge_method: linear\nslices:\n  - sources: [{model: ft, layer_range: [0, 1]}]\n"
     "    parameters: {normalize: true}\n", "line 4", "unknown parameter 'normalize' for linear in a slice"),
    ("merge_method: slerp\nbase_model: base\nslices:\n  - sources:\n      - {model: base, layer_range: [0, 1]}\n"
     "      - {model: ft, layer_range: [0, 1]}\n    parameters: {tt: 2}\n", "line 7",
     "unknown parameter 'tt' for slerp"),
])
def test_slice_errors_are_one_line_naming_the_key(pair, capsys, text, key, message):
    path = write(pair, f"bad-{abs(hash(text)) % 10**8}.yaml", text)
    out = pair / "never"
    assert run_cli("merge", path, "-o", out, "-q") == 2
    line = error_line(capsys)
    assert f"file '{path}' {key}" in line and message in line, line
    assert not out.exists() and not (pair / "never.partial").exists()
