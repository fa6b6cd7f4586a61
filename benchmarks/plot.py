"""The pictures in docs/: drawn from the benchmark tables in benchmarks/results/.

    pip install ".[bench]" && python benchmarks/plot.py

- docs/img/methods_1B.png: stored size ratio of each method on the 1B pair (linear weights and
  whole artifact), against the targets;
- docs/img/memory_70B.png: peak RssAnon against chunk size and workers on the 70B shapes, with
  the memory model's line.
"""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img")


def table(name: str) -> list[list[str]]:
    with open(os.path.join(RESULTS, name)) as f:
        rows = [line.strip().strip("|").split("|") for line in f if line.startswith("| ") and "---" not in line]
    return [[c.strip() for c in r] for r in rows[1:]]


def number(text: str) -> float | None:
    m = re.search(r"[0-9.]+", text)
    return float(m.group()) if m and text.strip() != "-" else None


def methods() -> None:
    rows = [r for r in table("bench_methods_1B.md") if number(r[2]) is not None]
    names = [r[0].replace(" (", "\n(") for r in rows]
    linear = [number(r[1]) or 0 for r in rows]
    whole = [number(r[2]) for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], linear, width=0.4, label="linear weights (the tensors the method edits)")
    ax.bar([i + 0.2 for i in x], whole, width=0.4, label="whole artifact (embeddings, norms kept exact)")
    for target, label in ((15, "BitDelta target 15x"), (100, "DARE + BitDelta target 100x")):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.text(len(rows) - 0.5, target * 1.08, label, ha="right", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("fine-tune bytes / stored bytes")
    ax.set_title("Compression of a 1B-shaped bf16 fine-tune, by method (benchmarks/bench_methods.py)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "methods_1B.png"), dpi=120)


def memory() -> None:
    rows = table("bench_memory_70B-2L.md")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, marker in (("lossless", "o"), ("bitdelta", "s")):
        for workers, color in (("1", "tab:blue"), ("2", "tab:orange")):
            pts = [(number(r[1]), number(r[3]), number(r[4])) for r in rows if r[0] == method and r[2] == workers]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=f"{method}, {workers} "
                    f"worker{'s' if workers != '1' else ''}: measured")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", color=color, lw=1)
    ax.axhline(1536, color="grey", lw=0.8, ls="--")
    ax.text(8, 1580, "1.5 GiB budget", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("--chunk-size (MiB)")
    ax.set_ylabel("peak RssAnon (MiB)")
    ax.set_title("Memory is set by chunk size and workers (70B tensor shapes)\n"
                 "dotted: fixed + workers x footprint x chunk; run with --memory 64GiB (the default\n"
                 "1 GiB budget shrinks the chunk to fit)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "memory_70B.png"), dpi=120)


if __name__ == "__main__":
    os.makedirs(IMG, exist_ok=True)
    methods()
    memory()
    print(f"wrote {IMG}/methods_1B.png and memory_70B.png")
