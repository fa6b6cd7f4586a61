"""Write the generated parts of the docs from the code: the option table of every command (from
the argparse parser of deltastream/cli.py) and the method table (from deltastream.methods.METHODS
and each method's describe()), between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->`` markers. tests/test_docs.py fails when a doc differs from it.

    python docs/generate.py          # rewrite the docs
    python docs/generate.py --check  # exit 1 naming the stale blocks
"""

from __future__ import annotations

import argparse
import os
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
#: doc file -> the generated blocks it holds
TARGETS = {"cli.md": ("options", "methods"), "methods.md": ("fast_paths",)}


def _cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def options_block() -> str:
    from deltastream.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, command in sub.choices.items():
        rows = [a for a in command._actions if a.option_strings and a.help != argparse.SUPPRESS and "-h" not in
                a.option_strings]
        out += [f"### `{name}`", "", "| option | help |", "|---|---|"]
        for a in rows:
            flags = ", ".join(f"`{f}{' ' + a.metavar if a.metavar and a.nargs != 0 else ''}`" for f in a.option_strings)
            choices = f" (one of: {', '.join(a.choices)})" if a.choices else ""
            out.append(f"| {flags} | {_cell(a.help)}{choices} |")
        out.append("")
    return "\n".join(out).rstrip()


def methods_block() -> str:
    from deltastream.methods import METHODS

    out = ["| method | commands | parameters (default) | what it does |", "|---|---|---|---|"]
    for name, cls in sorted(METHODS.items()):
        d = cls.describe()
        params = "; ".join(f"`{p['name']}` ({p['default']})" for p in d["params"]) or "-"
        commands = "compress, edit" if d["compact"] else "edit only"
        out.append(f"| `{name}` | {commands} | {_cell(params)} | {_cell(d['summary'])} |")
    return "\n".join(out)


def fast_paths_block() -> str:
    from deltastream.methods import backends

    out = ["| method | role | backend | dtypes |", "|---|---|---|---|"]
    for impl in sorted(backends.implementations(), key=lambda i: (i.method.method_id, i.role, i.backend)):
        out.append(f"| `{impl.method.method_id}` | {impl.role} | {impl.backend} | {', '.join(impl.dtypes)} |")
    return "\n".join(out)


BLOCKS = {"options": options_block, "methods": methods_block, "fast_paths": fast_paths_block}


def render(text: str, names: tuple[str, ...]) -> str:
    for name in names:
        pattern = re.compile(rf"(<!-- BEGIN GENERATED: {name} -->\n)(?:.*?\n)?(<!-- END GENERATED: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"docs: no '<!-- BEGIN GENERATED: {name} -->' ... END block to fill")
        text = pattern.sub(lambda m: m.group(1) + BLOCKS[name]() + "\n" + m.group(2), text)
    return text


def stale() -> list[str]:
    """The docs whose generated blocks differ from what the code gives now."""
    out = []
    for doc, names in TARGETS.items():
        with open(os.path.join(DOCS, doc)) as f:
            text = f.read()
        if render(text, names) != text:
            out.append(doc)
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        bad = stale()
        if bad:
            print(f"stale generated docs: {', '.join(bad)}; run: python docs/generate.py", file=sys.stderr)
        return 1 if bad else 0
    for doc, names in TARGETS.items():
        path = os.path.join(DOCS, doc)
        with open(path) as f:
            text = render(f.read(), names)  # all of it before the file is opened for writing
        with open(path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
