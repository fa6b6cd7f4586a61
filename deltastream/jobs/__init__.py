"""The jobs users run, one module each: compress, apply/verify, info."""

from .apply import apply, verify
from .compress import compress
from .info import format_info, info

__all__ = ["apply", "compress", "format_info", "info", "verify"]
