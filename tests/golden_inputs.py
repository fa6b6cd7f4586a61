"""The golden artifacts' inputs, written again by tests/golden/make_golden.py's own generator (a
fixed seed, a minimal safetensors writer) instead of stored: the project tracks no checkpoint
files. The bytes are those the artifacts were made from (checked against their sha256)."""

from __future__ import annotations

import hashlib
import importlib.util
import os

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
#: the inputs make_golden.py wrote when it made tests/golden/artifacts
INPUT_SHA256 = {"base/model.safetensors": "76aff5067b80dac4e5ada7859c8e8f8ed1c077d1a6e2d40e117bf05c0eafb2b8",
                "ft/model.safetensors": "4a8b3b9ea2a07b738d8ea75c4195ac7da853b9fed52aa18b15259ce425701d38",
                "ft/config.json": "0ef954161090995dc84d67d781afe4b36e55621df721c1078361711527f1d378"}


def write_golden_inputs(folder: str) -> tuple[str, str]:
    """(base, fine-tune) folders under ``folder``, byte for byte the golden artifacts' inputs."""
    spec = importlib.util.spec_from_file_location("make_golden", os.path.join(GOLDEN, "make_golden.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base, ft = module.write_inputs(folder)
    for rel, digest in INPUT_SHA256.items():
        with open(os.path.join(folder, rel), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"golden input {rel} is not the recorded one"
    return base, ft
