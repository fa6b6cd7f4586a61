"""docs/manifest.schema.json describes every manifest: the golden ones (format 1.1, written by
the old code) and those the current code writes; a manifest that breaks it is refused by it."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest

import deltastream as ds
from deltastream.methods import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")
with open(os.path.join(ROOT, "docs", "manifest.schema.json")) as _f:
    SCHEMA = json.load(_f)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def manifest(art: str) -> dict:
    with open(os.path.join(art, "zarr.json")) as f:
        return json.load(f)["attributes"]["deltastream"]


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(GOLDEN, "artifacts"))))
def test_golden_manifests_match_the_schema(name):
    VALIDATOR.validate(manifest(os.path.join(GOLDEN, "artifacts", name)))


@pytest.mark.parametrize("method", sorted(n for n, cls in METHODS.items() if cls.compact))
def test_fresh_manifests_match_the_schema(tmp_path, method, golden_pair):
    art = ds.compress(*golden_pair, str(tmp_path / "a.dsz"), method, chunk_size=1024, workers=1)
    VALIDATOR.validate(manifest(art))


@pytest.mark.parametrize("edit", [
    lambda d: d.pop("tensors"),
    lambda d: d.update(format="other"),
    lambda d: d.update(format_version="2.0"),
    lambda d: d.pop("manifest_sha256"),  # required from 1.1
    lambda d: d["tensors"][0].update(key="../x"),
    lambda d: d["tensors"][0].update(dtype="F12"),
    lambda d: d["tensors"][0]["ft_chunk_crc32c"].append(2**32),
    lambda d: d["tensors"][4].update(base={"dtype": "F32"}),  # a new tensor has no base
    lambda d: d.update(unknown_field=1),
])
def test_the_schema_refuses_a_malformed_manifest(edit):
    doc = manifest(os.path.join(GOLDEN, "artifacts", "dare.dsz"))
    edit(doc)
    assert not VALIDATOR.is_valid(doc)
