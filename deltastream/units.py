"""Byte sizes as users write them ("5GB", "512MiB", "1e9") and as we print them."""

from __future__ import annotations

import decimal
import re

from .errors import ParameterError, show

__all__ = ["parse_size", "format_size", "MAX_SIZE"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
#: the largest size anything takes (chunk, memory budget, shard): far beyond any machine, and an
#: int64 with room to multiply
MAX_SIZE = 2**50
_NUMBER = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a byte size; decimal units as Hugging Face uses them (5GB = 5e9), binary with 'i'.

    Exact (1.1GB is 1100000000, not a float's rounding), and bounded before any arithmetic on it:
    1e400, inf, nan, a negative, zero or fractional number of bytes are refused in one line."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ParameterError(f"invalid {what} {show(text)}: expected a number of bytes like 512MiB or 5GB")
    if isinstance(text, int) and not -MAX_SIZE <= text <= MAX_SIZE:  # str() of 5000 digits fails
        raise ParameterError(f"invalid {what} (an integer of {text.bit_length()} bits): "
                             + ("must be positive" if text < 0 else f"must be at most {MAX_SIZE >> 40} TiB"))
    match = _NUMBER.fullmatch(str(text))
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise ParameterError(f"invalid {what} {show(text)}: expected a number of bytes like 512MiB or 5GB")
    number = decimal.Decimal(match.group(1))  # exact; compared before any arithmetic, whatever its exponent
    if number <= 0:
        raise ParameterError(f"invalid {what} {show(text)}: must be positive")
    if number.adjusted() > 20:
        raise ParameterError(f"invalid {what} {show(text)}: must be at most {MAX_SIZE >> 40} TiB")
    if number.adjusted() < -20:
        raise ParameterError(f"invalid {what} {show(text)}: not a whole number of bytes")
    value = decimal.Context(prec=len(match.group(1)) + 40).multiply(number, _UNITS[unit])  # exact
    if value > MAX_SIZE:
        raise ParameterError(f"invalid {what} {show(text)}: must be at most {MAX_SIZE >> 40} TiB")
    if value != value.to_integral_value():
        raise ParameterError(f"invalid {what} {show(text)}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
