"""Loading a checkpoint folder as a transformers causal LM, every weight from the checkpoint
(``analyze`` and ``serve`` both run one; transformers is their optional extra)."""

from __future__ import annotations

from typing import Any

from .errors import DeltastreamError, tensor_context

__all__ = ["load_causal_lm", "first_line"]


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def load_causal_lm(where: str, torch_dtype: Any, error: type[DeltastreamError]):
    """``AutoModelForCausalLM`` of the folder ``where`` in ``torch_dtype`` (a torch dtype or
    "auto"), eval mode, on the CPU; a folder transformers cannot read, or a checkpoint lacking
    weights it would initialise at random, is one ``error`` line naming the folder."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as exc:  # OSError (no config.json), ValueError (unknown model_type)...
        raise error(f"{tensor_context(where)}: transformers cannot read the model's config.json: "
                    f"{first_line(exc)}") from None
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(where, config=config, output_loading_info=True,
                                                           **{key: torch_dtype})
        model, info = loaded
    except Exception as exc:
        raise error(f"{tensor_context(where)}: transformers cannot build a causal LM of type "
                    f"'{getattr(config, 'model_type', '?')}': {first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise error(f"{tensor_context(where, missing[0])}: the checkpoint lacks {len(missing)} of the "
                    "model's weights, which transformers would initialise at random")
    return model.eval()
