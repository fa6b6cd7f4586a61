"""The manifest's field checks: each takes a JSON value and the field's name, and returns the
value or raises :class:`Bad` saying which field and why (load_manifest adds file and tensor)."""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import escape

__all__ = ["Bad", "show", "need", "get", "as_dict", "string", "integer", "number", "as_list", "crcs", "shape",
           "strings", "U32", "MAX_DIMS"]

U32 = 2**32 - 1
MAX_DIMS = 64


class Bad(ValueError):
    """A manifest field that is not what the format says; ``tensor`` names its tensor entry."""

    def __init__(self, message: str, tensor: str | None = None):
        super().__init__(message)
        self.tensor = tensor


def show(value: Any) -> str:
    return escape(json.dumps(value))[:60]


def need(ok: bool, message: str) -> None:
    if not ok:
        raise Bad(message)


def get(obj: dict, key: str, what: str = "") -> Any:
    need(key in obj, f"'{what}{key}' is missing")
    return obj[key]


def as_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise Bad(f"'{what}' is {show(value)}, not an object")
    return value


def string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Bad(f"'{what}' is {show(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Bad(f"'{what}' is not valid UTF-8 (it holds a lone surrogate)") from None
    return value


def integer(value: Any, what: str, low: int, high: int) -> int:
    if not (type(value) is int and low <= value <= high):
        raise Bad(f"'{what}' is {show(value)}, not an integer in [{low}, {high}]")
    return value


def number(value: Any, what: str) -> float:
    if not (type(value) in (int, float) and math.isfinite(value)):
        raise Bad(f"'{what}' is {show(value)}, not a finite number")
    return value


def as_list(value: Any, what: str, length: int | None = None) -> list:
    if not isinstance(value, list):
        raise Bad(f"'{what}' is {show(value)}, not a list")
    if length is not None and len(value) != length:
        raise Bad(f"'{what}' has {len(value)} entries, expected {length}")
    return value


def crcs(value: Any, what: str, length: int) -> list[int]:
    """A list of one CRC-32C per chunk (checked in one pass; a chunk list can be long)."""
    if not all(type(c) is int and 0 <= c <= U32 for c in as_list(value, what, length)):
        for i, crc in enumerate(value):
            integer(crc, f"{what}[{i}]", 0, U32)
    return value


def shape(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and len(value) <= MAX_DIMS):
        raise Bad(f"'{what}' is {show(value)}, not a list of dimensions")
    return tuple(integer(d, f"{what}[{i}]", 0, 2**63 - 1) for i, d in enumerate(value))


def strings(value: Any, what: str) -> list[str]:
    return [string(s, f"{what}[{i}]") for i, s in enumerate(as_list(value, what))]
