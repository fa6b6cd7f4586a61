"""The method registry: one line per method. An unknown name lists the valid ones.

Importing a method's module also registers its numba and torch implementations (backends.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import ParameterError, show
from .base import Method, StoredArray
from .bitdelta import BitDelta
from .dare import Biased, Dare
from .dare_bitdelta import DareBitDelta
from .extrapolate import Extrapolate
from .lossless import Lossless
from .lowrank import LowRank
from .multibit import MultiBit
from .ternary import Ternary
from .trim import Trim

__all__ = ["METHODS", "Method", "StoredArray", "get_method", "method_from_config"]

METHODS: dict[str, type[Method]] = {
    Lossless.method_id: Lossless,
    Dare.method_id: Dare,
    Biased.method_id: Biased,
    BitDelta.method_id: BitDelta,
    DareBitDelta.method_id: DareBitDelta,
    Extrapolate.method_id: Extrapolate,
    Trim.method_id: Trim,
    LowRank.method_id: LowRank,
    MultiBit.method_id: MultiBit,
    Ternary.method_id: Ternary,
}


def get_method(name: str, **params: Any) -> Method:
    """A method by name, its parameters checked (unknown key, type, range: ParameterError)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ParameterError(f"unknown method {show(name)}; valid methods: {', '.join(sorted(METHODS))}") from None
    return cls(**params)


def method_from_config(config: dict[str, Any]) -> Method:
    """The method a config (an artifact's manifest) names. Artifacts written before multi-bit
    BitDelta had its own id say ``{"id": "bitdelta", "bits": b, ...}``: b = 0 is bitdelta, b >= 1
    is multibit (per tensor, scale; the same stored arrays)."""
    config = dict(config)
    name = config.pop("id")
    if name == BitDelta.method_id and "bits" in config:
        bits = config.pop("bits")
        if bits:  # the old code allowed bits >= 1 only with these; anything else is not a real artifact
            legacy = {"per": "tensor", "residual": 0, "zero": "plus"}
            if any(config.get(k, v) != v for k, v in legacy.items()):
                raise ParameterError(f"method 'bitdelta': bits={bits} (multi-bit) with "
                                     f"{', '.join(f'{k}={config[k]}' for k in legacy if k in config)}: not a "
                                     "configuration any version wrote")
            name, config = MultiBit.method_id, {"bits": bits, "scale": config.get("scale", 1.0)}
    return get_method(name, **config)
