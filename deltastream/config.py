"""Job configs: a YAML file with the keys the CLI and the Python API take.

    method: dare
    params: {p: 0.9, rescale: l1}
    seed: 42
    include: ["*embed_tokens*"]
    exclude: []
    chunk_size: 16MiB

Command-line options given alongside override the file. Unknown keys fail before any I/O, with
the key named.
"""

from __future__ import annotations

from typing import Any

from .errors import ParameterError

__all__ = ["JOB_KEYS", "load_job_config"]

JOB_KEYS = ("method", "params", "seed", "include", "exclude", "chunk_size", "memory", "workers", "max_shard_size",
            "fine_tunes")


def load_job_config(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ParameterError(f"file '{path}': cannot read config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ParameterError(f"file '{path}': invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ParameterError(f"file '{path}': a config is a mapping of {', '.join(JOB_KEYS)}")
    unknown = sorted(set(doc) - set(JOB_KEYS))
    if unknown:
        raise ParameterError(f"file '{path}': unknown key '{unknown[0]}' (valid: {', '.join(JOB_KEYS)})")
    if not isinstance(doc.get("params", {}), dict):
        raise ParameterError(f"file '{path}': 'params' must be a mapping of KEY: VALUE")
    for key in ("include", "exclude", "fine_tunes"):
        if isinstance(doc.get(key), str):
            doc[key] = [doc[key]]
    return doc
