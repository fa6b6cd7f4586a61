"""The analysis' own error: a model or data problem, one line, as every DeltastreamError."""

from __future__ import annotations

from ..errors import DeltastreamError

__all__ = ["AnalysisError", "require_transformers"]


class AnalysisError(DeltastreamError, ValueError):
    """The model cannot be built, the data is too short, a tokenizer is missing..."""


def require_transformers() -> None:
    """transformers is the optional extra ``analysis``: say how to get it rather than fail deep inside."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise AnalysisError("analyze needs transformers: pip install 'deltastream[analysis]'") from None
