"""benchmarks/quality/ end to end on its tiny stand-in (a random 2-layer Llama, generated text), so
the real study's scripts cannot rot: every group and method runs, and the figures make sense."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

HERE = os.path.dirname(os.path.abspath(__file__))
STUDY = os.path.join(HERE, "..", "benchmarks", "quality", "study.py")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    doc = root / "quality.md"
    doc.write_text("# the study\n\n<!-- study:begin -->\nold\n<!-- study:end -->\n\nthe reading\n")
    out = root / "results"
    proc = subprocess.run([sys.executable, STUDY, "--tiny", "--cache", str(root / "cache"), "--out", str(out),
                           "--doc", str(doc)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return json.load(f), out, doc, proc.stdout


def test_every_group_and_method_runs_with_finite_figures(study):
    results, _, _, _ = study
    rows = results["rows"]
    assert {r["group"] for r in rows} == {"dare", "table1", "multibit", "bitdelta", "trim", "lowrank", "extrapolate"}
    assert {r["config"]["id"] for r in rows} >= {"dare", "biased", "multibit", "bitdelta", "trim", "lowrank",
                                                     "extrapolate"}
    for r in rows:
        for key in ("term", "first_order", "loss_post", "loss_edit", "delta_loss"):
            assert math.isfinite(r[key]), (r["method"], key)
        assert r["loss_post"] == results["loss_post"]
    assert results["loss_base"] > results["loss_post"]  # the tiny fine-tune learned the held-out text's kind


def test_the_null_edit(study):
    rows = study[0]["rows"]
    zero = next(r for r in rows if r["group"] == "extrapolate" and r["value"] == 0)
    assert zero["delta_loss"] == 0 and zero["term"] == 0 and zero["changed"] == 0
    # every other edit changes the same tensors: the >= 2-D ones (norms stay the fine-tune's, as edit's policy says)
    changed = {r["changed"] for r in rows if r is not zero}
    assert len(changed) == 1 and changed.pop() > 0


def test_the_term_tracks_the_measured_change(study):
    results, _, _, _ = study
    rows = [r for r in results["rows"] if r["changed"]]
    # small edits: the sign agrees where the change is clearly non-zero
    assert all(r["term"] * r["delta_loss"] > 0 for r in rows if abs(r["delta_loss"]) > 1e-3)
    assert results["correlation"]["pearson"] > 0.9


def test_outputs_plots_and_the_doc_block(study):
    _, out, doc, stdout = study
    for name in ("results.csv", "tables.md", "dare.png", "table1.png", "multibit.png", "bitdelta.png",
                 "extrapolate.png", "scatter.png"):
        assert (out / name).stat().st_size > 0, name
    text = doc.read_text()
    tables = (out / "tables.md").read_text()
    assert "old" not in text and tables in text and text.endswith("the reading\n")
    assert "within 10%" in tables and "Pearson" in tables
    assert "rows in" in stdout
