"""Sweeps of one method parameter: the term and the measured loss change per value, as a table
(CSV, JSON), a plot (the paper's Figures 3 and 6), and the most aggressive setting that keeps the
predicted change inside a tolerance."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Any

from ..errors import ParameterError, show
from .analyzer import Analysis, Analyzer

__all__ = ["Sweep", "parse_sweep", "run_sweep", "most_aggressive", "write_csv", "plot_sweep", "COLUMNS"]

COLUMNS = ("method", "parameter", "value", "term", "first_order", "delta_loss", "loss_post", "loss_edit",
           "edit_norm", "seconds")
MAX_POINTS = 1000


@dataclass(frozen=True)
class Sweep:
    parameter: str
    values: tuple[float | int, ...]


def _number(text: str, spec: str) -> float | int:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise ParameterError(f"--sweep {show(spec)}: {show(text)} is not a number") from None
    if not math.isfinite(value):
        raise ParameterError(f"--sweep {show(spec)}: {show(text)} is not a finite number")
    return value


def parse_sweep(spec: str) -> Sweep:
    """``p=0.1,0.3,0.5`` (a list) or ``alpha=-1:1:0.1`` (start:stop:step, stop included)."""
    name, sep, values = spec.partition("=")
    if not sep or not name or not values:
        raise ParameterError(f"--sweep {show(spec)}: expected NAME=V1,V2,... or NAME=START:STOP:STEP")
    if ":" in values:
        parts = values.split(":")
        if len(parts) != 3:
            raise ParameterError(f"--sweep {show(spec)}: a range is START:STOP:STEP")
        start, stop, step = (float(_number(x, spec)) for x in parts)
        if step <= 0 or stop < start:
            raise ParameterError(f"--sweep {show(spec)}: a range needs STEP > 0 and STOP >= START")
        n = math.floor((stop - start) / step + 1e-9) + 1
        if n > MAX_POINTS:
            raise ParameterError(f"--sweep {show(spec)}: {n} points, more than {MAX_POINTS}")
        # rounded to the step's decimals, so -1:1:0.1 gives 0.3, not 0.30000000000000004
        digits = max(0, -math.floor(math.log10(step)) + 6)
        return Sweep(name, tuple(round(start + i * step, digits) for i in range(n)))
    return Sweep(name, tuple(_number(v.strip(), spec) for v in values.split(",")))


def run_sweep(analyzer: Analyzer, methods: list[tuple[str, dict[str, Any]]], sweep: Sweep, *, seed: int = 0,
              include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
              on_row=None) -> list[dict[str, Any]]:
    """One analysis per (method, value), in order: each row is the analysis' figures, with
    ``method`` the name and the parameters not swept, and ``config`` the method's whole config."""
    rows = []
    for name, params in methods:
        label = " ".join([name, *(f"{k}={v}" for k, v in params.items() if k != sweep.parameter)])
        for value in sweep.values:
            result: Analysis = analyzer.run(name, {**params, sweep.parameter: value}, seed=seed, include=include,
                                            exclude=exclude)
            figures = result.as_dict()
            row = {"method": label, "parameter": sweep.parameter, "value": value, "config": figures.pop("method"),
                   **figures}
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def most_aggressive(rows: list[dict[str, Any]], tolerance: float) -> dict[str, dict[str, Any] | None]:
    """Per method, the row that moves the model farthest (largest ||dW~||) while its predicted
    loss change stays within ``tolerance`` (|term| <= tolerance); None when no row does. The size
    of the edit, not the parameter's direction, says what is aggressive: a higher p for DARE,
    fewer bits for BitDelta, a larger |alpha| for extrapolation."""
    best: dict[str, dict[str, Any] | None] = {}
    for row in rows:
        best.setdefault(row["method"], None)
        if abs(row["term"]) <= tolerance:
            current = best[row["method"]]
            if current is None or row["edit_norm"] > current["edit_norm"]:
                best[row["method"]] = row
    return best


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_sweep(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Term (solid) and measured loss change (dashed) against the swept value, a colour a method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ParameterError("--plot needs matplotlib: pip install 'deltastream[analysis]'") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        x = [r["value"] for r in mine]
        colour = f"C{i}"
        ax.plot(x, [r["term"] for r in mine], "-o", color=colour, label=f"{method}: term", markersize=4)
        ax.plot(x, [r["delta_loss"] for r in mine], "--x", color=colour, label=f"{method}: measured", markersize=4)
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.set_xlabel(rows[0]["parameter"] if rows else "")
    ax.set_ylabel("loss change")
    ax.set_title(title or "approximation term and measured loss change")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
