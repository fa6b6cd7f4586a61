"""Benchmark results written into the docs between markers, so quoted figures are never retyped.

A doc holds ``<!-- KEY:begin -->`` ... ``<!-- KEY:end -->``; :func:`fill_doc` replaces what lies
between with a benchmark's text and leaves the rest of the doc as it is.
"""

from __future__ import annotations


def fill_doc(doc: str, key: str, text: str) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    with open(doc, encoding="utf-8") as f:
        current = f.read()
    if begin not in current or end not in current:
        raise SystemExit(f"{doc} has no {begin} ... {end} block to fill")
    head, rest = current.split(begin, 1)
    with open(doc, "w", encoding="utf-8") as f:
        f.write(head + begin + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
