"""One way to name parameters everywhere: CLI ``--param KEY=VALUE``, YAML configs, the Python API.

Each method's parameters are a frozen dataclass; its fields carry their one-line meaning in
``metadata["help"]`` and their allowed values in ``metadata["choices"]`` or a ``__post_init__``
check. Values are parsed here, at the edge, from strings (CLI) or YAML scalars into the field's
type, and every problem (unknown key, wrong type, out of range) is a :class:`ParameterError`
raised before any I/O.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .errors import ParameterError

__all__ = ["field", "parse_params", "parse_assignments", "describe_params", "check_range"]


def field(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A parameter field with its meaning (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def check_range(method: str, name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise a ParameterError naming the method and key when value is outside [low, high]."""
    bad = (low is not None and (value <= low if low_open else value < low)) or \
          (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise ParameterError(f"method '{method}': {name}={value!r} is out of range (must be "
                             f"{' and '.join(x for x in (lo, hi) if x)})")


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(method: str, name: str, value: Any, kind: Any, choices: tuple | None) -> Any:
    where = f"method '{method}': parameter {name}"
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif kind is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{where} must be {kind.__name__}, not {value!r}") from None
    if choices is not None and value not in choices:
        raise ParameterError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    return value


def parse_params(method: str, cls: type, values: dict[str, Any]) -> Any:
    """Build the params dataclass from plain values, checking keys, types and choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ParameterError(f"method '{method}': unknown parameter '{unknown[0]}' (valid: {valid})")
    types = _types(cls)
    kwargs = {name: _convert(method, name, value, types[name], fields[name].metadata.get("choices"))
              for name, value in values.items()}
    return cls(**kwargs)


def parse_assignments(items: list[str] | None) -> dict[str, str]:
    """``["p=0.9", "rescale=l1"]`` -> ``{"p": "0.9", "rescale": "l1"}``."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"--param expects KEY=VALUE, not {item!r}")
        out[key.strip()] = value.strip()
    return out


def describe_params(cls: type) -> list[dict[str, Any]]:
    """Each field: name, type, default, choices, meaning (for ``deltastream methods``)."""
    types = _types(cls)
    return [{"name": f.name, "type": types[f.name].__name__, "default": f.default,
             "choices": f.metadata.get("choices"), "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls)]
