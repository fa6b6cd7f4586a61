"""The engine's knobs: the memory budget bounds the chunk size; progress is bytes."""

import io

from deltastream.api import TASK_FOOTPRINT, effective_chunk_bytes
from deltastream.engine import Progress, RunOptions
from deltastream.plan import DEFAULT_CHUNK_BYTES


def test_memory_budget_shrinks_the_chunk_size():
    two = RunOptions(workers=2)
    assert effective_chunk_bytes(None, None, two) == DEFAULT_CHUNK_BYTES  # 1 GiB fits 2 x 4 x 32 MiB
    assert effective_chunk_bytes(None, "256MiB", two) == (256 << 20) // (2 * TASK_FOOTPRINT)
    assert effective_chunk_bytes("8MiB", "256MiB", two) == 8 << 20  # already under the budget
    assert effective_chunk_bytes("1GiB", "1GiB", RunOptions(workers=8)) == (1 << 30) // (8 * TASK_FOOTPRINT)


def test_progress_counts_bytes_on_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    with Progress(2048, "compress", enabled=True) as progress:
        progress.advance(1024)
        progress.advance(1024)
    assert "compress" in stream.getvalue() and "2.00k" in stream.getvalue()
    quiet = io.StringIO()
    monkeypatch.setattr("sys.stderr", quiet)
    with Progress(2048, "compress") as progress:  # not a terminal: silent
        progress.advance(2048)
    assert quiet.getvalue() == ""


def test_lossy_methods_budget_for_their_float32_copies():
    from deltastream.api import LOSSY_FOOTPRINT
    from deltastream.methods import get_method

    two = RunOptions(workers=2)
    assert effective_chunk_bytes(None, "256MiB", two, get_method("bitdelta")) == (256 << 20) // (2 * LOSSY_FOOTPRINT)
    assert effective_chunk_bytes(None, "256MiB", two, get_method("lossless")) == (256 << 20) // (2 * TASK_FOOTPRINT)
