"""Reading and writing safetensors checkpoints, streamed, and the side files that go with them."""

from .header import Header, TensorInfo, read_header
from .reader import Checkpoint, open_checkpoint, read_bits
from .sidefiles import find_side_files
from .writer import CheckpointWriter, OutputTensor, plan_shards

__all__ = [
    "Checkpoint", "CheckpointWriter", "Header", "OutputTensor", "TensorInfo",
    "find_side_files", "open_checkpoint", "plan_shards", "read_bits", "read_header",
]
