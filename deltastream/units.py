"""Byte sizes as users write them ("5GB", "512MiB", "1e9") and as we print them."""

from __future__ import annotations

import re

from .errors import ParameterError

__all__ = ["parse_size", "format_size"]

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse a byte size; decimal units as Hugging Face uses them (5GB = 5e9), binary with 'i'."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match and match.group(2).lower()
        if not match or unit not in _UNITS:
            raise ParameterError(f"invalid {what} {text!r}: expected a number of bytes like 512MiB or 5GB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ParameterError(f"invalid {what} {text!r}: must be positive")
    return value


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
