"""LoRA both ways, through peft itself on a tiny Llama: an adapter read as a fine-tune (compress,
apply, edit, merge), and extract-lora's adapters loaded by ``PeftModel.from_pretrained``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from llama_kit import llama_config, make_llama_pair, save_llama  # noqa: E402

import deltastream as ds  # noqa: E402
from deltastream.checkpoint import open_checkpoint  # noqa: E402
from deltastream.sources import open_model  # noqa: E402

from common import error_line, read_raw, round_like, run_cli, tensor_f32  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _weights(folder: str) -> dict[str, np.ndarray]:
    return {name: tensor_f32(folder, name) for name in read_raw(folder)}


def _model(folder: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder)


def _merged(base: str, adapter: str) -> dict[str, np.ndarray]:
    """peft's own merge of the adapter into the base, as float32 arrays."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_model(base), adapter).merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}


def _make_adapter(base: str, out: str, **config) -> str:
    """An adapter made by peft: random A and B (init_lora_weights=False), saved by save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **config})
    get_peft_model(_model(base), cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base, ft = make_llama_pair(str(root), tie=False)
    return str(root), base, ft


# --- LoRA in ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj", "k_proj", "up_proj", "embed_tokens"], "use_rslora": True,
     "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"up_proj": 3}},
])
def test_adapter_rebuild_equals_peft_merge(pair, tmp_path, variant):
    _, base, _ = pair
    adapter = _make_adapter(base, str(tmp_path / "adapter"), **variant)
    expected = _merged(base, adapter)
    art = ds.compress(base, adapter, str(tmp_path / "a.dsz"), "lossless")
    rebuilt = _weights(ds.apply(base, art, str(tmp_path / "rebuilt")))
    assert sorted(rebuilt) == sorted(expected)
    for name, values in rebuilt.items():  # float32 sums of the same products, in another order
        np.testing.assert_allclose(values, expected[name], rtol=2e-6, atol=2e-6, err_msg=name)
    changed = [n for n in rebuilt if not np.array_equal(rebuilt[n], tensor_f32(base, n))]
    assert len(changed) >= 6
    # apply takes the adapter itself: the same bits, no artifact
    direct = ds.apply(base, adapter, str(tmp_path / "direct"))
    assert {k: v[2] for k, v in read_raw(direct).items()} == {k: v[2] for k, v in read_raw(
        str(tmp_path / "rebuilt")).items()}


def test_adapter_chunk_invariant_and_bf16(tmp_path):
    base, _ = make_llama_pair(str(tmp_path / "pair"), dtype="bfloat16", tie=False)
    adapter = _make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "down_proj"])
    big = ds.edit(base, adapter, str(tmp_path / "big"), "lossless")
    small = ds.edit(base, adapter, str(tmp_path / "small"), "lossless", chunk_size="40B")
    assert read_raw(big) == read_raw(small)
    # the fine-tune is round(base + B A scale) in the base's dtype, the delta in float32
    from safetensors.numpy import load_file

    w = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.mlp.down_proj"
    a, b = w[f"{key}.lora_A.weight"].astype(np.float32), w[f"{key}.lora_B.weight"].astype(np.float32)
    delta = np.zeros((b.shape[0], a.shape[1]), np.float32)
    for j in range(a.shape[0]):
        delta += b[:, j: j + 1] * a[j: j + 1]
    name = "model.layers.1.mlp.down_proj.weight"
    expected = round_like(tensor_f32(base, name) + delta * np.float32(2.0), "BF16")
    assert np.array_equal(tensor_f32(big, name), expected)


def test_adapter_in_edit_and_merge(pair, tmp_path):
    _, base, _ = pair
    adapter = _make_adapter(base, str(tmp_path / "adapter"), target_modules=["q_proj", "o_proj", "gate_proj"])
    rebuilt = ds.apply(base, adapter, str(tmp_path / "rebuilt"))
    # edit reads the adapter as the fine-tune it stands for: the same bits as from its rebuild
    via_adapter = ds.edit(base, adapter, str(tmp_path / "e1"), "bitdelta")
    via_rebuilt = ds.edit(base, rebuilt, str(tmp_path / "e2"), "bitdelta")
    assert read_raw(via_adapter) == read_raw(via_rebuilt)
    # a merge config may name the adapter as a model
    outs = []
    for i, model in enumerate((adapter, rebuilt)):
        config = tmp_path / f"merge{i}.yaml"
        config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                          f"  - model: {model}\n    parameters: {{weight: 0.5}}\n")
        outs.append(ds.merge(str(config), str(tmp_path / f"m{i}")))
    assert read_raw(outs[0]) == read_raw(outs[1])


def test_adapter_refusals(pair, tmp_path, capsys):
    root, base, _ = pair
    dora = _make_adapter(base, str(tmp_path / "dora"), target_modules=["q_proj"], use_dora=True)
    capsys.readouterr()
    assert run_cli("compress", base, dora, "-o", tmp_path / "x.dsz", "-q") == 2
    assert "DoRA (use_dora) adapters are not supported" in error_line(capsys)
    other = save_llama(_model_of(hidden=48), str(tmp_path / "other"))
    plain = _make_adapter(base, str(tmp_path / "plain"), target_modules=["q_proj"])
    capsys.readouterr()
    assert run_cli("edit", other, plain, "-o", tmp_path / "y", "--method", "lossless", "-q") == 2
    line = error_line(capsys)
    assert "an adapter of another base" in line and "q_proj" in line
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "x.dsz")
    with pytest.raises(ds.DeltastreamError, match="read over its base"):
        open_model(plain)
    assert open_model(plain, open_checkpoint(base)).path == os.path.abspath(plain)


def _model_of(**config):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tie=False, **config))


# --- LoRA out ---------------------------------------------------------------------------------

def _low_rank_ft(base: str, out: str, ranks: dict[str, int], extra: bool = False) -> str:
    """base + B @ A on the linear weights (rank by module kind), float32; ``extra``: a norm and
    the embeddings changed too (what LoRA cannot hold)."""
    import torch

    model = _model(base)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if kind in LINEAR:
                r = ranks.get(kind, ranks.get("*", 3))
                b = torch.randn(p.shape[0], r, generator=gen) * 0.05
                a = torch.randn(r, p.shape[1], generator=gen) * 0.05
                p.add_(b @ a)
            elif extra and (name.endswith("input_layernorm.weight") or "embed_tokens" in name):
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return save_llama(model, out)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.numpy()


def test_extract_exact_rank_loads_in_peft(pair, tmp_path, capsys):
    import torch
    from peft import PeftModel

    _, base, _ = pair
    ft = _low_rank_ft(base, str(tmp_path / "ft"), {"*": 3})
    out = tmp_path / "adapter"
    assert run_cli("extract-lora", base, ft, "-o", out, "--rank", "3", "--json", tmp_path / "r.json", "-q") == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lora_fraction"] == pytest.approx(1.0, abs=1e-6)
    assert all(t["fraction"] > 1 - 1e-6 and t["rank"] == 3 for t in report["tensors"])
    assert len(report["tensors"]) == 14 and report["not_expressed"] == []
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and sorted(config["target_modules"]) == sorted(LINEAR)
    assert config["base_model_name_or_path"] == os.path.abspath(base) and config["peft_type"] == "LORA"
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    ids = torch.tensor([[1, 5, 9, 3, 17, 2, 40, 11]])
    got = _logits(PeftModel.from_pretrained(_model(base), str(out)), ids)
    np.testing.assert_allclose(got, _logits(_model(ft), ids), atol=2e-5)
    assert "14 matrices at rank 3: 1.0000" in capsys.readouterr().out


def test_extract_lower_rank_is_lowrank_edit(pair, tmp_path):
    """Below the delta's rank, peft's merged weights are the rank-r reconstruction that
    ``edit --method lowrank`` writes (the same randomized SVD, seed and chunking); the energy
    reported kept is the reconstruction's, and close to a numpy SVD's best rank r."""
    _, base, ft = pair
    adapter = str(tmp_path / "adapter")
    report = ds.extract_lora(base, ft, adapter, rank_fraction=0.125, modules_to_save=True, chunk_size="1KiB")
    edited = _weights(ds.edit(base, ft, str(tmp_path / "edit"), "lowrank", rank_fraction=0.125, chunk_size="1KiB"))
    merged = _merged(base, adapter)
    for name, values in edited.items():
        np.testing.assert_allclose(merged[name], values, rtol=1e-6, atol=1e-7, err_msg=name)
    for row in report["tensors"]:
        d = (tensor_f32(ft, row["name"]) - tensor_f32(base, row["name"])).astype(np.float64)  # the float32 delta
        s = np.linalg.svd(d, compute_uv=False)
        assert row["rank"] == max(1, int(0.125 * min(d.shape)))
        best = float((s[: row["rank"]] ** 2).sum() / (s ** 2).sum())  # a flat (noise) spectrum: the sketch's
        assert 0.9 * best < row["fraction"] <= best + 1e-9  # subspace is a little off the optimum
        kept = merged[row["name"]].astype(np.float64) - tensor_f32(base, row["name"])
        assert row["fraction"] == pytest.approx(float((kept ** 2).sum() / (d ** 2).sum()), rel=1e-4)
        assert row["energy"] == pytest.approx(float((d ** 2).sum()), rel=1e-9)


def test_extract_modules_to_save_and_energy(pair, tmp_path, capsys):
    import torch
    from peft import PeftModel

    _, base, _ = pair
    ft = _low_rank_ft(base, str(tmp_path / "ft"), {"*": 2, "q_proj": 5}, extra=True)
    # without --modules-to-save: the norms and embeddings are reported, not saved
    assert run_cli("extract-lora", base, ft, "-o", tmp_path / "a", "--rank", "6", "-q") == 0
    printed = capsys.readouterr().out
    assert "model.embed_tokens.weight: changed, not a linear weight" in printed
    assert "model.layers.0.input_layernorm.weight" in printed and "pass --modules-to-save" in printed
    # with it, and --energy: per-matrix ranks in rank_pattern, every change held
    report = ds.extract_lora(base, ft, str(tmp_path / "b"), rank=8, energy=0.999999, modules_to_save=True)
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["modules_to_save"] == [
        "model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    assert config["rank_pattern"] == {f"model.layers.{i}.self_attn.q_proj": 5 for i in range(2)}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert sorted(d["name"] for d in report["not_expressed"] if d["saved"]) == [
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]
    assert report["total_fraction"] == pytest.approx(1.0, abs=1e-6) and report["missed"] == []
    ids = torch.tensor([[1, 5, 9, 3, 17, 2, 40, 11]])
    peft_model = PeftModel.from_pretrained(_model(base), str(tmp_path / "b"))
    np.testing.assert_allclose(_logits(peft_model, ids), _logits(_model(ft), ids), atol=2e-5)
    merged = _merged(base, str(tmp_path / "b"))
    for name in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"):
        assert np.array_equal(merged[name], tensor_f32(ft, name))
    # an adapter is a fine-tune too: re-extracting it at its own ranks keeps all its energy
    again = ds.extract_lora(base, str(tmp_path / "b"), str(tmp_path / "c"), rank=8, energy=0.999999)
    assert again["lora_fraction"] == pytest.approx(1.0, abs=1e-6)


def test_extract_workers_and_scheduler_do_not_change_the_bits(pair, tmp_path, capsys):
    """``--workers`` and ``--scheduler`` reach the passes: the adapter is the same bytes for 1
    or 2 worker threads and dask's synchronous scheduler, at a chunk size that splits every matrix."""
    _, base, ft = pair
    runs = [("--workers", "1"), ("--workers", "2"), ("--scheduler", "sync")]
    for i, flags in enumerate(runs):
        assert run_cli("extract-lora", base, ft, "-o", tmp_path / f"a{i}", "--rank", "3", "--modules-to-save",
                       "--chunk-size", "1KiB", *flags, "-q") == 0
    files = [{n: (tmp_path / f"a{i}" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
             for i in range(len(runs))]
    assert files[0] == files[1] == files[2]
    # nor does the batching of the matrices' sketch state (a quarter of --memory): one matrix a batch here
    from deltastream.lora.extract import ExtractRank, extract_lora

    extract_lora(base, ft, str(tmp_path / "c"), ExtractRank(rank=3), modules_to_save=True, chunk_bytes=1024,
                 state_budget=1)
    assert files[0] == {n: (tmp_path / "c" / n).read_bytes() for n in files[0]}
    assert run_cli("extract-lora", base, ft, "-o", tmp_path / "b", "--rank", "3", "--workers", "0", "-q") == 2
    assert "--workers" in error_line(capsys)


def test_extract_errors(pair, tmp_path, capsys):
    _, base, ft = pair
    assert run_cli("extract-lora", base, ft, "-o", tmp_path / "a", "-q") == 2
    assert "give --rank R, --rank-fraction F or --energy E" in error_line(capsys)
    assert run_cli("extract-lora", base, ft, "-o", tmp_path / "a", "--rank", "0", "-q") == 2
    assert "--rank must be" in error_line(capsys)
    assert run_cli("extract-lora", base, ft, "-o", tmp_path / "a", "--rank", "2", "--rank-fraction", "0.1") == 2
    assert "not both" in error_line(capsys)
    assert run_cli("extract-lora", base, ft, "-o", base, "--rank", "2", "--overwrite", "-q") == 2
    assert "input" in error_line(capsys)
    assert not os.path.exists(tmp_path / "a")


def test_lora_kernel_is_the_numpy_definition():
    from deltastream.lora.kernels import lora_rows

    rng = np.random.default_rng(0)
    for n, r, k in [(1, 1, 1), (3, 5, 7), (17, 16, 33)]:
        left = rng.standard_normal((n, r)).astype(np.float32)
        right = rng.standard_normal((r, k)).astype(np.float32)
        acc = np.zeros((n, k), np.float32)
        for j in range(r):
            acc += left[:, j: j + 1] * right[j: j + 1]
        assert np.array_equal(lora_rows(left, right, 0.7), acc * np.float32(0.7))
