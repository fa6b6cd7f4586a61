"""The one YAML loader every config goes through (job configs, merge configs), safe and bounded.

A config is a small hand-written file, and it may come from someone else. Before anything is
built from it: it is a regular file of at most 1 MiB, valid UTF-8; its nesting is at most 100
levels deep (bounded while composing, so 5,000 brackets are one line, not a RecursionError); it
has at most 20,000 nodes, so the pure-Python parser stops within a second whatever the file; and
its aliases expand to at most that many and never into themselves. The "billion laughs" (nine
lines whose expansion is 9^9 nodes) is refused at once: the expanded size is measured over the
composed graph, one visit per distinct node. Only YAML's plain types are built (``SafeLoader``:
no tag runs code). Every failure is one ParameterError naming the file and line.

    doc, lines = load_yaml("job.yaml", "config")
    lines[("params", "p")]  # -> the 1-based line of that key
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from .errors import ParameterError, tensor_context

__all__ = ["load_yaml", "MAX_BYTES", "MAX_DEPTH", "MAX_NODES"]

MAX_BYTES = 1 << 20
MAX_DEPTH = 100
MAX_NODES = 20_000


class _Refused(yaml.MarkedYAMLError):
    """A bound of this loader, reported like a YAML error: at its line."""

    def __init__(self, problem: str, node_or_mark):
        super().__init__(problem=problem, problem_mark=getattr(node_or_mark, "start_mark", node_or_mark))


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds the nesting while composing and names the line of a value error."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            if self._nodes > MAX_NODES:
                raise _Refused(f"more than {MAX_NODES} nodes", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:  # `!!int abc`, an int of 5000 digits
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def _expanded_size(root: yaml.Node) -> None:
    """Refuse aliases that expand past MAX_NODES nodes (or MAX_DEPTH levels), or into
    themselves: sizes computed once per distinct node, so the check itself stays small."""
    sizes: dict[int, tuple[int, int]] = {}
    busy: set[int] = set()

    def visit(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise _Refused("a recursive alias (a node that contains itself)", node)
        busy.add(key)
        children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        size, depth = 1, 1
        for child in children:
            s, d = visit(child)
            size, depth = size + s, max(depth, d + 1)
        if size > MAX_NODES:
            raise _Refused(f"aliases expand to more than {MAX_NODES} nodes", node)
        if depth > MAX_DEPTH:
            raise _Refused(f"aliases expand deeper than {MAX_DEPTH} levels", node)
        busy.discard(key)
        sizes[key] = (size, depth)
        return sizes[key]

    visit(root)


def _lines(loader: _Loader, node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Each key path of the document (keys as YAML builds them) -> its 1-based line."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # no name to look up: `<<` merges, a list as a key is refused when constructed
            name = loader.construct_object(key)
            if not isinstance(name, (str, int, float, bool)):
                continue
            _lines(loader, value, path + (name,), out)
            out[path + (name,)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(loader, item, path + (i,), out)
    return out


def _read(path: str, what: str) -> str:
    """The file's text: a regular file (a FIFO would hang, /dev/zero never end), bounded, UTF-8."""
    where = tensor_context(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ParameterError(f"{where}: cannot read {what}: not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(MAX_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ParameterError(f"{where}: cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ParameterError(f"{where}: {what} is larger than {MAX_BYTES >> 20} MiB (a config is a small text file)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParameterError(f"{where}: {what} is not UTF-8 (byte {exc.start})") from None


def load_yaml(path: str, what: str) -> tuple[str, Any, dict[tuple, int]]:
    """(text, document, line of each key path) of the YAML file ``path``; ``what`` names it in
    messages ("config", "the merge config"). An empty file is the document None."""
    text = _read(path, what)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return text, None, {}
        _expanded_size(node)
        lines = _lines(loader, node)
        return text, loader.construct_document(node), lines
    except _Refused as exc:
        mark = exc.problem_mark  # always set: _Refused is raised at a node or mark
        line = "?" if mark is None else mark.line + 1
        raise ParameterError(f"{tensor_context(path)} line {line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParameterError(f"{tensor_context(path)}{f' line {mark.line + 1}' if mark else ''}: invalid YAML "
                             f"({problem})") from None
    finally:
        loader.dispose()
