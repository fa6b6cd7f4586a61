"""Jobs sharing one dask.distributed scheduler: two clients' jobs at once give the bits each gives
alone (positional keys made them take each other's results), and a task weighs the same however
big its tensor's state (the graph holds the state once)."""

import json
import os
import pickle
import threading

import pytest

import deltastream as ds
import deltastream.jobs.compress as compress_job

from common import make_pair, tree_digest

distributed = pytest.importorskip("distributed")

_compress_chunk = compress_job.compress_chunk
_gate = threading.Barrier(2)


def _gated_compress_chunk(task, *states):
    """compress_chunk, except that each job's first chunk waits for the other job's first chunk:
    both jobs are surely in flight on the scheduler at once. (With shared keys only one job's
    tasks run, so the wait is broken and the task fails.)"""
    if task.tensor == "layers.0.w" and task.targets[0].ctx.index == 0:
        _gate.wait(timeout=20)
    return _compress_chunk(task, *states)


@pytest.fixture(scope="module")
def cluster():
    # two threads a worker: a first chunk waiting at the gate never holds up the other job's
    with distributed.LocalCluster(n_workers=2, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as c:
        yield c


def _artifact_digest(folder: str) -> dict:
    """Every file of an artifact by its sha256, the manifest without its creation time."""
    manifest = os.path.join(folder, "zarr.json")
    out = {os.path.relpath(k, folder): v for k, v in tree_digest(folder).items() if k != manifest}
    with open(os.path.join(folder, "zarr.json"), encoding="utf-8") as f:
        out["zarr.json"] = json.dumps(_timeless(json.load(f)), sort_keys=True)
    return out


def _timeless(v):
    if isinstance(v, dict):
        return {k: _timeless(x) for k, x in v.items() if k not in ("created", "manifest_sha256")}
    return [_timeless(x) for x in v] if isinstance(v, list) else v


SPEC = {f"layers.{i}.w": ("BF16", (48, 32)) for i in range(4)}


@pytest.mark.parametrize("case", ["two bases, lossless", "one base, lossless and bitdelta"])
def test_two_clients_jobs_at_once_give_the_bits_of_each_alone(tmp_path, cluster, monkeypatch, case):
    global _gate
    first = make_pair(str(tmp_path / "p1"), SPEC, seed=1)
    if case.startswith("two"):
        jobs = [(*first, "lossless"), (*make_pair(str(tmp_path / "p2"), SPEC, seed=2), "lossless")]
    else:
        jobs = [(*first, "lossless"), (*first, "bitdelta")]
    alone = [ds.compress(b, f, str(tmp_path / f"alone-{i}.dsz"), m, chunk_size=512) for i, (b, f, m) in enumerate(jobs)]

    _gate = threading.Barrier(2)
    monkeypatch.setattr(compress_job, "compress_chunk", _gated_compress_chunk)
    outs, errors = [str(tmp_path / f"together-{i}.dsz") for i in range(2)], []

    def run(i, client):
        b, f, m = jobs[i]
        try:
            ds.compress(b, f, outs[i], m, chunk_size=512, client=client)
        except Exception as exc:  # noqa: BLE001 - reported below, with the job
            errors.append((i, repr(exc)))

    with distributed.Client(cluster, set_as_default=False) as c1, \
            distributed.Client(cluster, set_as_default=False) as c2:
        threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate((c1, c2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for together, reference, (b, _, _) in zip(outs, alone, jobs):
        assert _artifact_digest(together) == _artifact_digest(reference)
        ds.verify(together, b)


def test_a_lowrank_task_weighs_the_same_whatever_its_state(tmp_path, monkeypatch):
    """The factor matrices are in the graph once, not in every chunk task."""
    seen = []
    original = compress_job.run_reduce

    def recording(fn, tasks, **kwargs):
        seen.append((tasks, kwargs["shared"]))
        return original(fn, tasks, **kwargs)

    monkeypatch.setattr(compress_job, "run_reduce", recording)
    sizes = []
    for side in (64, 256):
        base, ft = make_pair(str(tmp_path / str(side)), {"layers.0.w": ("F32", (side, side))})
        ds.compress(base, ft, str(tmp_path / f"{side}.dsz"), "lowrank", chunk_size=4096, rank_fraction=0.25)
        tasks, shared = seen.pop()
        sizes.append((len(pickle.dumps(tasks[0])), len(pickle.dumps(shared))))
    (small_task, small_state), (big_task, big_state) = sizes
    assert big_state > 8 * small_state > 0  # the state grew with the tensor...
    assert big_task < 2000 and abs(big_task - small_task) < 32  # ...its tasks did not


def test_graph_keys_name_the_job_and_are_never_reused():
    from types import SimpleNamespace

    from deltastream.engine import RunOptions
    from deltastream.engine.graph import graph_token

    job = RunOptions(journal=SimpleNamespace(fingerprint="0123456789abcdef" * 4))
    tokens = {graph_token(job) for _ in range(100)}
    assert len(tokens) == 100 and all(t.startswith("01234567") and len(t) == 16 for t in tokens)
    assert graph_token(RunOptions()) != graph_token(RunOptions())
