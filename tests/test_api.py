"""The Python API refuses mistakes instead of swallowing them, and says what it returns."""

from __future__ import annotations

import os

import pytest

import deltastream as ds
from deltastream.errors import ParameterError
from deltastream.methods import get_method

from common import make_pair

SPECS = {"w": ("BF16", (8, 16))}


@pytest.mark.parametrize("call", ["compress", "edit"])
@pytest.mark.parametrize("keyword", ["chunksize", "overwrte"])
def test_method_object_refuses_a_misspelled_keyword(tmp_path, call, keyword):
    base, ft = make_pair(str(tmp_path), SPECS)
    out = str(tmp_path / "out")
    with pytest.raises(ParameterError, match=rf"{call}\(\): unexpected keyword argument\(s\) {keyword} "):
        getattr(ds, call)(base, ft, out, get_method("dare", p=0.5), **{keyword: 1})
    assert not os.path.exists(out)


@pytest.mark.parametrize("call", ["compress", "edit"])
def test_method_name_refuses_a_keyword_it_does_not_have(tmp_path, call):
    base, ft = make_pair(str(tmp_path), SPECS)
    with pytest.raises(ParameterError, match="method 'dare': unknown parameter 'chunksize'"):
        getattr(ds, call)(base, ft, str(tmp_path / "out"), "dare", chunksize=1)


def test_method_of_the_wrong_type_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="method must be a method name or a Method, not int"):
        ds.compress("a", "b", str(tmp_path / "out"), 3)


def test_compress_returns_a_path_for_one_fine_tune_and_a_list_for_several(tmp_path):
    base, ft = make_pair(str(tmp_path), SPECS)
    one = ds.compress(base, ft, str(tmp_path / "one.dsz"))
    assert isinstance(one, str) and os.path.isdir(one)
    many = ds.compress(base, [ft, ft], str(tmp_path / "many"))
    assert isinstance(many, list) and len(many) == 2 and all(isinstance(p, str) and os.path.isdir(p) for p in many)


def test_the_package_ships_its_type_information():
    assert os.path.isfile(os.path.join(os.path.dirname(ds.__file__), "py.typed"))


def test_every_method_the_demo_runs_is_one_the_registry_accepts():
    from deltastream.demo import DEMO_EDITS, DEMO_RUNS

    for name, params in DEMO_RUNS + DEMO_EDITS:
        assert get_method(name, **params).get_config()["id"] == name
