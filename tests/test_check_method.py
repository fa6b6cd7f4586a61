"""Every registered method passes check_method (method_check.py) with its defaults and the
parameter sets it declares: the list is the registry's, so a method added there (with its
``examples``) is checked here without a line more."""

import pytest

from deltastream.methods import METHODS, get_method

from method_check import check_method

#: each method with its defaults and the parameter sets it declares (``Method.examples``)
CASES = [(name, params) for name in sorted(METHODS) for params in [{}, *METHODS[name].examples]]


@pytest.mark.parametrize("name,params", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES])
def test_check_method(tmp_path, name, params):
    check_method(get_method(name, **params), str(tmp_path))
