"""deltastream: streaming, out-of-core compression, editing and merging of fine-tune deltas.

It memory-maps safetensors checkpoints, cuts every tensor into chunks and computes, encodes and
writes deltas chunk by chunk through a Dask graph, so peak memory is set by the chunk size and
worker count, never by the model's size.
"""

from ._version import __version__
from .api import analyze, apply, compress, edit, extract_lora, info, merge, verify
from .errors import DeltastreamError

__all__ = ["DeltastreamError", "__version__", "analyze", "apply", "compress", "edit", "extract_lora", "info", "merge",
           "verify"]
