"""One way to name parameters everywhere: CLI ``--param KEY=VALUE``, YAML configs, the Python API.

Each method's parameters are a frozen dataclass; its fields carry their one-line meaning in
``metadata["help"]`` and their allowed values in ``metadata["choices"]`` or a ``__post_init__``
check. Values are parsed here, at the edge, from strings (CLI) or YAML scalars into the field's
type, and every problem (unknown key, wrong type, out of range) is a :class:`ParameterError`
raised before any I/O.
"""

from __future__ import annotations

import dataclasses
import operator
import re
import typing
from typing import Any

from .errors import ParameterError, show

__all__ = ["field", "parse_params", "parse_assignments", "describe_params", "check_range", "range_problem",
           "parse_int", "parse_seed", "parse_workers", "parse_local_cluster", "parse_strings", "is_finite_number",
           "FLOAT32_MAX", "MAX_SEED", "MAX_WORKERS", "MAX_PROCESSES"]

#: every method computes in float32: a parameter beyond it is infinite there
FLOAT32_MAX = 3.4028234663852886e38
#: seeds are 64-bit unsigned (the RNG hashes the seed's decimal digits, docs/format.md: any such
#: value is portable, and a JSON reader with 64-bit integers reads the manifest's back)
MAX_SEED = 2**64 - 1
#: worker threads and local worker processes: bounds far above any machine, below exhaustion
MAX_WORKERS = 1024
MAX_PROCESSES = 256
_INT = re.compile(r"\s*[+-]?[0-9]{1,40}\s*")


def field(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A parameter field with its meaning (and allowed values)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def check_range(method: str, name: str, value: float, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise a ParameterError naming the method and key when value is outside [low, high]."""
    problem = range_problem(name, value, low, high, low_open, high_open)
    if problem:
        raise ParameterError(f"method '{method}': {problem}")


def range_problem(name: str, value: float, low: float | None = None, high: float | None = None,
                  low_open: bool = False, high_open: bool = False) -> str | None:
    """"x=2 is out of range (must be ...)" when value is outside [low, high], else None (NaN,
    which passes every comparison, and infinities are outside every range)."""
    bad = not is_finite_number(value) or (low is not None and (value <= low if low_open else value < low)) or \
        (high is not None and (value >= high if high_open else value > high))
    if not bad:
        return None
    lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
    return f"{name}={show(value)} is out of range (must be {' and '.join(x for x in (lo, hi) if x) or 'finite'})"


def is_finite_number(value: Any) -> bool:
    """A real number (not a bool) that is finite in float32, where the methods compute with it."""
    try:
        return not isinstance(value, bool) and abs(float(value)) <= FLOAT32_MAX
    except (TypeError, ValueError, OverflowError):
        return False


def parse_int(value: Any, what: str, low: int, high: int) -> int:
    """An integer option from the CLI (a string), a YAML scalar or the API, within [low, high];
    a ParameterError naming ``what`` otherwise (never an int of 5000 digits parsed)."""
    try:
        if isinstance(value, str) and _INT.fullmatch(value):
            number = int(value)
        elif isinstance(value, bool):
            raise TypeError(value)
        else:
            number = operator.index(value)  # int, numpy integers; not 2.5, not "two"
    except TypeError:
        number = None
    if number is None or not low <= number <= high:
        shown = f"an integer of {number.bit_length()} bits" if number and number.bit_length() > 128 else show(value)
        raise ParameterError(f"{what} must be an integer from {low} to {high}, not {shown}")
    return number


def parse_seed(value: Any, what: str = "seed") -> int:
    return parse_int(value, what, 0, MAX_SEED)


def parse_workers(value: Any, what: str = "workers") -> int | None:
    """Worker threads: None (every core) or 1..MAX_WORKERS (0 and negatives are refused, not
    taken as "the default" or passed to the thread pool)."""
    return None if value is None else parse_int(value, what, 1, MAX_WORKERS)


def parse_local_cluster(spec: str, what: str) -> int:
    """``local:N`` -> N, the number of worker processes, within 1..MAX_PROCESSES."""
    kind, _, n = str(spec).partition(":")
    try:
        if kind == "local":
            return parse_int(n, what, 1, MAX_PROCESSES)
    except ParameterError:
        pass
    raise ParameterError(f"{what} expects local:N with N an integer from 1 to {MAX_PROCESSES}, not {show(spec)}")


def parse_strings(value: Any, what: str, noun: str) -> tuple[str, ...]:
    """One string or a list (tuple) of them, as a tuple: ``include="*w*"`` is one pattern, not four."""
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ParameterError(f"{what} must be {noun} or a list of them, not {show(value)}")
    return tuple(items)


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(method: str, name: str, value: Any, kind: Any, choices: tuple | None) -> Any:
    where = f"method '{method}': parameter {name}"
    given = value
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
    except (TypeError, ValueError, OverflowError):
        raise ParameterError(f"{where} must be {kind.__name__}, not {show(value)}") from None
    if kind is float and not is_finite_number(value):  # nan, inf, 1e400: every later check would pass them
        raise ParameterError(f"{where} must be a finite number, not {show(given)}")
    if choices is not None and value not in choices:
        raise ParameterError(f"{where} must be one of {', '.join(map(str, choices))}, not {show(value)}")
    return value


def parse_params(method: str, cls: type, values: dict[str, Any]) -> Any:
    """Build the params dataclass from plain values, checking keys, types and choices."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ParameterError(f"method '{method}': unknown parameter {show(unknown[0])} (valid: {valid})")
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
            raise ParameterError(f"--param expects KEY=VALUE, not {show(item)}")
        out[key.strip()] = value.strip()
    return out


def describe_params(cls: type) -> list[dict[str, Any]]:
    """Each field: name, type, default, choices, meaning (for ``deltastream methods``)."""
    types = _types(cls)
    return [{"name": f.name, "type": types[f.name].__name__, "default": f.default,
             "choices": f.metadata.get("choices"), "help": f.metadata.get("help", "")}
            for f in dataclasses.fields(cls)]
