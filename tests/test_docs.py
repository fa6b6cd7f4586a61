"""The docs agree with the code: the generated tables are what docs/generate.py writes now, and
claims that restate a number or a list from the code are checked against it."""

from __future__ import annotations

import argparse
import importlib.util
import os

from deltastream import api
from deltastream.cli import build_parser
from deltastream.methods import get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def generator():
    spec = importlib.util.spec_from_file_location("docs_generate", os.path.join(ROOT, "docs", "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commands_with(option: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, p in sub.choices.items() if any(option in a.option_strings for a in p._actions)}


def test_generated_doc_tables_are_current():
    assert generator().stale() == [], "the docs' generated tables are stale: run  python docs/generate.py"


def test_memory_formula_in_the_docs_is_the_codes():
    assert (api.footprint(get_method("lossless")), api.footprint(get_method("dare"))) == (4, 12)
    assert "footprint 4 for exact storage (`lossless`) and 12 for lossy methods" in read("docs", "cli.md")
    arch = read("docs", "architecture.md")
    assert "(`lossless`, and tensors kept exact): **4**" in arch and "Lossy methods: **12**" in arch


def test_which_commands_take_run_options_is_what_the_docs_say():
    running = ["compress", "edit", "merge", "apply", "verify", "extract-lora"]  # the order the docs list them in
    assert commands_with("--workers") == set(running)
    assert commands_with("--resume") == {"compress", "edit", "merge", "apply"}
    assert f"## Options every running command takes ({', '.join(running)})" in read("docs", "cli.md")
    readme = read("README.md")
    listed = ", ".join(f"`{c}`" for c in running[:-1]) + f" and `{running[-1]}`"
    assert f"{listed} take `--workers N`" in readme
    assert "all but `verify` and `extract-lora` take `--resume`" in readme
