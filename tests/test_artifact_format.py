"""An artifact is a plain zarr v3 store: zarr itself reads every array the tasks wrote."""

import numpy as np
import pytest
import zarr

import deltastream as ds
from deltastream.artifact.manifest import load_manifest
from deltastream.artifact.store import read_chunk

from common import make_pair


@pytest.mark.parametrize("transform", ["sub", "xor"])
def test_zarr_reads_what_the_fast_path_wrote(tmp_path, transform):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (37, 19)), "v": ("F32", (1001,)), "s": ("F16", ())})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), transform=transform, chunk_size=600)
    manifest = load_manifest(art)
    group = zarr.open_group(art, mode="r")
    assert group.attrs["deltastream"]["format"] == "deltastream"
    for entry in manifest.tensors:
        for spec in manifest.arrays(entry):
            via_zarr = group[f"{entry.key}/{spec.role}"][:]
            ours = np.concatenate([read_chunk(art, entry.key, spec, i, entry.name).copy()  # scratch views
                                   for i, stored in enumerate(entry.stored_chunks)])
            assert via_zarr.dtype == spec.dtype and np.array_equal(via_zarr, ours)


def _doc_table(heading_line: str) -> list[str]:
    """The field names (first column) of the table that follows a line of docs/format.md."""
    import os
    import re

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "format.md"), encoding="utf-8") as f:
        text = f.read()
    rows = text.split(heading_line, 1)[1].split("\n\n", 2)[1]
    return [re.match(r"\| `([a-z_0-9]+)` \|", row).group(1) for row in rows.splitlines()[2:]]


def test_format_doc_lists_exactly_the_fields_written(tmp_path):
    base, ft = make_pair(str(tmp_path), {"w": ("BF16", (4, 4))})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    doc = zarr.open_group(art, mode="r").attrs["deltastream"]
    assert doc["format_version"] == ds.artifact.FORMAT_VERSION
    assert _doc_table("A JSON object stored under the key") == list(doc)
    assert _doc_table("Each tensor entry:") == list(doc["tensors"][0])
