"""The golden artifacts of tests/golden/ (format 1.1, written once by make_golden.py with the
code of that format): the current code must decode them to the recorded tensors, re-encode their
inputs (generated again: tests/golden_inputs.py) to the same stored bytes, and verify them. A
change to zigzag, a codec preset or a method's chunk layout that stays self-consistent fails here."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import pytest

import deltastream as ds
from deltastream.methods import method_from_config

from common import read_raw

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
with open(os.path.join(GOLDEN, "expected.json")) as _f:
    EXPECTED = json.load(_f)
CASES = sorted(EXPECTED["cases"])
#: manifest fields that differ between two runs of the same job: not the format
VARYING = ("library_version", "created", "source", "manifest_sha256")
#: cases whose old method config is now written under another method id (issue 10 gave
#: multi-bit BitDelta its own id): the only manifest difference allowed besides VARYING
RENAMED = {"bitdelta_bits2": ("bitdelta", "multibit")}
#: parameters a method lost in the same change (bits = 0 was plain BitDelta): gone from its config
DROPPED = {"bitdelta": {"bits": 0}}


def golden(case: str) -> str:
    return os.path.join(GOLDEN, "artifacts", f"{case}.dsz")


def manifest(art: str) -> dict:
    with open(os.path.join(art, "zarr.json")) as f:
        return json.load(f)["attributes"]["deltastream"]


def tensor_sha256(folder: str) -> dict[str, str]:
    return {name: hashlib.sha256(raw).hexdigest() for name, (_, _, raw) in sorted(read_raw(folder).items())}


def stored_files(art: str) -> dict[str, bytes]:
    """Every file of the artifact but the root zarr.json (the manifest), by relative path."""
    out = {}
    for root, _, files in os.walk(art):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), art)
            if rel != "zarr.json":
                with open(os.path.join(root, name), "rb") as f:
                    out[rel] = f.read()
    return out


def as_written_now(doc: dict, case: str) -> dict:
    """The golden manifest as the current code writes it for the same config: renamed (RENAMED)
    or without the parameters its method lost (DROPPED); nothing else may differ."""
    doc = json.loads(json.dumps(doc))
    if case in RENAMED:
        old, new = RENAMED[case]
        assert doc["method"]["id"] == old
        doc["method"] = {"id": new, **{k: v for k, v in doc["method"].items() if k in ("bits", "scale")}}
        for t in doc["tensors"]:
            t["policy"] = new if t["policy"] == old else t["policy"]
    for key, value in DROPPED.get(doc["method"]["id"], {}).items():
        assert doc["method"].pop(key) == value
    return doc


def test_golden_set_covers_every_format_feature():
    assert EXPECTED["format_version"] == "1.1"
    ids = {manifest(golden(c))["method"]["id"] for c in CASES}
    assert ids == {"lossless", "dare", "bitdelta", "dare_bitdelta", "lowrank"}
    policies = {t["policy"] for t in manifest(golden("dare"))["tensors"]}
    assert policies == {"dare", "lossless", "new", "grown"}


@pytest.mark.parametrize("case", CASES)
def test_golden_artifact_decodes_to_the_recorded_tensors(tmp_path, case, golden_pair):
    out = ds.apply(golden_pair[0], golden(case), str(tmp_path / "rebuilt"), workers=1)
    assert tensor_sha256(out) == EXPECTED["cases"][case]["tensor_sha256"]


@pytest.mark.parametrize("case", CASES)
def test_golden_inputs_compress_to_the_same_stored_bytes(tmp_path, case, golden_pair):
    old = manifest(golden(case))
    method = method_from_config(old["method"])  # the old config must still be accepted as it was
    art = ds.compress(*golden_pair, str(tmp_path / "again.dsz"), method, chunk_size=EXPECTED["chunk_size"],
                      seed=EXPECTED["seed"], workers=1)
    got, want = stored_files(art), stored_files(golden(case))
    assert sorted(got) == sorted(want)
    assert [rel for rel in want if got[rel] != want[rel]] == []
    new = manifest(art)
    assert {k: v for k, v in new.items() if k not in VARYING} == {
        k: v for k, v in as_written_now(old, case).items() if k not in VARYING}
    assert sorted(new) == sorted(old)


@pytest.mark.parametrize("case", CASES)
def test_golden_artifact_verifies(case, golden_pair):
    assert ds.verify(golden(case), golden_pair[0])["ok"]
    assert ds.verify(golden(case))["ok"]


def test_a_changed_method_layout_is_refused_on_old_artifacts(monkeypatch):
    """A method whose chunk length changes must not misread artifacts of the old layout: the
    reader uses the recorded layout and says it is not the plan."""
    from deltastream.artifact import manifest as manifest_module
    from deltastream.errors import ArtifactError

    planned = manifest_module.Manifest.planned_arrays

    def longer_chunks(self, entry, state=None):
        return [dataclasses.replace(s, chunk_len=s.chunk_len + 1) for s in planned(self, entry, state)]

    monkeypatch.setattr(manifest_module.Manifest, "planned_arrays", longer_chunks)
    with pytest.raises(ArtifactError, match="array layout differs from the method's plan "
                                            r"\(it records chunk length 120 where this version's method plans 121\)"):
        manifest_module.load_manifest(golden("lowrank"))
