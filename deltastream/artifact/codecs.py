"""The zarr v3 codec chains an artifact uses: spec codecs only (bytes, blosc, zstd, crc32c).

Every chain ends in crc32c, so a damaged chunk fails its checksum on read and is reported by
name. The compression presets are keyed by the kind of data a method stores; docs/format.md
gives the measurements that chose them.
"""

from __future__ import annotations

import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

__all__ = ["COMPRESSION", "codecs_for"]

#: preset name -> function(dtype) -> compressors (bytes-to-bytes codecs) for zarr.create_array
COMPRESSION = {
    # XOR of bit patterns: zero high bit planes; bit-shuffle groups them, zstd packs them
    "xor": lambda dtype: [BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle,
                                     typesize=np.dtype(dtype).itemsize), Crc32cCodec()],
    # raw bytes that do not compress (packed sign bits): checksum only
    "raw": lambda dtype: [Crc32cCodec()],
    # small side files (JSON, tokenizers)
    "zstd": lambda dtype: [ZstdCodec(level=9), Crc32cCodec()],
}


def codecs_for(preset: str, dtype: np.dtype) -> list:
    return COMPRESSION[preset](dtype)
