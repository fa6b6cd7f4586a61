"""The errors deltastream raises on bad input.

Every error a user can cause is a :class:`DeltastreamError` that also inherits the matching
builtin (so ``except ValueError`` keeps working), and its message is one line that names the
file and, where there is one, the tensor. The CLI prints that line and exits non-zero; it never
shows a traceback for these.
"""

from __future__ import annotations

import re

__all__ = [
    "DeltastreamError",
    "CheckpointError",
    "MismatchError",
    "ArtifactError",
    "CorruptChunkError",
    "WrongBaseError",
    "OutputExistsError",
    "ParameterError",
    "Interrupted",
    "DeltastreamWarning",
    "escape",
    "show",
    "tensor_context",
]


class DeltastreamError(Exception):
    """Base of every error caused by the user's input or environment."""

    exit_code = 2


class CheckpointError(DeltastreamError, ValueError):
    """A checkpoint file or index is malformed (truncated, bad header, bad offsets)."""


class MismatchError(DeltastreamError, ValueError):
    """Base and fine-tune do not line up (missing tensor, shape or dtype mismatch)."""


class ArtifactError(DeltastreamError, ValueError):
    """An artifact is not a deltastream artifact, or is of an unsupported version."""


class CorruptChunkError(ArtifactError):
    """A stored chunk fails its checksum or does not decode."""


class WrongBaseError(DeltastreamError, ValueError):
    """The base given at apply/verify time is not the one the artifact was made from."""


class OutputExistsError(DeltastreamError, FileExistsError):
    """The output path exists and ``--overwrite`` was not given."""


class DeltastreamWarning(UserWarning):
    """Something deltastream did on the user's behalf that they should know (a cropped vocabulary,
    an option it ignores); the CLI shows it as one ``deltastream: warning:`` line."""


class ParameterError(DeltastreamError, ValueError):
    """A command-line or API parameter is invalid (bad size, unknown method...)."""


class Interrupted(DeltastreamError, KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM: its partial output is removed (kept with --resume)."""

    exit_code = 130


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: object) -> str:
    """``text`` with every control character, lone surrogate and bidi/zero-width mark written as
    a ``\\xNN`` / ``\\uNNNN`` escape: a name from a file can neither break the one-line message
    (newlines), drive the terminal (ANSI escapes) nor fail to print (surrogates). Idempotent."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                            else f"\\u{ord(m.group()):04x}", str(text))


def show(value: object, limit: int = 60) -> str:
    """A value from a file or the command line for a message: its repr, escaped and cut short
    (a shape may list a million items, a seed have 5000 digits)."""
    text = escape(repr(value))
    return text if len(text) <= limit else text[:limit] + "..."


def tensor_context(path: object, tensor: str | None = None) -> str:
    """The "tensor 'x' in file 'y'" prefix every message starts with (names escaped)."""
    if tensor is None:
        return f"file '{escape(path)}'"
    return f"tensor '{escape(tensor)}' in file '{escape(path)}'"
