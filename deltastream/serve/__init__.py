"""Serving many fine-tunes off one base: :class:`VariantBank` (bank.py) runs mixed batches straight
from compressed deltas; ``deltastream serve`` (server.py, command.py) is an OpenAI-compatible HTTP
server over it. docs/serve.md has the API, the memory model and the figures.

Imported lazily: ``import deltastream.serve.command`` (the CLI's parser) loads neither torch nor
transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .bank import UnknownVariantError, VariantBank

__all__ = ["VariantBank", "UnknownVariantError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import bank

        return getattr(bank, name)
    raise AttributeError(f"module 'deltastream.serve' has no attribute {name!r}")
