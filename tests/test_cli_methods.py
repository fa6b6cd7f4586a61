"""The CLI's method options: --method/--param/--seed/--include/--exclude, YAML configs, `methods`."""

import json

from common import make_pair, read_raw, run_cli


def test_edit_with_params_and_config_agree(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (32, 16)), "norm": ("F32", (16,))})
    assert run_cli("edit", base, ft, "-o", tmp_path / "a", "--method", "dare", "-p", "p=0.7",
                   "--param", "rescale=l1", "--seed", "4", "-q") == 0
    (tmp_path / "job.yaml").write_text("method: dare\nparams: {p: 0.7, rescale: l1}\nseed: 4\n")
    assert run_cli("edit", base, ft, "-o", tmp_path / "b", "--config", tmp_path / "job.yaml", "-q") == 0
    assert read_raw(str(tmp_path / "a")) == read_raw(str(tmp_path / "b"))
    # the command line wins over the file
    assert run_cli("edit", base, ft, "-o", tmp_path / "c", "--config", tmp_path / "job.yaml", "--seed", "5",
                   "-q") == 0
    assert read_raw(str(tmp_path / "c")) != read_raw(str(tmp_path / "a"))


def test_bad_method_options_fail_in_one_line(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (8, 8))})
    cases = [
        (["--method", "nope"], "unknown method 'nope'; valid methods:"),
        (["--method", "dare", "-p", "drop=0.5"], "method 'dare': unknown parameter 'drop' (valid: p, rescale, k)"),
        (["--method", "dare", "-p", "p=2"], "method 'dare': p=2.0 is out of range"),
        (["--method", "bitdelta", "-p", "per=column"], "must be one of tensor, row"),
        (["--method", "dare", "-p", "p"], "--param expects KEY=VALUE"),
        (["--method", "extrapolate"], "has no compact form"),
    ]
    for extra, message in cases:
        assert run_cli("compress", base, ft, "-o", tmp_path / "x.dsz", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "x.dsz").exists()
    (tmp_path / "bad.yaml").write_text("method: dare\ndrop: 1\n")
    assert run_cli("edit", base, ft, "-o", tmp_path / "e", "--config", tmp_path / "bad.yaml") == 2
    assert "unknown key 'drop'" in capsys.readouterr().err


def test_methods_lists_every_method_with_its_parameters(capsys):
    from deltastream.methods import METHODS

    assert run_cli("methods", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["id"] for m in listed} == set(METHODS)
    dare = next(m for m in listed if m["id"] == "dare")
    assert [(p["name"], p["type"], p["default"]) for p in dare["params"]] == [
        ("p", "float", 0.9), ("rescale", "str", "inverse"), ("k", "float", 0.0)]
    assert all(p["help"] for m in listed for p in m["params"])
    assert run_cli("methods") == 0
    assert "dare  (compress, edit)" in capsys.readouterr().out


def test_info_shows_each_tensors_policy(tmp_path, capsys):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (32, 16)), "norm": ("F32", (16,))})
    assert run_cli("compress", base, ft, "-o", tmp_path / "a.dsz", "--method", "bitdelta", "-q") == 0
    capsys.readouterr()
    assert run_cli("info", tmp_path / "a.dsz", "--json") == 0
    tensors = {t["name"]: t["policy"] for t in json.loads(capsys.readouterr().out)["tensors"]}
    assert tensors == {"layers.0.w": "bitdelta", "norm": "lossless"}
