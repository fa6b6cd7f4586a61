"""The Hugging Face files that travel with the weights: config, generation config, tokenizer.

They are small, so they are carried whole: stored inside artifacts and copied to every output
checkpoint, so that the rebuilt or edited model loads with ``from_pretrained`` as it is. Like the
weights they are untrusted: each must be a regular file (a FIFO or a link to /dev/zero is
refused, never waited on or read without end) of bounded size, checked again whenever it is read.
"""

from __future__ import annotations

import os
import re
import shutil

from .header import open_regular

__all__ = ["SIDE_FILE_PATTERN", "MAX_SIDE_FILE_BYTES", "copy_side_file", "find_side_files", "is_side_file",
           "load_side_file"]

#: config.json, generation_config.json, tokenizer files, chat templates, processor configs
SIDE_FILE_PATTERN = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|chat_template\.(jinja|json)|(pre)?processor_config\.json|spiece\.model|sentencepiece\.bpe\.model)$"
)

#: the largest side file carried: the biggest tokenizer.json files (large multilingual vocabularies)
#: are tens of MB, so this leaves ample room and still bounds what is read whole
MAX_SIDE_FILE_BYTES = 256 << 20


def is_side_file(name: str) -> bool:
    return bool(SIDE_FILE_PATTERN.match(name))


def _open_side_file(path: str):
    return open_regular(path, MAX_SIDE_FILE_BYTES, "side file")


def find_side_files(folder: str) -> dict[str, str]:
    """The side files in a checkpoint folder, by name, in a stable order; one that is not a
    regular file or is over the bound is refused (leaving it out would give a model that does not load)."""
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for name in sorted(os.listdir(folder)):
        if is_side_file(name):
            path = os.path.join(folder, name)
            _open_side_file(path).close()
            found[name] = path
    return found


def load_side_file(path: str) -> bytes:
    """A side file's bytes, read as a bounded regular file (it may have changed since it was found)."""
    with _open_side_file(path) as f:
        return f.read(MAX_SIDE_FILE_BYTES)


def copy_side_file(path: str, target: str) -> None:
    """Copy a side file into an output folder, read as in load_side_file."""
    with _open_side_file(path) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
