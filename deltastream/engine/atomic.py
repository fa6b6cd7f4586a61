"""Outputs that appear whole or not at all, and interrupts that leave nothing half-written.

Every output (an artifact folder or a checkpoint folder) is built under ``<OUT>.partial`` next
to its final path and renamed into place only once complete. An error, Ctrl-C or SIGTERM removes
the partial folder; an existing output is refused unless ``overwrite`` is set, and an output
that would overwrite or sit inside one of the job's inputs is always refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator

from ..errors import Interrupted, OutputExistsError, ParameterError
from .journal import NAME as JOURNAL

__all__ = ["atomic_output", "job_output", "partial_path", "handle_signals"]


def partial_path(path: str) -> str:
    return os.path.abspath(path).rstrip(os.sep) + ".partial"


def _check_not_input(out: str, inputs: Iterable[str]) -> None:
    out_real = os.path.realpath(out)
    for item in inputs:
        real = os.path.realpath(item)
        folder = real if os.path.isdir(real) else os.path.dirname(real)
        if out_real in (real, folder) or real.startswith(out_real + os.sep):
            raise ParameterError(f"output '{out}' would overwrite the input '{item}'")


@contextlib.contextmanager
def atomic_output(path: str, *, overwrite: bool = False, inputs: Iterable[str] = (),
                  resume: bool = False) -> Iterator[str]:
    """Yield the partial folder; on success rename it to ``path``, else remove it.

    With ``resume``, a partial folder left by a killed run is kept (the job's journal says what
    is done) and so is this run's, if it is interrupted too; without, any is discarded.
    """
    path = os.path.abspath(path).rstrip(os.sep)
    _check_not_input(path, inputs)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"output '{path}' exists; pass --overwrite to replace it")
    tmp = partial_path(path)
    if not resume:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, exist_ok=True)
    try:
        with handle_signals():
            yield tmp
        shutil.rmtree(os.path.join(tmp, JOURNAL), ignore_errors=True)
        if os.path.lexists(path):
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread, for clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; partial output removed")

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def job_output(path: str, *, overwrite: bool, inputs: list[str], resume: bool, plan: dict,
               options) -> Iterator[tuple[str, object]]:
    """atomic_output plus the job's journal: yields (partial folder, run options that journal
    every finished task there), so that a killed run can be resumed with ``resume``."""
    from dataclasses import replace

    from .journal import Journal, inputs_fingerprint

    with atomic_output(path, overwrite=overwrite, inputs=inputs, resume=resume) as folder:
        journal = Journal(folder, {"job": plan, "inputs": inputs_fingerprint(inputs)}, resume)
        yield folder, replace(options, journal=journal)
