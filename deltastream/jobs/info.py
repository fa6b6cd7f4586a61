"""``info``: what an artifact holds, how big it is, and against what it compresses.

Every name in the table comes from the artifact, which may be anyone's: it is escaped, so a
tensor name cannot drive the terminal. ``manifest_sha256`` is what a user pins (docs/format.md).
"""

from __future__ import annotations

import os
from typing import Any

from ..artifact.manifest import load_manifest
from ..artifact.store import stored_bytes
from ..checksum import digest
from ..errors import escape
from ..units import format_size

__all__ = ["info", "format_info"]


def info(artifact: str) -> dict[str, Any]:
    """The manifest's summary plus stored bytes per tensor and in total, as plain JSON data."""
    manifest = load_manifest(os.path.abspath(artifact))
    doc = manifest.doc
    tensors = []
    for entry in manifest.tensors:
        stored = stored_bytes(manifest.path, entry.key)
        tensors.append({
            "name": entry.name, "dtype": entry.dtype.name, "shape": list(entry.shape), "policy": entry.policy,
            "bytes": entry.nbytes, "stored_bytes": stored,
            "ratio": entry.nbytes / stored if stored else None,
            "unchanged": not any(entry.stored_chunks),
        })
    total_stored = stored_bytes(manifest.path, "")
    ft_bytes = manifest.ft_nbytes
    base_fp = {t.name: t.base for t in manifest.tensors if t.base is not None}
    return {
        "path": manifest.path,
        "manifest_sha256": manifest.digest,
        "format_version": doc["format_version"], "library_version": doc["library_version"],
        "created": doc["created"], "method": doc["method"], "seed": doc["seed"],
        "base_fingerprint": digest(base_fp),
        "side_files": sorted(manifest.side_files),
        "fine_tune_bytes": ft_bytes, "stored_bytes": total_stored,
        "ratio": ft_bytes / total_stored if total_stored else None,
        "tensors": tensors,
    }


def format_info(summary: dict[str, Any], max_rows: int = 40) -> str:
    """The human-readable table ``deltastream info`` prints (every string from the artifact escaped)."""
    method = dict(summary["method"])
    name = method.pop("id")
    params = ", ".join(f"{k}={v}" for k, v in method.items())
    lines = [
        f"artifact        {escape(summary['path'])}",
        f"manifest        sha256 {summary['manifest_sha256']}",
        f"format          deltastream {escape(summary['format_version'])} (written by "
        f"{escape(summary['library_version'])}, {escape(summary['created'])})",
        escape(f"method          {name}{f' ({params})' if params else ''}") + (f", seed {summary['seed']}"
                                                                              if summary["seed"] is not None else ""),
        f"base            fingerprint {summary['base_fingerprint']}",
        f"side files      {escape(', '.join(summary['side_files'])) or '-'}",
        f"fine-tune       {format_size(summary['fine_tune_bytes'])} in {len(summary['tensors'])} tensors",
        f"stored          {format_size(summary['stored_bytes'])}  (ratio {summary['ratio']:.2f}x)"
        if summary["ratio"] else f"stored          {format_size(summary['stored_bytes'])}",
        "",
        f"{'tensor':<48} {'dtype':<6} {'shape':<18} {'policy':<9} {'size':>10} {'stored':>10} {'ratio':>8}",
    ]
    rows = summary["tensors"]
    for t in rows[:max_rows]:
        ratio = f"{t['ratio']:.2f}x" if t["ratio"] else "-"
        policy = "unchanged" if t["unchanged"] else t["policy"]
        lines.append(f"{escape(t['name'])[:48]:<48} {t['dtype']:<6} {str(tuple(t['shape'])):<18} {policy:<9} "
                     f"{format_size(t['bytes']):>10} {format_size(t['stored_bytes']):>10} {ratio:>8}")
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more tensors (--json lists all)")
    return "\n".join(lines)
