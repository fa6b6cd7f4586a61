"""The model analyze computes losses and gradients with: a transformers causal LM, in eval mode."""

from __future__ import annotations

import os
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import tensor_context
from .errors import AnalysisError, require_transformers

__all__ = ["DTYPES", "load_model", "parameters_by_name"]

DTYPES = ("float32", "bfloat16")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_model(folder: str, dtype: str, device: str):
    """The fine-tune as a transformers causal LM in ``dtype``, eval mode, on ``device``; every
    weight must come from the checkpoint (none initialised at random)."""
    require_transformers()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # ours shows the passes; theirs would show loading
    where = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:  # OSError (no config.json), ValueError (unknown model_type)...
        raise AnalysisError(f"{tensor_context(where)}: transformers cannot read the model's config.json: "
                            f"{_first_line(exc)}") from None
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            where, config=config, output_loading_info=True, **{key: getattr(torch, dtype)})
        model, info = loaded
    except Exception as exc:
        raise AnalysisError(f"{tensor_context(where)}: transformers cannot build a causal LM of type "
                            f"'{getattr(config, 'model_type', '?')}': {_first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise AnalysisError(f"{tensor_context(where, missing[0])}: the checkpoint lacks {len(missing)} of the "
                            "model's weights, which transformers would initialise at random")
    return model.eval().to(device)


def parameters_by_name(model, checkpoint: Checkpoint) -> dict:
    """Checkpoint tensor name -> the model's parameter holding it (a tied weight under each of
    its names)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return {name: named[name] for name in checkpoint.tensors if name in named}
