"""Job configs: a YAML file with the keys the CLI and the Python API take.

    method: dare
    params: {p: 0.9, rescale: l1}
    seed: 42
    include: ["*embed_tokens*"]
    exclude: []
    chunk_size: 16MiB

Command-line options given alongside override the file. Every field is parsed here into its type
(a seed an integer in range, sizes in bytes, patterns a list of strings, params checked against
the method), before any I/O; an unknown key or a bad value is one line naming the file, the line
and the key. A key left empty (``seed:``) is not given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ParameterError, show, tensor_context
from .methods import METHODS, get_method
from .params import parse_params, parse_seed, parse_strings, parse_workers
from .units import parse_size
from .yamlconfig import load_yaml

__all__ = ["JOB_KEYS", "load_job_config"]

def _method(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ParameterError(f"{key} must be a method name, not {show(value)}")
    get_method(value)  # an unknown name: the message that lists the valid ones
    return value


def _strings(noun: str) -> Callable[[Any, str], tuple[str, ...]]:
    return lambda value, key: parse_strings(value, key, noun)


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ParameterError(f"{key} must be a mapping of KEY: VALUE, not {show(value)}")
    return value


#: each key's parser: (value, key) -> the typed value, or a ParameterError naming the key
_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "method": _method, "params": _mapping, "seed": parse_seed,
    "include": _strings("a glob pattern"), "exclude": _strings("a glob pattern"),
    "chunk_size": parse_size, "memory": parse_size, "workers": parse_workers, "max_shard_size": parse_size,
    "fine_tunes": _strings("a checkpoint path"),
}
JOB_KEYS = tuple(_FIELDS)


def load_job_config(path: str, method: str | None = None) -> dict[str, Any]:
    """The config's fields, each parsed; its ``params`` are checked against ``method`` (the
    command line's) or else the config's own method."""
    _, doc, lines = load_yaml(path, "config")
    doc = {} if doc is None else doc

    def where(*keys) -> str:
        line = lines.get(keys)
        return tensor_context(path) + (f" line {line}" if line else "")

    if not isinstance(doc, dict):
        raise ParameterError(f"{where()}: a config is a mapping of {', '.join(JOB_KEYS)}")
    unknown = [key for key in doc if key not in JOB_KEYS]
    if unknown:
        raise ParameterError(f"{where(unknown[0])}: unknown key {show(unknown[0])} (valid: {', '.join(JOB_KEYS)})")
    out = {}
    for key, value in doc.items():
        if value is not None:
            try:
                out[key] = _FIELDS[key](value, key)
            except ParameterError as exc:
                raise ParameterError(f"{where(key)}: {exc}") from None
    name = method or out.get("method")
    if out.get("params") and name in METHODS:
        _check_params(name, out["params"], where)
    return out


def _check_params(name: str, params: dict, where: Callable[..., str]) -> None:
    """Each parameter alone (its line named), then all together (cross-field rules)."""
    cls = METHODS[name]
    for key, value in params.items():
        try:
            parse_params(name, cls.Params, {key: value})
        except ParameterError as exc:
            raise ParameterError(f"{where('params', key)}: {exc}") from None
    try:
        get_method(name, **params)
    except ParameterError as exc:
        raise ParameterError(f"{where('params')}: {exc}") from None
