"""What analyze prints: one readable table per analysis, one line per sweep row."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_analysis", "format_row", "format_best", "TOP_TENSORS"]

TOP_TENSORS = 8


def _ppl(loss: float) -> str:
    return f"{math.exp(loss):.4g}" if loss < 700 else "inf"


def _label(config: dict | None) -> str:
    if not config:
        return "the edited checkpoint"
    params = " ".join(f"{k}={v}" for k, v in config.items() if k != "id" and v != "")
    return f"{config['id']} {params}".strip()


def format_analysis(result: dict[str, Any]) -> str:
    what = _label(result.get("method")) if result.get("method") else f"edited checkpoint {result.get('edited')}"
    lines = [
        f"{what}: {result['changed']} tensors changed, ||dW~|| = {result['edit_norm']:.4g}",
        f"  {result['tokens']} tokens ({result['predicted']} predicted), C = {result['steps']}, {result['dtype']}",
        f"  loss_post   {result['loss_post']:.6f}   (perplexity {_ppl(result['loss_post'])})",
        f"  loss_edit   {result['loss_edit']:.6f}   (perplexity {_ppl(result['loss_edit'])})",
        f"  delta_loss  {result['delta_loss']:+.6g}   measured",
        f"  term        {result['term']:+.6g}   Riemann sum over C = {result['steps']}",
        f"  first order {result['first_order']:+.6g}   c = 0 alone",
        "  per step    " + "  ".join(f"{v:+.3g}" for v in result["per_step"]),
    ]
    if result["layers"]:
        lines.append("  per layer   " + "  ".join(f"{k}: {v:+.3g}" for k, v in result["layers"].items()))
    if result["outside_layers"]:
        lines.append(f"  outside the layers {result['outside_layers']:+.3g}")
    top = sorted(result["tensors"].items(), key=lambda kv: -abs(kv[1]))[:TOP_TENSORS]
    if top:
        lines.append(f"  largest |term| ({min(TOP_TENSORS, len(result['tensors']))} of {len(result['tensors'])}):")
        width = max(len(n) for n, _ in top)
        lines += [f"    {name:<{width}}  {value:+.4g}" for name, value in top]
    return "\n".join(lines)


def format_row(row: dict[str, Any]) -> str:
    return (f"{row['method']:<12} {row['parameter']}={row['value']:<8} term {row['term']:+.4g}  "
            f"measured {row['delta_loss']:+.4g}  first order {row['first_order']:+.4g}  "
            f"||dW~|| {row['edit_norm']:.3g}  ({row['seconds']:.1f} s)")


def format_best(best: dict[str, dict[str, Any] | None], tolerance: float) -> str:
    lines = [f"most aggressive setting with |term| <= {tolerance:g} (the largest ||dW~|| inside it):"]
    for method, row in best.items():
        lines.append(f"  {method}: " + (f"{row['parameter']}={row['value']} (term {row['term']:+.3g}, measured "
                                        f"{row['delta_loss']:+.3g})" if row else "none of the values"))
    return "\n".join(lines)
