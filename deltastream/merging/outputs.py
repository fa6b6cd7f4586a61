"""What a merged checkpoint carries besides its tensors: the base's config (``torch_dtype`` set)
and tokenizer files, the config used (``mergekit_config.yml``) and a README.md model card."""

from __future__ import annotations

import json
import os

from .._version import __version__
from ..checkpoint import copy_side_file, load_side_file
from ..errors import CheckpointError, tensor_context
from .config import MergeConfig

__all__ = ["write_side_files", "write_config_and_card", "model_card"]


def write_side_files(folder: str, side_files: dict[str, str], out_dtype: str | None) -> None:
    names = {v: k for k, v in {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.items()}
    for name, path in side_files.items():
        target = os.path.join(folder, name)
        if name == "config.json" and out_dtype:
            text = load_side_file(path)
            try:
                config = json.loads(text)
            except (ValueError, RecursionError):
                config = None
            if not isinstance(config, dict):
                raise CheckpointError(f"{tensor_context(path)}: cannot set torch_dtype: not a JSON object")
            config["torch_dtype"] = names[out_dtype]
            with open(target, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        else:
            copy_side_file(path, target)


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
