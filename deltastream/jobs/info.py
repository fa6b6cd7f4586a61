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

__all__ = ["info", "format_info", "format_verified", "policy_label"]


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
        "created": doc["created"], "method": doc["method"], "lossy": manifest.method.lossy, "seed": doc["seed"],
        "base_fingerprint": digest(base_fp),
        "side_files": sorted(manifest.side_files),
        "fine_tune_bytes": ft_bytes, "stored_bytes": total_stored,
        "ratio": ft_bytes / total_stored if total_stored else None,
        "tensors": tensors,
    }


def policy_label(tensor: dict[str, Any]) -> str:
    """A tensor's policy in the one vocabulary text and --json share (docs/cli.md#info): the
    policy (lossless, new, grown or the method's id), and ", unchanged" where nothing is stored
    because every chunk equals the base (--json: ``"unchanged": true``)."""
    return tensor["policy"] + (", unchanged" if tensor["unchanged"] else "")


def format_verified(summary: dict[str, Any], artifact: str, base: str | None) -> str:
    """What ``verify`` checked, in words: a lossy tensor's rebuild is the edited fine-tune, so
    only its stored chunks and the base can be checked, not the fine-tune's checksums."""
    art = escape(artifact)
    if base is None:
        return (f"ok: artifact '{art}' is intact: every stored chunk decodes and matches its recorded CRC-32C, "
                "every side file its sha256")
    method = summary["method"]["id"]
    lossy = sum(t["policy"] == method for t in summary["tensors"]) if summary["lossy"] else 0
    line = (f"ok: artifact '{art}' and base '{escape(base)}' match: the base has the recorded checksums and every "
            "chunk decodes against it")
    if not lossy:
        return line + "; the rebuilt fine-tune has the fine-tune's recorded checksums"
    exact = len(summary["tensors"]) - lossy
    return (line + f"; {exact} exact tensors rebuild to the fine-tune's recorded checksums, {lossy} stored by "
            f"lossy '{escape(method)}' rebuild the edited fine-tune (checked by their stored chunks' CRC-32C, "
            "not against the fine-tune)")


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
        f"{'tensor':<48} {'dtype':<6} {'shape':<18} {'policy':<22} {'size':>10} {'stored':>10} {'ratio':>8}",
    ]
    rows = summary["tensors"]
    for t in rows[:max_rows]:
        ratio = f"{t['ratio']:.2f}x" if t["ratio"] else "-"
        lines.append(f"{escape(t['name'])[:48]:<48} {t['dtype']:<6} {str(tuple(t['shape'])):<18} "
                     f"{escape(policy_label(t)):<22} "
                     f"{format_size(t['bytes']):>10} {format_size(t['stored_bytes']):>10} {ratio:>8}")
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more tensors (--json lists all)")
    return "\n".join(lines)
