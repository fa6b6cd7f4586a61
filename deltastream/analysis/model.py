"""The model analyze computes losses and gradients with: a transformers causal LM, in eval mode."""

from __future__ import annotations

import os

from ..causal_lm import load_causal_lm
from ..checkpoint import Checkpoint
from .errors import AnalysisError, require_transformers

__all__ = ["DTYPES", "load_model", "parameters_by_name", "causal_lm_objective", "HEAD_ROWS"]

DTYPES = ("float32", "bfloat16")


def load_model(folder: str, dtype: str, device: str):
    """The fine-tune as a transformers causal LM in ``dtype``, eval mode, on ``device``; every
    weight must come from the checkpoint (none initialised at random)."""
    require_transformers()
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours shows the passes; theirs would show loading
    where = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    return load_causal_lm(where, getattr(torch, dtype), AnalysisError).to(device)


def parameters_by_name(model, checkpoint: Checkpoint) -> dict:
    """Checkpoint tensor name -> the model's parameter holding it (a tied weight under each of
    its names)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return {name: named[name] for name in checkpoint.tensors if name in named}


#: positions whose logits are computed at once by the split loss head (4096 x a 49k vocabulary: 0.8 GB
#: would be the whole batch's; 256 rows of it are 50 MB)
HEAD_ROWS = 256


def _decoder_layers(model):
    """The model's stack of blocks: its longest ModuleList (``model.layers``, ``transformer.h``...)."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def _recompute(layer) -> None:
    """Keep only the block's inputs for backward and recompute the rest (torch.utils.checkpoint):
    the activations held are one block's, not every block's."""
    import torch
    from torch.utils.checkpoint import checkpoint

    forward = layer.forward

    def recomputed(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    layer.forward = recomputed


def _split_head(model):
    """(decoder, head) when logits == head(decoder(ids).last_hidden_state) for this model (checked
    on a few tokens: no softcap or scaling after the head), else None."""
    import torch

    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    ids = torch.arange(8, device=next(model.parameters()).device).reshape(1, 8) % head.weight.shape[0]
    with torch.no_grad():
        try:
            whole = model(input_ids=ids, use_cache=False).logits
            split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
        except Exception:  # any architecture whose parts do not compose so: the plain path
            return None
    return (decoder, head) if whole.shape == split.shape and torch.allclose(whole, split, rtol=1e-5, atol=1e-6) \
        else None


def causal_lm_objective(model, recompute: bool = True):
    """The summed next-token cross-entropy of a causal LM, holding as little as it can for backward:
    with ``recompute``, one block's activations (the rest recomputed) and HEAD_ROWS positions'
    logits at a time (the head split off where the model allows it). The figures are the plain
    path's up to float rounding; the cost is about one more forward per backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    split = _split_head(model) if recompute else None
    if recompute:
        for layer in _decoder_layers(model):
            _recompute(layer)

    def plain(model, ids):
        logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                               reduction="sum")

    if split is None:
        return plain
    decoder, head = split

    def rows_loss(hidden, targets):
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum")

    def objective(model, ids):
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=ids.device)
        for i in range(0, targets.shape[0], HEAD_ROWS):
            part = (hidden[i:i + HEAD_ROWS], targets[i:i + HEAD_ROWS])
            total = total + (checkpoint(rows_loss, *part, use_reentrant=False) if torch.is_grad_enabled()
                             else rows_loss(*part))
        return total

    return objective
