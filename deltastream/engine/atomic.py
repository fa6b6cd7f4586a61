"""Outputs that appear whole or not at all, built in work folders that are never someone else's.

Every output (an artifact folder or a checkpoint folder) is built under ``<OUT>.partial`` next
to its final path, synced to disk and renamed into place only once complete. The work folder is
made under a fresh name with the run's held lock file inside, then renamed to ``<OUT>.partial``
(so it never exists without its lock); an existing one is reused (``--resume``) or emptied only
when that lock file says a deltastream run made it, and no other run holds it. An error, Ctrl-C
or SIGTERM removes the work folder (with ``resume``, keeps it for the next run); one while the
output is put in place waits until it is. An existing output is refused unless ``overwrite`` is
set, and it is then moved into a fresh folder this run created before the new one takes its
place. An output or work folder that is, holds or sits inside one of the job's inputs (every
file a checkpoint opened included; links resolved) is always refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..checkpoint.writer import FULL_ERRNOS, DiskFullError, free_space, space_note
from ..errors import DeltastreamError, Interrupted, OutputExistsError, ParameterError, escape, tensor_context
from ..units import format_size
from .journal import NAME as JOURNAL

if TYPE_CHECKING:  # graph imports this module
    from .graph import RunOptions

__all__ = ["atomic_output", "job_output", "partial_path", "handle_signals", "sync_tree", "LOCK"]

#: the lock file in every work folder: held (flock) by the run that writes it; its pid inside
LOCK = ".deltastream.lock"


def partial_path(path: str) -> str:
    return os.path.abspath(path).rstrip(os.sep) + ".partial"


def _check_not_input(out: str, tmp: str, inputs: Iterable[str]) -> None:
    for label, where in ((f"output '{escape(out)}'", out),
                         (f"work folder '{escape(tmp)}' of output '{escape(out)}'", tmp)):
        real = os.path.realpath(where)
        for item in inputs:
            relation = _relation(real, item)
            if relation:
                raise ParameterError(f"{label} {relation} '{escape(item)}'; choose another output")


def _relation(real: str, item: str) -> str | None:
    for form in {os.path.abspath(item), os.path.realpath(item)}:
        if real == form:
            return "would overwrite the input"
        if os.path.isdir(form) and real.startswith(form + os.sep):
            return "is inside the input"
        if form.startswith(real.rstrip(os.sep) + os.sep):
            return "contains the input"
    return None


@contextlib.contextmanager
def atomic_output(path: str, *, overwrite: bool = False, inputs: Iterable[str] = (), resume: bool = False,
                  needed: int | None = None) -> Iterator[str]:
    """Yield the work folder; on success sync it and rename it to ``path``, else remove it.

    With ``resume``, a work folder left by a killed run is kept (the job's journal says what is
    done) and so is this run's, if it stops too; without, any is emptied first. ``needed``, the
    bytes the output will take (if known), goes into the message of a full disk.
    """
    path = os.path.abspath(path).rstrip(os.sep)
    tmp = partial_path(path)
    _check_not_input(path, tmp, inputs)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"output '{escape(path)}' exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = _claim(tmp, path, resume)
    note = (f"the finished work is kept in '{escape(tmp)}': run the same command with --resume to continue"
            if resume else "partial output removed")
    published = False
    try:
        with handle_signals(lambda: f"the output '{escape(path)}' was complete" if published else note):
            yield tmp
            with _signals_held():  # a Ctrl-C while it is put in place waits: never half moved
                _publish(tmp, path)
                published = True
    except BaseException as exc:
        error = _no_space(exc, tmp, needed) if isinstance(exc, DiskFullError) or (
            isinstance(exc, OSError) and exc.errno in FULL_ERRNOS) else None
        if not resume and not published:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from None
        raise
    finally:
        os.close(lock)


def _claim(tmp: str, path: str, resume: bool) -> int:
    """Create the work folder, or take over one a deltastream run left; return the held lock.

    A new work folder is made under a fresh name of ours with its lock file held inside, then
    renamed to ``tmp``: it never exists without its lock, so another run that finds it always
    finds the lock too (and names this run), never a folder it takes for someone else's.
    """
    if not os.path.lexists(tmp):
        fd = _create_locked(tmp, path)
        if fd is not None:
            return fd
    fd = _lock_existing(tmp, path)
    try:
        if resume:
            _drop_foreign(tmp)
        else:
            _empty(tmp)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_locked(tmp: str, path: str) -> int | None:
    """The held lock of a new work folder at ``tmp``; None if something appeared there first."""
    staging = _fresh_folder(tmp)
    fd = None
    try:
        fd = os.open(os.path.join(staging, LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        _hold(fd, path)  # a fresh file: never held by another run
        try:
            os.rename(staging, tmp)  # an existing folder holds the lock, so this never replaces another run's
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
            os.close(fd)
            fd = None
            shutil.rmtree(staging, ignore_errors=True)
            return None
        return fd
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fresh_folder(tmp: str) -> str:
    """A new folder next to ``tmp`` under a name of ours (made with the umask's mode, as the
    output folder it becomes: not mkdtemp's 0700)."""
    parent, name = os.path.split(tmp)
    while True:
        staging = os.path.join(parent, f".{name}.{secrets.token_hex(6)}.new")
        try:
            os.mkdir(staging)
            return staging
        except FileExistsError:
            continue


def _lock_existing(tmp: str, path: str) -> int:
    foreign = OutputExistsError(f"{tensor_context(tmp)}: exists and was not made by deltastream; move it away "
                                "or choose another output")
    if not stat.S_ISDIR(os.lstat(tmp).st_mode):
        raise foreign
    try:
        fd = os.open(os.path.join(tmp, LOCK), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise foreign from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise foreign
    _hold(fd, path)
    return fd


def _hold(fd: int, path: str) -> None:
    """Lock the work folder for this run (released when the process ends, kill -9 included)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise OutputExistsError(f"output '{escape(path)}' is being written by another deltastream run "
                                f"(pid {escape(pid) if pid.isdigit() else 'unknown'}); wait for it or choose "
                                "another output") from None
    with contextlib.suppress(OSError):  # the pid only informs another run's message (a full disk may refuse it)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _empty(tmp: str) -> None:
    """A run without --resume starts over: everything but the lock goes."""
    for name in os.listdir(tmp):
        if name != LOCK:
            _remove(os.path.join(tmp, name))


def _drop_foreign(tmp: str) -> None:
    """A reused work folder keeps only what deltastream writes, folders and regular files of one
    link: a symlink, hard link or FIFO put there could lead a write into someone's file."""
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.lstat(full)
            if not stat.S_ISDIR(st.st_mode) and not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1):
                os.unlink(full)


def _remove(path: str) -> None:
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _publish(tmp: str, path: str) -> None:
    """Drop the journal, sync everything, put the output in place and sync its folder."""
    shutil.rmtree(os.path.join(tmp, JOURNAL), ignore_errors=True)
    sync_tree(tmp)
    os.remove(os.path.join(tmp, LOCK))
    _fsync(tmp, directory=True)
    parent = os.path.dirname(path)
    if not os.path.lexists(path):
        os.rename(tmp, path)
        _fsync(parent, directory=True)
        return
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)  # a fresh name, ours
    old = os.path.join(backup, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        os.rmdir(backup)
        raise
    _fsync(parent, directory=True)
    shutil.rmtree(backup)


def sync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder``, in parallel (each fsync waits on the disk,
    not the CPU): nothing of the output is lost to a power cut once it has its final name."""
    paths = [(folder, True)]
    for root, dirs, files in os.walk(folder):
        paths += [(os.path.join(root, d), True) for d in dirs] + [(os.path.join(root, f), False) for f in files]
    with ThreadPoolExecutor(min(16, len(paths))) as pool:
        list(pool.map(lambda p: _fsync(*p), paths))


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(exc: OSError, tmp: str, needed: int | None) -> DeltastreamError:
    """The one line of a full disk: the file (and tensor) written, and the space the output needs."""
    free = free_space(os.path.dirname(tmp))
    if needed is None:  # a compressed output: how much it had written says how much more it wants
        written = sum(os.lstat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(tmp) for f in fs)
        what = f"{format_size(written)} written, {format_size(free)} free"
    else:
        what = space_note(needed, free)
    where = str(exc) if isinstance(exc, DiskFullError) else \
        f"{tensor_context(exc.filename or tmp)}: cannot write output: {exc.strerror}"
    return DeltastreamError(f"{where} ({what})")


#: while a list (the output is being put in place), a SIGINT or SIGTERM is held in it, raised after
_held: list[int] | None = None


@contextlib.contextmanager
def handle_signals(note: str | Callable[[], str] = "partial output removed") -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread, for clean-up;
    ``note`` (or what it returns when the signal comes) says what became of the partial output."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        if _held is not None:
            _held.append(signum)
            return
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; {note() if callable(note) else note}")

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (as handle_signals handles them) until the block is done, then raise
    the first one held. Python runs signal handlers in the main thread whichever thread the signal
    reaches, so holding them there covers every thread (a sigmask of one thread would not)."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, _held = _held, []
    try:
        yield
    finally:
        got, _held = _held, outer
    if got:
        signal.raise_signal(got[0])  # now handled as any other: Interrupted, with the note of now


@contextlib.contextmanager
def job_output(path: str, *, overwrite: bool, inputs: list[str], resume: bool, plan: dict, options: RunOptions,
               needed: int | None = None) -> Iterator[tuple[str, RunOptions]]:
    """atomic_output plus the job's journal: yields (partial folder, run options that journal
    every finished task there), so that a killed run can be resumed with ``resume``."""
    from dataclasses import replace

    from .journal import Journal, inputs_fingerprint

    with atomic_output(path, overwrite=overwrite, inputs=inputs, resume=resume, needed=needed) as folder:
        journal = Journal(folder, {"job": plan, "inputs": inputs_fingerprint(inputs)}, resume, inputs)
        yield folder, replace(options, journal=journal)
