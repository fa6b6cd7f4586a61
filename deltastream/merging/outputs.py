"""What a merged checkpoint carries besides its tensors: the base's config (``torch_dtype`` set)
and tokenizer files, the config used (``mergekit_config.yml``) and a README.md model card."""

from __future__ import annotations

import json
import os

from .._version import __version__
from ..checkpoint import copy_side_file, load_side_file
from ..errors import CheckpointError, tensor_context
from .config import MergeConfig

__all__ = ["write_side_files", "write_config_and_card", "model_card", "finish_outputs", "TOKENIZER_FILES",
           "LAYER_KEYS"]

#: a checkpoint's tokenizer files: not copied when the merge saves a tokenizer of its own
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                             "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                             "chat_template.jinja", "chat_template.json"})
#: config.json keys of the layer count (the first present is set; num_hidden_layers if none is)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def write_side_files(folder: str, side_files: dict[str, str], out_dtype: str | None,
                     updates: dict | None = None, skip: frozenset[str] = frozenset()) -> None:
    """The reference's side files; config.json with ``torch_dtype`` set to ``out_dtype`` and the
    ``updates`` (``num_hidden_layers``: a frankenmerge's layers; ``vocab_size``: a merged tokenizer's)."""
    names = {v: k for k, v in {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.items()}
    for name, path in side_files.items():
        target = os.path.join(folder, name)
        if name in skip:
            continue
        if name == "config.json" and (out_dtype or updates):
            text = load_side_file(path)
            try:
                config = json.loads(text)
            except (ValueError, RecursionError):
                config = None
            if not isinstance(config, dict):
                what = "set torch_dtype" if out_dtype else f"set {', '.join(sorted(updates or {}))}"
                raise CheckpointError(f"{tensor_context(path)}: cannot {what}: not a JSON object")
            if out_dtype:
                config["torch_dtype"] = names[out_dtype]
            for key, value in (updates or {}).items():
                if key == "num_hidden_layers":
                    key = next((k for k in LAYER_KEYS if k in config), key)
                config[key] = value
            with open(target, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        else:
            copy_side_file(path, target)


def finish_outputs(folder: str, side_files: dict[str, str], cfg: MergeConfig, updates: dict | None, vocab) -> None:
    """The side files, and the merged tokenizer (``vocab``: merging.tokenizer.VocabPlan) if any."""
    skip = TOKENIZER_FILES if vocab is not None else frozenset()
    write_side_files(folder, side_files, cfg.out_dtype or cfg.dtype, updates, skip)
    if vocab is not None:
        vocab.save(folder)


def write_config_and_card(folder: str, cfg: MergeConfig, title: str, seed: int) -> None:
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as f:
        f.write(cfg.text)
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(cfg, title, seed))


def model_card(cfg: MergeConfig, title: str, seed: int) -> str:
    import yaml

    front = yaml.safe_dump({"base_model": [cfg.base_ref] if cfg.base_ref else [], "tags": ["merge", "deltastream"],
                            "library_name": "transformers"}, sort_keys=True)
    models = "\n".join(f"* {m.model}" for m in cfg.models)
    return (f"---\n{front}---\n# {title}\n\nThis is a merge of pre-trained language models created with "
            f"deltastream {__version__}.\n\n## Merge Details\n### Merge Method\n\nThis model was merged using the "
            f"{cfg.method} merge method" + (f" using {cfg.base_ref} as a base" if cfg.base_ref else "") +
            f", with random seed {seed}.\n\n### Models Merged\n\n{models}\n\n### Configuration\n\n"
            f"The following YAML configuration was used to produce this model:\n\n```yaml\n{cfg.text.rstrip()}\n```\n")
