"""The Hugging Face files that travel with the weights: config, generation config, tokenizer.

They are small, so they are carried whole: stored inside artifacts and copied to every output
checkpoint, so that the rebuilt or edited model loads with ``from_pretrained`` as it is.
"""

from __future__ import annotations

import os
import re

__all__ = ["SIDE_FILE_PATTERN", "find_side_files", "is_side_file"]

#: config.json, generation_config.json, tokenizer files, chat templates, processor configs
SIDE_FILE_PATTERN = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|tokenizer\.model"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
    r"|chat_template\.(jinja|json)|(pre)?processor_config\.json|spiece\.model|sentencepiece\.bpe\.model)$"
)

#: a side file larger than this is not carried (it is not a config or tokenizer file)
MAX_SIDE_FILE_BYTES = 256 << 20


def is_side_file(name: str) -> bool:
    return bool(SIDE_FILE_PATTERN.match(name))


def find_side_files(folder: str) -> dict[str, str]:
    """The side files in a checkpoint folder, by name, in a stable order."""
    if not folder or not os.path.isdir(folder):
        return {}
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_side_file(name) and os.path.isfile(path) and os.path.getsize(path) <= MAX_SIDE_FILE_BYTES:
            found[name] = path
    return found
