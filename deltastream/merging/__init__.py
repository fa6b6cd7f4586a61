"""Merging many fine-tunes, streamed: mergekit's configs and methods, deltastream's engine.

(The package is ``merging`` so that it does not shadow the ``deltastream.merge`` function.)
"""

from .config import MergeConfig, load_merge_config
from .job import merge
from .methods import MERGE_METHODS

__all__ = ["MERGE_METHODS", "MergeConfig", "load_merge_config", "merge"]
