"""Merging many fine-tunes, streamed: mergekit's configs and methods, deltastream's engine.

(The package is ``merging`` so that it does not shadow the ``deltastream.merge`` function.)
"""

from ..errors import DeltastreamWarning
from .config import MergeConfig, load_merge_config
from .job import merge
from .methods import MERGE_METHODS, STREAMED
from .plan import build_plan
from .sparsifiers import SPARSIFIERS

__all__ = ["MERGE_METHODS", "STREAMED", "SPARSIFIERS", "DeltastreamWarning", "MergeConfig", "build_plan",
           "load_merge_config", "merge"]
