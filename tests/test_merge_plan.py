"""merge as plan + executor: the plan is built and checked without running; artifacts are read
through chunk sources (nothing rebuilt on disk); the sparsifiers are registered methods (config is
data); global_trim is TIES's whole-model trim; warnings are warnings."""

import os
import pickle

import numpy as np
import pytest
from test_merge import SPECS, config, write_models

import deltastream as ds
from deltastream.api import effective_chunk_bytes
from deltastream.engine import RunOptions
from deltastream.errors import ParameterError
from deltastream.merging import SPARSIFIERS, DeltastreamWarning, build_plan
from deltastream.merging.plan import merge_footprint
from deltastream.merging.sparsifiers import DellaPrune, Outliers, TopK
from deltastream.methods.dare import Dare
from deltastream.methods.trim import Trim
from deltastream.sources import ArtifactSource

from common import read_raw, tensor_f32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("merge-plan"))


def test_the_plan_is_built_without_running(models):
    art = ds.compress(str(models / "base"), str(models / "ft1"), str(models / "plan-ft1.dsz"), overwrite=True)
    options = RunOptions(workers=2)
    plan = build_plan(config(models, "ties", models=("ft0", "plan-ft1.dsz"), extra="density: 0.5"),
                      chunk_bytes=32 << 20, memory=64 << 20, seed=3, strict=False, options=options)
    assert plan.chunk_bytes == effective_chunk_bytes(32 << 20, 64 << 20, options, per_byte=merge_footprint(2))
    assert plan.chunk_bytes == (64 << 20) // (2 * 2 * (6 + 8 * 2))  # merge's documented memory model
    assert [t.name for t in plan.tensors] == list(SPECS)
    assert all(isinstance(t.parts[1], ArtifactSource) for t in plan.tensors)
    assert {type(j.method) for j in plan.jobs.values()} == {TopK} and len(plan.jobs) == 2 * len(SPECS)
    assert art in plan.inputs
    tasks, inputs = plan.tasks(lambda name: ("nowhere", 0))
    assert {t.name for t in tasks} == set(SPECS) and len(inputs) == len(SPECS)
    assert all(inputs[t.inputs].parts[0].job is not None for t in tasks)
    assert max(len(pickle.dumps(t)) for t in tasks) < 1024  # the models' sources and states are shared, by index


def test_merge_reads_artifacts_without_writing_a_rebuilt_copy(models, monkeypatch):
    import deltastream.jobs.apply
    import deltastream.merging.job as job

    art = ds.compress(str(models / "base"), str(models / "ft1"), str(models / "nt-ft1.dsz"), "dare", p=0.5,
                      overwrite=True)
    monkeypatch.setattr(deltastream.jobs.apply, "apply", lambda *a, **k: pytest.fail("an artifact was rebuilt"))
    seen = []
    original = job.run_tasks

    def watching(fn, tasks, **kw):
        partial = str(models / "nt-out.partial")
        seen.extend(os.path.relpath(os.path.join(r, f), partial) for r, _, fs in os.walk(partial) for f in fs
                    if not os.path.relpath(r, partial).startswith(".journal"))
        return original(fn, tasks, **kw)

    monkeypatch.setattr(job, "run_tasks", watching)
    cfg = config(models, "ties", models=("ft0", "nt-ft1.dsz"), extra="density: 0.5")
    out = ds.merge(cfg, str(models / "nt-out"))
    assert sorted(seen) == [".deltastream.lock", "model.safetensors"]  # the lock and the shard alone
    assert "model.safetensors" in os.listdir(out) and art
    monkeypatch.undo()
    ds.apply(str(models / "base"), art, str(models / "nt-rebuilt"))
    (models / "nt-ckpt.yaml").write_text(open(cfg).read().replace("nt-ft1.dsz", "nt-rebuilt"))
    same = ds.merge(str(models / "nt-ckpt.yaml"), str(models / "nt-same"))
    assert read_raw(out) == read_raw(same)  # a (dare) artifact read as a source == its rebuilt checkpoint


@pytest.mark.parametrize("cls, params", [(TopK, {"density": 0.3, "scope": "global"}), (TopK, {"density": 0.0}),
                                         (Outliers, {"density": 0.8, "gamma": 0.05}),
                                         (DellaPrune, {"density": 0.5, "epsilon": 0.1, "rescale": False})])
def test_sparsifiers_are_data(cls, params):
    method = cls(**params)
    assert cls.from_config(method.get_config()) == method
    assert method.get_config()["id"] == cls.method_id
    described = cls.describe()
    assert described["id"] == cls.method_id and {p["name"] for p in described["params"]} >= set(params)
    with pytest.raises(ParameterError, match=f"method '{cls.method_id}'"):
        cls(density=1.5)


def test_sparsifiers_have_their_own_ids_and_equality():
    assert TopK(density=0.5) != Trim(density=0.5)  # they count k differently
    assert Outliers(density=0.5, gamma=0.0) != TopK(density=0.5)
    ids = {s.method.method_id for s in SPARSIFIERS.values()}
    assert ids == {"ties_topk", "dare", "breadcrumbs", "della_prune"}
    assert isinstance(SPARSIFIERS["random"].build({"density": 0.25}, True, "tensor"), Dare)
    assert SPARSIFIERS["random"].build({"density": 0.25}, True, "tensor") == Dare(p=0.75, rescale="l1")


def _global_topk(deltas: list[np.ndarray], density: float) -> list[np.ndarray]:
    """The whole model's int(density N) largest |delta| (ties: the later position kept)."""
    flat = np.concatenate([d.ravel() for d in deltas])
    n = flat.size
    order = np.lexsort((np.arange(n), np.abs(flat)))
    keep = np.zeros(n, bool)
    keep[order[n - int(density * n):]] = True
    out, at = [], 0
    for d in deltas:
        out.append(np.where(keep[at:at + d.size].reshape(d.shape), d, 0))
        at += d.size
    return out


def test_global_trim_is_the_whole_model_top_k(models):
    cfg = config(models, "ties", models=("ft0",), weights=(1.0,), extra="density: 0.3", glob="global_trim: true")
    out = ds.merge(cfg, str(models / "global"), chunk_size=300)
    per_tensor = ds.merge(config(models, "ties", models=("ft0",), weights=(1.0,), extra="density: 0.3"),
                          str(models / "per-tensor"))
    base = {n: tensor_f32(str(models / "base"), n) for n in SPECS}
    trimmed = _global_topk([tensor_f32(str(models / "ft0"), n) - base[n] for n in SPECS], 0.3)
    for name, t in zip(SPECS, trimmed):
        assert np.allclose(tensor_f32(out, name), base[name] + t, rtol=2e-6, atol=1e-7), name
    kept = sum(int((tensor_f32(out, n) != base[n]).sum()) for n in SPECS)
    assert kept <= int(0.3 * sum(b.size for b in base.values()))
    assert read_raw(out) != read_raw(per_tensor)
    again = ds.merge(cfg, str(models / "global-again"), chunk_size="1KiB", workers=3)
    assert read_raw(again) == read_raw(out)


def test_global_trim_is_refused_where_it_has_no_meaning(models):
    with pytest.raises(ParameterError, match="global_trim is the whole-model trim .* 'dare_ties' has none"):
        ds.merge(config(models, "dare_ties", extra="density: 0.5", glob="global_trim: true"), str(models / "gx"))
    path = models / "gt-filter.yaml"
    path.write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n    parameters:\n"
                    "      weight: 1\n      density: [{filter: mlp, value: 0.2}, {value: 0.5}]\n"
                    "parameters: {global_trim: true}\n")
    with pytest.raises(ParameterError, match="line 4: global_trim ranks model 'ft0' as a whole: its density"):
        ds.merge(str(path), str(models / "gy"))
    assert not (models / "gx").exists() and not (models / "gy.partial").exists()


def test_ignored_options_warn(models):
    with pytest.warns(DeltastreamWarning, match="int8_mask only tunes mergekit's memory use"):
        ds.merge(config(models, "ties", extra="density: 0.5", glob="int8_mask: true"), str(models / "int8"))


def test_the_cli_shows_a_warning_as_one_line(models, capsys):
    from common import run_cli

    assert run_cli("merge", config(models, "ties", extra="density: 0.5", glob="int8_mask: true"),
                   "-o", str(models / "int8-cli")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["deltastream: warning: int8_mask only tunes mergekit's memory use; ignored"]
