"""Running a list of chunk tasks as a Dask graph, on threads or on a dask.distributed cluster.

A task is plain data handed to a module-level function, so the same graph runs on Dask's
threaded scheduler (the default; numpy, zstd and file I/O release the GIL) or, with
``scheduler=ADDRESS``, on a ``dask.distributed`` cluster whose workers see the same paths.
Memory is bounded by running at most ``workers`` tasks at a time, each holding one chunk.

Keys name the job and the run, never a position alone: (pass name and graph token, task index),
the token made of the job's plan fingerprint and a fresh nonce, so jobs sharing one scheduler never
share a key (a task writes into its run's partial output: two runs' tasks must never be merged).
Values many tasks use (a tensor's state) are nodes of their own, referenced by key.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dask
import dask.local
import dask.threaded
from dask.callbacks import Callback
from dask.task_spec import DataNode, Task, TaskRef

from .journal import journaled
from .progress import Progress

__all__ = ["RunOptions", "run_tasks", "run_reduce", "default_workers", "graph_token", "local_cluster"]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class RunOptions:
    """How to run a job's graph: worker threads, cluster address, progress display."""

    workers: int | None = None
    scheduler: str | None = None  # None/"threads"/"sync", or a dask.distributed address
    progress: bool | None = None  # None: on when stderr is a terminal
    client: Any = None  # an existing distributed.Client, for the Python API
    journal: Any = None  # the job's Journal (set by the jobs inside their partial output)

    @property
    def n_workers(self) -> int:
        return self.workers or default_workers()


def run_tasks(fn: Callable[..., Any], tasks: Sequence[Any], *, name: str, options: RunOptions,
              total_bytes: int, bytes_of: Callable[[Any], int], shared: Sequence[Any] = (),
              uses: Callable[[Any], Sequence[int]] | None = None) -> list[Any]:
    """Run fn(task, *values) for every task as one Dask graph; results in task order.

    ``bytes_of(task)`` is the input size credited to the progress bar when the task finishes.
    ``shared`` values (a tensor's state: its scales, thresholds, factor matrices) enter the graph
    once each, under their own key; ``uses(task)`` gives the indices of those a task is called
    with, so a task weighs the same however big they are.
    """
    graph, keys = _task_graph(fn, tasks, name, graph_token(options), options, shared, uses)
    return _run(graph, keys, dict(zip(keys, (bytes_of(t) for t in tasks))), name, total_bytes, options)


def run_reduce(fn: Callable[..., Any], tasks: Sequence[Any], *, group_of: Callable[[Any], str],
               combine: Callable[[Any, Any], Any], name: str, options: RunOptions, total_bytes: int,
               bytes_of: Callable[[Any], int], fan_in: int = 8, shared: Sequence[Any] = (),
               uses: Callable[[Any], Sequence[int]] | None = None) -> dict[str, Any]:
    """Run fn(task, *values) for every task (``shared``, ``uses``: as in :func:`run_tasks`) and
    fold the results of each group, in task order, with ``combine``; return {group: folded}. The
    folds form a tree in the graph, so partial results are freed as they are folded instead of all
    waiting for the end."""
    token = graph_token(options)
    graph, keys = _task_graph(fn, tasks, name, token, options, shared, uses)
    groups: dict[str, list] = {}
    for key, task in zip(keys, tasks):
        groups.setdefault(group_of(task), []).append(key)
    roots = []
    for g, members in enumerate(groups.values()):
        level = 0
        while len(members) > 1:
            folded = []
            for j in range(0, len(members), fan_in):
                key = (f"{name}-fold-{token}", g, level, j)
                graph[key] = Task(key, _fold, DataNode(None, combine), *(TaskRef(m) for m in members[j:j + fan_in]))
                folded.append(key)
            members, level = folded, level + 1
        roots.append(members[0])
    results = _run(graph, roots, dict(zip(keys, (bytes_of(t) for t in tasks))), name, total_bytes, options)
    return dict(zip(groups, results))


def _fold(combine, *parts):
    out = parts[0]
    for part in parts[1:]:
        out = combine(out, part)
    return out


def graph_token(options: RunOptions) -> str:
    """The token in every key of one graph: the head of the job's plan fingerprint (which job it
    is) and a nonce fresh for each graph, so that no two graphs on one scheduler share a key:
    two jobs (even the same job run twice), or two passes of one job. A scheduler given a key it
    already holds hands back that result; with positional keys, concurrent jobs got each other's."""
    fingerprint = getattr(options.journal, "fingerprint", "") or "0" * 8
    return f"{fingerprint[:8]}{uuid.uuid4().hex[:8]}"


def _task_graph(fn, tasks, name, token, options: RunOptions, shared, uses) -> tuple[dict, list]:
    # A plain graph of (function, task) nodes: the task is opaque data to dask, which neither
    # traverses nor hashes it (dask.delayed walked every dataclass field of every task). Keys are
    # (pass-token, task index); a shared value is a node of its own that tasks refer to.
    keys = [(f"{name}-{token}", i) for i in range(len(tasks))]
    shared_keys = [(f"{name}-state-{token}", k) for k in range(len(shared))]
    inline = [_small(value) for value in shared]
    graph: dict = {key: DataNode(key, value) for key, value, small in zip(shared_keys, shared, inline) if not small}

    def refs(task) -> list:
        if uses is None:
            return []
        return [DataNode(None, shared[k]) if inline[k] else TaskRef(shared_keys[k]) for k in uses(task)]

    if options.journal is None:
        graph.update((key, Task(key, fn, DataNode(None, task), *refs(task))) for key, task in zip(keys, tasks))
        return graph, keys
    # A journaled task reads (and checks) its record where it runs: on a worker, in parallel.
    journal = options.journal
    folder = journal.pass_folder(name if tasks else "empty")
    graph.update((key, Task(key, journaled, DataNode(None, fn), DataNode(None, journal.entry(folder, i)),
                            DataNode(None, task), *refs(task))) for i, (key, task) in enumerate(zip(keys, tasks)))
    return graph, keys


def _small(value: Any) -> bool:
    """A shared value of a few plain numbers (most tensors' state: empty, or a scale) rides inside
    each task: a node of its own would make every chunk task depend on it, which changes dask's
    order of the tasks (a 2-worker DARE compress ran 1.2-1.7x slower). Arrays and long lists
    (scales per row, factors, tie offsets) are shared by reference."""
    def plain(v: Any) -> bool:
        return isinstance(v, (int, float, str, bool, type(None))) or (
            isinstance(v, (list, tuple)) and len(v) <= 16 and all(isinstance(x, (int, float)) for x in v))

    return isinstance(value, dict) and len(value) <= 8 and all(plain(v) for v in value.values())


def _run(graph, keys, sizes, name, total_bytes, options: RunOptions) -> list[Any]:
    with Progress(total_bytes, name, enabled=options.progress) as progress:
        if options.client is not None or (options.scheduler not in (None, "threads", "sync")):
            return _run_distributed(graph, keys, sizes, progress, options)
        if options.scheduler == "sync":
            with _ProgressCallback(sizes, progress):
                return dask.local.get_sync(graph, keys)
        pool = ThreadPoolExecutor(options.n_workers, thread_name_prefix="deltastream")
        try:
            with _ProgressCallback(sizes, progress):
                return dask.threaded.get(graph, keys, pool=pool, num_workers=options.n_workers)
        finally:
            # On an error or interrupt, let running tasks finish before the caller cleans up
            # their output folder, and start no new ones.
            pool.shutdown(wait=True, cancel_futures=True)


class _ProgressCallback(Callback):
    def __init__(self, sizes: dict[str, int], progress: Progress):
        super().__init__()
        self._sizes = sizes
        self._progress = progress

    def _posttask(self, key, result, dsk, state, worker_id):
        self._progress.advance(self._sizes.get(key, 0))


def local_cluster(n: int):
    """A LocalCluster of n single-threaded worker processes (one chunk in flight per process),
    silent: a task's error or a Ctrl-C reaches the user once, as the command's one line."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                        silence_logs=logging.CRITICAL, preload=[__name__],
                        scheduler_kwargs={"dashboard_address": ":0"})  # its HTTP server on a free port, no warning


def dask_setup(worker) -> None:
    """Run in each local_cluster worker as it starts (a dask preload). Ctrl-C at a terminal
    signals the whole process group: the driver handles it and closes the cluster, so the
    workers ignore it rather than each print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _running_keys(dask_worker) -> list:
    return list(dask_worker.active_threads.values())


def _drain(client, keys: set, timeout: float = 30.0) -> None:
    """Wait until no worker still runs one of the cancelled tasks (as the threaded path drains
    its pool): a task still writing would race the clean-up of the partial output."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # the workers' view: the scheduler forgets a cancelled task while it still runs
            running = {k for ks in client.run(_running_keys).values() for k in ks}
        except Exception:  # the cluster is gone: nothing runs there any more
            return
        if not running & keys:
            return
        time.sleep(0.05)


def _run_distributed(graph, keys, sizes, progress, options: RunOptions) -> list[dict]:
    from distributed import Client, as_completed

    cluster = None
    if options.client is not None:
        client = options.client
    elif options.scheduler is not None and options.scheduler.startswith("local:"):  # N worker processes, this run
        cluster = local_cluster(int(options.scheduler.split(":", 1)[1]))
        client = Client(cluster, set_as_default=False)
    else:
        client = Client(options.scheduler, set_as_default=False)
    try:
        futures = client.get(graph, keys, sync=False)
        by_key = {f.key: f for f in futures}
        try:
            for future in as_completed(futures, loop=client.loop):
                future.result()  # raises the task's own exception here
                progress.advance(sizes.get(future.key, 0))
        except BaseException:
            client.cancel(futures)
            _drain(client, set(graph))
            raise
        return [by_key[k].result() for k in keys]
    finally:
        if options.client is None:
            client.close()
        if cluster is not None:
            cluster.close()
