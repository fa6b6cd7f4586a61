"""The merge methods: mergekit's generalized task arithmetic family (``task_arithmetic``: linear,
ties, dare, breadcrumbs, della), and the streamed methods, each in its own module and registered
in ``STREAMED`` (``base``): slerp, nuslerp, multislerp, karcher, model_stock, sce, nearswap,
arcee_fusion, passthrough."""

from . import arcee_fusion, karcher, model_stock, multislerp, nearswap, nuslerp, passthrough, sce, slerp  # noqa: F401
from .base import STREAMED, Chunk, Param, StreamedMethod, TensorJob
from .task_arithmetic import GLOBAL, MERGE_METHODS, PER_MODEL, TINY_DIVISOR, MergeSpec, combine, linear

__all__ = ["MergeSpec", "MERGE_METHODS", "PER_MODEL", "GLOBAL", "combine", "linear", "TINY_DIVISOR", "STREAMED",
           "StreamedMethod", "Param", "Chunk", "TensorJob", "method_names"]


def method_names() -> list[str]:
    """Every merge_method a config may name."""
    return sorted(set(MERGE_METHODS) | set(STREAMED))
