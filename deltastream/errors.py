"""The errors deltastream raises on bad input.

Every error a user can cause is a :class:`DeltastreamError` that also inherits the matching
builtin (so ``except ValueError`` keeps working), and its message is one line that names the
file and, where there is one, the tensor. The CLI prints that line and exits non-zero; it never
shows a traceback for these.
"""

from __future__ import annotations

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


class ParameterError(DeltastreamError, ValueError):
    """A command-line or API parameter is invalid (bad size, unknown method...)."""


class Interrupted(DeltastreamError, KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM; partial output has been removed."""

    exit_code = 130


def tensor_context(path: object, tensor: str | None = None) -> str:
    """The "tensor 'x' in file 'y'" prefix every message starts with."""
    if tensor is None:
        return f"file '{path}'"
    return f"tensor '{tensor}' in file '{path}'"
