"""Issue 9, cases 11, 12, 14, 18: every option, parameter and config value is parsed at the edge.

A bad value is one line naming it (and, from a config, the file and line), exit 2, before any I/O:
inputs untouched, no output. A hostile YAML (aliases that expand, deep nesting, a huge file) is
refused quickly by the one shared loader both config kinds use.
"""

import os
import re
import time

import pytest

import deltastream as ds
from deltastream.errors import ParameterError

from common import error_line, make_pair, run_cli, tree_digest


@pytest.fixture
def pair(tmp_path):
    return make_pair(str(tmp_path), {"layers.0.w": ("BF16", (16, 8)), "norm": ("F32", (8,))})


def fails(tmp_path, capsys, *argv) -> str:
    """Run the CLI expecting exit 2, one line, inputs unchanged and no output at all."""
    before = tree_digest(tmp_path / "base", tmp_path / "ft")
    out = tmp_path / "out"
    assert run_cli(*argv, "-o", out, "-q") == 2
    assert tree_digest(tmp_path / "base", tmp_path / "ft") == before
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    return error_line(capsys)


# --- case 11: numeric options and method parameters ----------------------------------------

OPTION_CASES = [
    (["compress", "--chunk-size", "1e400"], "invalid chunk size '1e400': must be at most 1024 TiB"),
    (["compress", "--chunk-size", "inf"], "invalid chunk size 'inf': expected a number of bytes"),
    (["compress", "--chunk-size", "nan"], "invalid chunk size 'nan': expected a number of bytes"),
    (["compress", "--chunk-size", "0"], "invalid chunk size '0': must be positive"),
    (["compress", "--chunk-size=-5MiB"], "invalid chunk size '-5MiB': must be positive"),
    (["compress", "--chunk-size", "0.5"], "invalid chunk size '0.5': not a whole number of bytes"),
    (["compress", "--memory", "9" * 40], "invalid memory budget '" + "9" * 40 + "': must be at most 1024 TiB"),
    (["compress", "--memory", "1e999999999GiB"], "invalid memory budget '1e999999999GiB': must be at most"),
    (["edit", "--method", "dare", "--max-shard-size", "1e400"], "invalid max shard size '1e400'"),
    (["compress", "--workers", "-3"], "--workers must be an integer from 1 to 1024, not '-3'"),
    (["compress", "--workers", "0"], "--workers must be an integer from 1 to 1024, not '0'"),
    (["compress", "--workers", "two"], "--workers must be an integer from 1 to 1024, not 'two'"),
    (["compress", "--cluster", "local:0"], "--cluster expects local:N with N an integer from 1 to 256, not 'local:0'"),
    (["compress", "--cluster", "local:100000"], "--cluster expects local:N with N an integer from 1 to 256"),
    (["compress", "--scheduler", "local:x"], "--scheduler expects local:N with N an integer from 1 to 256"),
    (["compress", "--seed", "-1"], "--seed must be an integer from 0 to 18446744073709551615, not '-1'"),
    (["compress", "--seed", str(2**64)], "--seed must be an integer from 0 to 18446744073709551615"),
    (["compress", "--seed", "abc"], "--seed must be an integer from 0 to 18446744073709551615, not 'abc'"),
    (["compress", "--method", "dare", "-p", "p=nan"], "method 'dare': parameter p must be a finite number, not 'nan'"),
    (["compress", "--method", "dare", "-p", "p=1e400"], "method 'dare': parameter p must be a finite number"),
    (["compress", "--method", "dare", "-p", "k=-inf"], "method 'dare': parameter k must be a finite number"),
    (["edit", "--method", "trim", "-p", "density=nan"], "method 'trim': parameter density must be a finite number"),
    (["edit", "--method", "extrapolate", "-p", "alpha=nan"], "method 'extrapolate': parameter alpha must be a finite"),
    (["edit", "--method", "extrapolate", "-p", "alpha=1e39"], "method 'extrapolate': parameter alpha must be a finite"),
    (["compress", "--method", "bitdelta", "-p", "scale=inf"], "method 'bitdelta': parameter scale must be a finite"),
    (["compress", "--method", "lowrank", "-p", "rank_fraction=nan"], "method 'lowrank': parameter rank_fraction"),
    (["compress", "--method", "multibit", "-p", "bits=" + "9" * 5000], "method 'multibit': parameter bits must be int"),
]


@pytest.mark.parametrize("extra, message", OPTION_CASES, ids=[" ".join(c[0])[:40] for c in OPTION_CASES])
def test_bad_numeric_option_is_one_line_before_any_io(tmp_path, capsys, pair, extra, message):
    command, *options = extra
    line = fails(tmp_path, capsys, command, *pair, *options)
    assert message in line, line


def test_merge_options_are_checked_too(tmp_path, capsys, pair):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n  - model: ft\n"
                   "    parameters: {weight: 1.0}\n")
    for options, message in [(["--seed", "-2"], "--seed must be an integer from 0 to"),
                             (["--chunk-size", "1e400"], "invalid chunk size '1e400'"),
                             (["--chunk-size", "0"], "invalid chunk size '0': must be positive"),
                             (["--memory", "0"], "invalid memory budget '0': must be positive"),
                             (["--workers", "-3"], "--workers must be an integer from 1 to 1024")]:
        line = fails(tmp_path, capsys, "merge", cfg, *options)
        assert message in line, line


def test_api_checks_the_same_values(tmp_path, pair):
    base, ft = pair
    out = str(tmp_path / "api.dsz")
    for kwargs, message in [({"workers": -3}, "workers must be an integer from 1 to 1024, not -3"),
                            ({"workers": True}, "workers must be an integer"),
                            ({"workers": 2.5}, "workers must be an integer"),
                            ({"scheduler": "local:0"}, "scheduler expects local:N"),
                            ({"seed": -1}, "seed must be an integer from 0 to"),
                            ({"chunk_size": float("inf")}, "invalid chunk size inf"),
                            ({"include": 5}, "include must be a glob pattern or a list of them, not 5"),
                            ({"chunk_size": True}, "invalid chunk size True"),
                            ({"chunk_size": 2**80}, "must be at most 1024 TiB"),
                            ({"method": "dare", "p": float("nan")}, "parameter p must be a finite number")]:
        with pytest.raises(ParameterError, match=message):
            ds.compress(base, ft, out, **kwargs)
        assert not os.path.exists(out)
    with pytest.raises(ParameterError, match="invalid chunk size 0"):
        ds.merge(str(tmp_path / "none.yaml"), str(tmp_path / "m"), chunk_size=0)


def test_sizes_parse_exactly():
    from deltastream.units import parse_size

    assert parse_size("1.1GB") == 1_100_000_000  # no float rounding
    assert parse_size("1.5KiB") == 1536 and parse_size("2E3") == 2000 and parse_size(" 7 b ") == 7
    assert parse_size("1024TiB") == 2**50
    for text in ("1.5", "1e-3", "1025TiB", "1e16", "--1", "1.5.5", "", "1 2"):
        with pytest.raises(ParameterError):
            parse_size(text)


def test_params_built_directly_are_checked(tmp_path):
    """NaN passes every comparison: check_range refuses it even when code builds the params."""
    from deltastream.methods.dare import DareParams
    from deltastream.methods.extrapolate import ExtrapolateParams
    from deltastream.params import check_range

    with pytest.raises(ParameterError, match=r"p=nan is out of range"):
        DareParams(p=float("nan"))
    with pytest.raises(ParameterError, match=r"alpha=inf is out of range"):
        ExtrapolateParams(alpha=float("inf"))
    with pytest.raises(ParameterError, match="out of range"):
        check_range("m", "x", float("nan"))


# --- case 12: job configs, typed per field, with the file and line --------------------------

JOB_CASES = [
    ("method: dare\nseed: abc\n", "line 2: seed must be an integer from 0 to 18446744073709551615, not 'abc'"),
    ("method: dare\nseed: -4\n", "line 2: seed must be an integer from 0 to"),
    ("method: dare\nseed: 1.5\n", "line 2: seed must be an integer"),
    ("method: dare\nworkers: two\n", "line 2: workers must be an integer from 1 to 1024, not 'two'"),
    ("method: dare\nworkers: 0\n", "line 2: workers must be an integer from 1 to 1024, not 0"),
    ("method: dare\ninclude: 5\n", "line 2: include must be a glob pattern or a list of them, not 5"),
    ("method: dare\nexclude: [a, [b]]\n", "line 2: exclude must be a glob pattern or a list of them"),
    ("method: [dare]\n", "line 1: method must be a method name, not ['dare']"),
    ("method: nope\n", "line 1: unknown method 'nope'; valid methods:"),
    ("method: dare\nparams: [p]\n", "line 2: params must be a mapping of KEY: VALUE"),
    ("method: dare\nparams:\n  rescale: l1\n  p: .nan\n", "line 4: method 'dare': parameter p must be a finite"),
    ("method: dare\nparams: {p: abc}\n", "line 2: method 'dare': parameter p must be float, not 'abc'"),
    ("method: dare\nparams: {k: 0.5, rescale: l1}\n", "line 2: method 'dare': k != 0 (DARE-k) is defined"),
    ("method: dare\nchunk_size: 1e400\n", "line 2: invalid chunk_size '1e400': must be at most 1024 TiB"),
    ("method: dare\nmemory: [1]\n", "line 2: invalid memory [1]: expected a number of bytes"),
    ("method: dare\nmax_shard_size: 0\n", "line 2: invalid max_shard_size 0: must be positive"),
    ("method: dare\nseed: !!int abc\n", "line 2: invalid YAML"),
    ("method: dare\n1: 2\nfoo: 3\n", "line 2: unknown key 1 (valid:"),
    ("- method\n", "line 1: a config is a mapping of method, params"),
    ("method: dare\nseed: " + "1" * 5000 + "\n", "line 2: invalid YAML"),
]


@pytest.mark.parametrize("text, message", JOB_CASES, ids=[c[0][:30] for c in JOB_CASES])
def test_bad_job_config_names_file_and_line(tmp_path, capsys, pair, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    line = fails(tmp_path, capsys, "edit", *pair, "--config", path)
    assert f"file '{path}' {message}" in line, line


def test_config_params_are_checked_against_the_commands_method(tmp_path, capsys, pair):
    path = tmp_path / "job.yaml"
    path.write_text("method: dare\nparams: {p: 0.5}\n")
    line = fails(tmp_path, capsys, "edit", *pair, "--config", path, "--method", "trim")
    assert f"file '{path}' line 2: method 'trim': unknown parameter 'p'" in line, line


def test_a_good_job_config_still_works(tmp_path, capsys, pair):
    path = tmp_path / "job.yaml"
    path.write_text("method: dare\nparams: {p: 0.5}\nseed: 3\nworkers: 2\ninclude: '*w'\nchunk_size: 64\n"
                    "memory: 1MiB\n")
    assert run_cli("compress", *pair, "-o", tmp_path / "a.dsz", "--config", path, "-q") == 0
    assert ds.info(str(tmp_path / "a.dsz"))["seed"] == 3


# --- case 12: merge configs, parameters typed per method -------------------------------------

def merge_config(params: str, glob: str = "", method: str = "ties") -> str:
    text = f"merge_method: {method}\nbase_model: base\nmodels:\n  - model: ft\n    parameters:\n{params}"
    return text + (f"parameters:\n{glob}" if glob else "")


MERGE_CASES = [
    (merge_config("      weight: abc\n"), "line 6: weight must be a number, a list of numbers (a gradient) "
                                          "or a list of {filter, value}, not 'abc'"),
    (merge_config("      weight: .nan\n"), "line 6: weight must be a finite number, not nan"),
    (merge_config("      weight: 1\n      density: 2\n"), "line 7: density=2 is out of range (must be >= 0 and <= 1)"),
    (merge_config("      weight: 1\n      density: 0\n", method="dare_ties"),
     "line 7: density=0 is out of range (must be > 0 and <= 1)"),
    (merge_config("      weight: [0.5, abc]\n"), "line 6: weight must be a number"),
    (merge_config("      weight: []\n"), "line 6: weight must be a number"),
    (merge_config("      weight:\n        - filter: mlp\n          value: abc\n        - value: 1\n"),
     "line 8: weight must be a number"),
    (merge_config("      weight:\n        - filter: [mlp]\n          value: 1\n"),
     "line 7: filter must be a string"),
    (merge_config("      weight:\n        - {filter: mlp, value: 1, extra: 2}\n"),
     "line 7: unknown key 'extra' in a filter entry (valid: filter, value)"),
    (merge_config("      weight:\n        - {filter: mlp}\n"), "line 7: a filter entry needs 'value'"),
    (merge_config("      weight: [1, {value: 2}]\n"), "line 6: weight must be a number"),
    (merge_config("      weight: 1\n      epsilon: 0.1\n", method="della"), None),
    (merge_config("      weight: 1\n", "  normalize: maybe\n"), "line 8: normalize must be true or false, not 'maybe'"),
    (merge_config("      weight: 1\n", "  lambda: [1, 2]\n"), "line 8: lambda must be a finite number, not [1, 2]"),
    (merge_config("      weight: 1\n", "  lambda: .inf\n"), "line 8: lambda must be a finite number, not inf"),
    (merge_config("      weight: 1\n", "  int8_mask: 1\n"), "line 8: int8_mask must be true or false, not 1"),
    (merge_config("      weight: 1\n", "  consensus: majority\n"),
     "line 8: consensus must be one of mergekit, official, not 'majority'"),
    (merge_config("      weight: 1\n", "  density: -1\n"), "line 8: density=-1 is out of range"),
    ("merge_method: [ties]\nbase_model: base\nmodels: [ft]\n", "line 1: merge_method must be a name"),
    ("merge_method: ties\nbase_model: [base]\nmodels: [ft]\n", "line 2: base_model must be a path"),
    ("merge_method: ties\nbase_model: base\nmodels:\n  - model: [ft]\n", "line 4: model must be a path"),
    ("merge_method: ties\nbase_model: base\nmodels: [ft]\ndtype: [1]\n", "line 4: dtype [1] is not one of"),
    ("merge_method: ties\nbase_model: base\nmodels: [ft]\n? [a]\n: 1\n", "line 4: invalid YAML"),
]


@pytest.mark.parametrize("text, message", MERGE_CASES, ids=[str(i) for i in range(len(MERGE_CASES))])
def test_bad_merge_config_names_file_and_line(tmp_path, capsys, pair, text, message):
    path = tmp_path / "merge.yaml"
    if message is None:  # della's epsilon is this method's: it passes the load
        from deltastream.merging.config import load_merge_config

        path.write_text(text)
        assert load_merge_config(str(path)).models[0].parameters == {"weight": 1, "epsilon": 0.1}
        return
    path.write_text(text)
    line = fails(tmp_path, capsys, "merge", path)
    assert f"file '{path}' {message}" in line, line


# --- cases 14 and 18: hostile YAML, for both kinds of config ---------------------------------

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


def hostile(kind: str) -> dict[str, tuple[str, str]]:
    return {
        "laughs": (LAUGHS, "aliases expand to more than 20000 nodes"),
        "nested": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "line 1: nested deeper than 100 levels"),
        "block-nested": ("".join(" " * i + f"k{i}:\n" for i in range(300)), "nested deeper than 100 levels"),
        "recursive": ("a: &a [*a]\n", "line 1: a recursive alias"),
        "large": ("# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
        "not-utf8": ("method: \udcff\n", "not UTF-8"),
    }


@pytest.mark.parametrize("case", ["laughs", "nested", "block-nested", "recursive", "large", "not-utf8"])
@pytest.mark.parametrize("kind", ["job", "merge"])
def test_hostile_yaml_is_refused_quickly(tmp_path, capsys, pair, kind, case):
    text, message = hostile(kind)[case]
    path = tmp_path / "evil.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    argv = ["edit", *pair, "--config", path] if kind == "job" else ["merge", path]
    start = time.perf_counter()
    line = fails(tmp_path, capsys, *argv)
    assert time.perf_counter() - start < 5
    assert f"file '{path}'" in line and message in line, line


def test_config_that_is_not_a_regular_file(tmp_path, capsys, pair):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    line = fails(tmp_path, capsys, "edit", *pair, "--config", fifo)
    assert f"file '{fifo}': cannot read config: not a regular file" in line, line
    line = fails(tmp_path, capsys, "merge", tmp_path)
    assert f"file '{tmp_path}': cannot read the merge config: not a regular file" in line, line


def test_aliases_that_stay_small_are_fine(tmp_path, pair):
    from deltastream.merging.config import load_merge_config

    path = tmp_path / "ok.yaml"
    path.write_text("merge_method: ties\nbase_model: base\nmodels:\n  - model: ft\n"
                    "    parameters: &p {weight: 1, density: 0.5}\n  - model: base\n    parameters: *p\n"
                    "  - model: ft\n    parameters:\n      <<: *p\n      density: 0.7\n")
    cfg = load_merge_config(str(path))
    assert [m.parameters for m in cfg.models] == [{"weight": 1, "density": 0.5}] * 2 + [{"weight": 1, "density": 0.7}]
    assert cfg.where("models", 1) == f"file '{path}' line 6"
    assert cfg.where("models", 2, "parameters", "density") == f"file '{path}' line 11"


# --- the CLI reference lists every option ----------------------------------------------------

def test_docs_cli_md_names_every_option():
    from deltastream.cli import build_parser

    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md"), encoding="utf-8").read()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = sorted({(name, opt) for name, p in [("", parser), *sub.choices.items()] for a in p._actions
                      for opt in a.option_strings if opt.startswith("--") and opt != "--help"
                      and not re.search(rf"{opt}\b", docs)})
    assert not missing, missing


def test_docs_cli_md_states_the_limits_the_code_enforces():
    from deltastream import params, units, yamlconfig

    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md"), encoding="utf-8").read()
    assert params.MAX_SEED == 2**64 - 1 and "0 to 2⁶⁴−1" in docs
    assert f"1 to {params.MAX_WORKERS}" in docs
    assert f"(1 to {params.MAX_PROCESSES})" in docs
    assert f"at most\n{units.MAX_SIZE >> 40} TiB" in docs or f"at most {units.MAX_SIZE >> 40} TiB" in docs
    assert (f"A config is at most {yamlconfig.MAX_BYTES >> 20} MiB, {yamlconfig.MAX_DEPTH} levels deep, and of at "
            f"most {yamlconfig.MAX_NODES:,} nodes") in docs
