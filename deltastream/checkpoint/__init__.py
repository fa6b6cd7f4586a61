"""Reading and writing safetensors checkpoints, streamed, and the side files that go with them."""

from .header import Header, TensorInfo, read_header
from .reader import Checkpoint, head_crc32c, open_checkpoint, read_bits
from .sidefiles import copy_side_file, find_side_files, load_side_file
from .writer import CheckpointWriter, OutputTensor, plan_shards

__all__ = [
    "Checkpoint", "CheckpointWriter", "Header", "OutputTensor", "TensorInfo", "copy_side_file",
    "find_side_files", "head_crc32c", "load_side_file", "open_checkpoint", "plan_shards", "read_bits", "read_header",
]
