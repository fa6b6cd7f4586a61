"""VariantBank serving PEFT LoRA adapters directly: the factors kept, the logits of the fine-tune.

Adapters made by peft itself on a tiny Llama (random A and B), served beside an artifact and the
base. The reference is the checkpoint ``deltastream apply BASE ADAPTER`` rebuilds (float32, so
also peft's own ``merge_and_unload()``, checked once): logits within 1e-5 relative, ``use()``'s
weights apply's bits exactly (float32 and bf16).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
from llama_kit import llama_config, make_llama_pair, save_llama  # noqa: E402

import deltastream as ds  # noqa: E402
from deltastream.errors import CheckpointError, DeltastreamError, WrongBaseError  # noqa: E402
from deltastream.lora.kernels import lora_rows  # noqa: E402
from deltastream.serve import VariantBank  # noqa: E402
from deltastream.serve.lowrank import LowRankOnDevice, in_order  # noqa: E402

from common import read_raw  # noqa: E402

#: name -> peft LoraConfig keywords (r 4, lora_alpha 8 unless given)
ADAPTERS = {
    "lo": {"target_modules": ["q_proj", "v_proj", "down_proj"], "modules_to_save": ["lm_head"]},
    "rs": {"target_modules": ["q_proj", "k_proj", "up_proj", "embed_tokens"], "use_rslora": True,
           "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"up_proj": 3}},
}


def _model(folder: str, dtype=None):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, **({"dtype": dtype} if dtype is not None else {})).eval()


def _make_adapter(base: str, out: str, seed: int = 3, **config) -> str:
    """peft's adapter: random A and B (init_lora_weights=False); a modules_to_save copy perturbed
    so that it changes the model too."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **config})
    model = get_peft_model(_model(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _ids(rows: int, seq: int = 9, seed: int = 0):
    return torch.randint(4, 64, (rows, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serve_adapters"))
    base, ft = make_llama_pair(root, tie=False)
    adapters = {n: _make_adapter(base, os.path.join(root, n), **cfg) for n, cfg in ADAPTERS.items()}
    art = ds.compress(base, ft, os.path.join(root, "bd.dsz"), method="bitdelta")
    rebuilt = {n: ds.apply(base, a, os.path.join(root, f"{n}.out")) for n, a in adapters.items()}
    rebuilt["bd"] = ds.apply(base, art, os.path.join(root, "bd.out"))
    refs = {n: _model(path) for n, path in rebuilt.items()}
    refs[None] = _model(base)
    bank = VariantBank.from_pretrained(base, device="cpu")
    for n, a in adapters.items():
        bank.add(n, a)
    bank.add("bd", art)
    return {"root": root, "base": base, "adapters": adapters, "rebuilt": rebuilt, "refs": refs, "bank": bank}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_logits_equal_apply_and_peft_merge(zoo, name):
    from peft import PeftModel

    ids = _ids(2)
    got = zoo["bank"].logits(ids, [name, name])
    merged = PeftModel.from_pretrained(_model(zoo["base"]), zoo["adapters"][name]).merge_and_unload().eval()
    with torch.no_grad():
        assert _rel(got, zoo["refs"][name](ids).logits) < 1e-5
        assert _rel(got, merged(ids).logits) < 1e-5  # a float32 base: peft merges in float32 too
        assert _rel(got, zoo["refs"][None](ids).logits) > 1e-3  # the adapter changes the output


def test_mixed_batch_with_artifact_and_base(zoo):
    names = ["lo", "bd", None, "rs", "lo", None]
    ids = _ids(len(names), seed=1)
    got = zoo["bank"].logits(ids, names)
    for i, name in enumerate(names):
        with torch.no_grad():
            want = zoo["refs"][name](ids[i:i + 1]).logits[0]
        assert _rel(got[i], want) < 1e-5, name


def test_greedy_generate_same_tokens(zoo):
    names = ["rs", None, "lo", "bd"]
    ids = _ids(len(names), seq=6, seed=2)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = zoo["bank"].generate(ids, names, **kw)
    for i, name in enumerate(names):
        want = zoo["refs"][name].generate(ids, **kw)
        assert torch.equal(got[i], want[i]), name


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_use_is_apply_bits_and_restores_base(zoo, name):
    bank, ids = zoo["bank"], _ids(2, seed=3)
    before = {k: v.clone() for k, v in bank.model.state_dict().items()}
    rebuilt = read_raw(zoo["rebuilt"][name])
    with bank.use(name) as model, torch.no_grad():
        for tname, (_, _, bits) in rebuilt.items():
            assert model.state_dict()[tname].numpy().tobytes() == bits, tname
        inside = model(ids).logits
    with torch.no_grad():
        assert _rel(inside, zoo["refs"][name](ids).logits) < 1e-5
    assert all(torch.equal(v, before[k]) for k, v in bank.model.state_dict().items())


def test_memory_counts_the_factors(zoo):
    bank, params = zoo["bank"], dict(zoo["bank"].model.named_parameters())
    mem = bank.memory()
    for name, cfg in ADAPTERS.items():
        lora = dense = 0
        for pname, p in params.items():
            module = pname.rsplit(".", 2)[-2]
            if module in cfg["target_modules"]:
                rows, cols = p.shape
                r = cfg.get("rank_pattern", {}).get(module, 4)
                lora += 4 * r * (rows + cols)
                dense += p.numel() * p.element_size()
        saved = sum(params[f"{m}.weight"].numel() * 4 for m in cfg.get("modules_to_save", []))
        assert mem[name] == lora + saved, name
        assert lora * 3 < dense  # r = 4 of 32..128 features here; far less at real sizes
    kinds = {type(d).__name__ for d in bank._variant("lo").deltas.values()}
    assert kinds == {"LowRankOnDevice", "DenseOnDevice"}  # lm_head (modules_to_save): dense


def test_low_rank_products_equal_the_dense_delta():
    gen = torch.Generator().manual_seed(0)
    left, right = torch.randn(37, 5, generator=gen), torch.randn(5, 23, generator=gen)
    d = LowRankOnDevice((37, 23), left, right, 0.7)
    dense = d.dense()
    exact = lora_rows(left.numpy(), right.numpy(), 0.7)
    assert np.array_equal(dense.numpy(), exact)
    assert np.array_equal(in_order(left, right, d.scale).numpy(), exact)  # the non-CPU block: same bits
    x = torch.randn(4, 23, generator=gen)
    torch.testing.assert_close(d.matmul(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    rows = torch.tensor([3, 0, 36, 3])
    torch.testing.assert_close(d.take(rows), dense[rows], rtol=1e-5, atol=1e-6)
    w = torch.randn(37, 23, generator=gen).to(torch.bfloat16)
    assert torch.equal(d.add_to(w), (w.float() + torch.from_numpy(exact)).to(torch.bfloat16))
    assert d.nbytes == 4 * 5 * (37 + 23)


def test_bf16_tied_embedding_lora_use_is_apply_bits(tmp_path):
    base, _ = make_llama_pair(str(tmp_path / "pair"), dtype="bfloat16", tie=True)
    adapter = _make_adapter(base, str(tmp_path / "ad"), target_modules=["q_proj", "down_proj", "embed_tokens"])
    rebuilt = ds.apply(base, adapter, str(tmp_path / "out"))
    bank = VariantBank.from_pretrained(base, device="cpu")
    bank.add("a", adapter)
    ids = _ids(3, seed=4)
    ref = _model(rebuilt, torch.bfloat16)
    with bank.use("a") as model, torch.no_grad():
        for tname, (_, _, bits) in read_raw(rebuilt).items():
            assert model.state_dict()[tname].view(torch.uint16).numpy().tobytes() == bits, tname
        assert torch.equal(model(ids).logits, ref(ids).logits)
    got = bank.logits(ids, ["a", None, "a"]).float()
    with torch.no_grad():
        want = ref(ids).logits.float()
    # bf16: the bank adds the float32 product to the bf16 base output (docs/serve.md, Accuracy)
    assert _rel(got[0], want[0]) < 0.05 and _rel(got[2], want[2]) < 0.05


def test_refusals_one_line(zoo, tmp_path):
    bank, base = zoo["bank"], zoo["base"]
    held = list(bank.names)
    dora = _make_adapter(base, str(tmp_path / "dora"), target_modules=["q_proj"], use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA") as err:
        bank.add("dora", dora)
    assert "\n" not in str(err.value) and "adapter_config.json" in str(err.value)
    other = save_llama(_other_model(), str(tmp_path / "other"))
    wrong = _make_adapter(other, str(tmp_path / "wrong"), target_modules=["q_proj", "v_proj"])
    with pytest.raises(WrongBaseError, match="an adapter of another base") as err:
        bank.add("wrong", wrong)
    assert "\n" not in str(err.value) and "q_proj" in str(err.value) and "adapter_model.safetensors" in str(err.value)
    with pytest.raises(DeltastreamError, match="not a deltastream artifact nor a PEFT LoRA adapter"):
        bank.add("none", str(tmp_path))
    assert bank.names == held


def test_recorded_base_path_elsewhere_is_accepted(zoo, tmp_path):
    """base_model_name_or_path names a folder, not this base's: shapes decide, not the path."""
    import shutil

    moved = shutil.copytree(zoo["adapters"]["lo"], str(tmp_path / "moved"))
    config = os.path.join(moved, "adapter_config.json")
    with open(config) as f:
        doc = json.load(f)
    doc["base_model_name_or_path"] = str(tmp_path)  # an existing folder, and another one
    with open(config, "w") as f:
        json.dump(doc, f)
    bank = zoo["bank"]
    bank.add("moved", moved)
    try:
        ids = _ids(1, seed=5)
        assert torch.equal(bank.logits(ids, ["moved"]), bank.logits(ids, ["lo"]))
    finally:
        bank.remove("moved")


def _other_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(9)
    return LlamaForCausalLM(llama_config(hidden=48, tie=False))
