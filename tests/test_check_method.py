"""Every registered method passes check_method (method_check.py) with a couple of parameter sets;
the list is the registry's, so a method added there is checked here without a line more."""

import pytest

from deltastream.methods import METHODS, get_method

from method_check import check_method

#: parameter sets beyond each method's defaults (their fast paths, their passes, their options)
PARAMS = {"dare": [{"p": 0.5, "k": -0.5}, {"p": 0.6, "rescale": "l1"}], "biased": [{"p": 0.3, "k": 0.2}],
          "bitdelta": [{"per": "row", "zero": "keep"}, {"residual": 1}], "multibit": [{"bits": 2, "scale": 1.25}],
          "dare_bitdelta": [{"p": 0.5, "rescale": "none"}], "extrapolate": [{"alpha": -0.5}],
          "trim": [{"density": 0.3, "scope": "global"}], "lowrank": [{"rank_fraction": 0.25}],
          "ternary": [{"threshold": 1.2, "scale": 0.5}]}
CASES = [(name, params) for name in sorted(METHODS) for params in [{}] + PARAMS.get(name, [])]


@pytest.mark.parametrize("name,params", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in CASES])
def test_check_method(tmp_path, name, params):
    check_method(get_method(name, **params), str(tmp_path))
