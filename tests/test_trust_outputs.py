"""Issue 9, outputs and resume: the job writes or removes only what it made, its journal is plain
data checked before use, a resume never mixes inputs, interrupts and concurrent runs are handled,
a full disk is one line, a cluster run fails in one line, and the output is synced before it
appears."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import deltastream as ds
from deltastream.engine import atomic

from common import error_line, make_pair, read_raw, run_cli, tree_digest


def records(partial) -> list[str]:
    out = []
    for root, _, files in os.walk(os.path.join(partial, ".journal")):
        out += [os.path.join(root, f) for f in files if f.endswith(".json") and f != "plan.json"]
    return sorted(out)


@pytest.fixture
def pair(tmp_path):
    return make_pair(str(tmp_path), {"layers.0.w": ("BF16", (64, 32)), "layers.1.w": ("F32", (32, 16))})


def stop_after(monkeypatch, module, name, n):
    """Make module.name raise after n calls (a run that dies midway, its partial kept by --resume)."""
    original, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        if len(calls) >= n:
            raise RuntimeError("stopped")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return lambda: monkeypatch.setattr(module, name, original)


def die_before_publish(monkeypatch, call):
    """Run call() to the end of its work but fail just before the output is renamed into place:
    every task has a journal record."""
    restore = stop_after(monkeypatch, atomic, "_publish", 0)
    with pytest.raises(RuntimeError, match="stopped"):
        call()
    restore()


# --- 1-3: work paths ----------------------------------------------------------------------------

def test_an_input_named_like_the_work_folder_is_refused(tmp_path, capsys, pair):
    base, ft = pair
    run_partial = str(tmp_path / "run.partial")
    os.rename(base, run_partial)
    before = tree_digest(run_partial), tree_digest(ft)
    assert run_cli("compress", run_partial, ft, "-o", tmp_path / "run", "-q") == 2
    assert error_line(capsys) == (f"deltastream: error: work folder '{run_partial}' of output '{tmp_path / 'run'}' "
                                  f"would overwrite the input '{run_partial}'; choose another output")
    assert (tree_digest(run_partial), tree_digest(ft)) == before and not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("where", ["inside", "parent"])
def test_an_output_inside_or_above_an_input_is_refused(tmp_path, capsys, pair, where):
    base, ft = pair
    before = tree_digest(tmp_path)
    out = os.path.join(base, "art.dsz") if where == "inside" else str(tmp_path)
    assert run_cli("compress", base, ft, "-o", out, "-q", "--overwrite") == 2
    relation = "is inside the input" if where == "inside" else "contains the input"
    assert error_line(capsys).startswith(f"deltastream: error: output '{out}' {relation} '")
    assert tree_digest(tmp_path) == before


def test_overwrite_never_removes_a_folder_named_like_a_backup(tmp_path, pair):
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    model_old = str(tmp_path / "model.old")
    os.rename(base, model_old)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale").write_text("x")
    before = tree_digest(model_old)
    assert run_cli("apply", model_old, art, "-o", out, "-q", "--overwrite") == 0
    assert tree_digest(model_old) == before
    assert read_raw(str(out)) == read_raw(ft) and not (out / "stale").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.dsz", "ft", "model", "model.old"]  # no backup left


@pytest.mark.parametrize("kind", ["symlink-to-base", "symlink", "folder", "file"])
def test_a_work_folder_not_made_by_deltastream_is_refused(tmp_path, capsys, pair, kind):
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    partial = tmp_path / "out.partial"
    expected = (f"deltastream: error: file '{partial}': exists and was not made by deltastream; move it away or "
                "choose another output")
    if kind == "symlink-to-base":
        partial.symlink_to(base)
        expected = (f"deltastream: error: work folder '{partial}' of output '{tmp_path / 'out'}' would overwrite "
                    f"the input '{base}'; choose another output")
    elif kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "data").write_text("mine")
        partial.symlink_to(tmp_path / "elsewhere")
    elif kind == "folder":
        partial.mkdir()
        (partial / "notes.txt").write_text("mine")
    else:
        partial.write_text("mine")
    before = tree_digest(tmp_path)
    for resume in ([], ["--resume"]):
        assert run_cli("apply", base, art, "-o", tmp_path / "out", "-q", *resume) == 2
        assert error_line(capsys) == expected
    assert tree_digest(tmp_path) == before and not os.path.exists(tmp_path / "out")


def test_resume_drops_links_planted_in_the_work_folder(tmp_path, monkeypatch, pair):
    """A reused partial may hold only what deltastream writes: regular files of one link and
    folders; a symlink or hard link to an input is removed, never written through."""
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = str(tmp_path / "out")
    die_before_publish(monkeypatch, lambda: ds.apply(base, art, out, resume=True))
    shard = os.path.join(out + ".partial", "model.safetensors")
    os.remove(shard)
    os.symlink(os.path.join(base, "model.safetensors"), shard)
    os.link(os.path.join(ft, "model.safetensors"), os.path.join(out + ".partial", "config.json"))
    before = tree_digest(base), tree_digest(ft)
    ds.apply(base, art, out, resume=True)
    assert (tree_digest(base), tree_digest(ft)) == before
    assert read_raw(out) == read_raw(ft)


# --- 4: the journal is plain data ------------------------------------------------------------

def test_journal_values_round_trip_exactly():
    from deltastream.engine.journal import decode_value, encode_value
    from deltastream.exact import magnitude_sum

    value = {
        "ints": [0, -1, 2 ** 200, True, False, None], "floats": [0.1, -0.0, float("inf"), float("nan")],
        "tuple": (("layers.0.w", 3), (1, 2)), "text": "é\n\"$",
        "arrays": [np.arange(6, dtype="<i8").reshape(2, 3), np.ones((2, 2), ">f4"), np.zeros((0, 4), np.uint32),
                   np.array([1.5], np.float16), np.array([True, False]), np.asfortranarray(np.eye(3))],
        "objects": np.array([2 ** 90, 1, magnitude_sum(np.ones(3, np.float32))], dtype=object),
        "scalars": [np.float32(1.25), np.int64(-7), np.uint8(200), np.float64(2.5), np.bool_(True)],
        7: {"nested": [{"tuple": 1}]}, ("a", 1): "tuple key",
    }
    back = decode_value(json.loads(json.dumps(encode_value(value))))
    assert _same(back, value)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and (
            all(_same(x, y) for x, y in zip(a.ravel(), b.ravel())) if a.dtype == object else a.tobytes() == b.tobytes())
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("bad", [b"junk", b'{"format": 1}', b"[" * 100000, b'{"$": "x"}'],
                         ids=["junk", "wrong-format", "deep", "unknown-tag"])
def test_journal_rejects_bad_records(bad):
    from deltastream.engine.journal import parse_record

    assert parse_record(bad) is None


@pytest.mark.parametrize("method, params", [("lossless", {}), ("bitdelta", {"per": "row"}),
                                            ("bitdelta", {"residual": 1}),
                                            ("lowrank", {"rank_fraction": 0.2}), ("dare", {"p": 0.5, "rescale": "l1"}),
                                            ("dare_bitdelta", {"p": 0.5}), ("multibit", {"bits": 1})])
def test_a_fully_journaled_compress_resumes_to_the_same_artifact(tmp_path, monkeypatch, pair, method, params):
    """Every task result comes back from the JSON journal: the artifact is the uninterrupted one."""
    base, ft = pair
    reference = ds.compress(base, ft, str(tmp_path / "ref.dsz"), method, chunk_size=1024, **params)
    out = str(tmp_path / "out.dsz")
    die_before_publish(monkeypatch, lambda: ds.compress(base, ft, out, method, chunk_size=1024, resume=True,
                                                        **params))
    assert len(records(out + ".partial")) > 4
    import deltastream.jobs.compress as job

    calls = []
    monkeypatch.setattr(job, "compress_chunk", lambda t: calls.append(1))
    ds.compress(base, ft, out, method, chunk_size=1024, resume=True, **params)
    assert not calls
    assert ds.info(out)["tensors"] == ds.info(reference)["tensors"]
    rebuilt = ds.apply(base, out, str(tmp_path / "a"))
    assert read_raw(rebuilt) == read_raw(ds.apply(base, reference, str(tmp_path / "b")))


@pytest.mark.parametrize("method, params", [("trim", {"density": 0.3}), ("trim", {"density": 0.3, "scope": "global"}),
                                            ("dare", {"p": 0.5, "rescale": "l1"})])
def test_a_fully_journaled_edit_resumes_to_the_same_checkpoint(tmp_path, monkeypatch, pair, method, params):
    base, ft = pair
    reference = ds.edit(base, ft, str(tmp_path / "ref"), method, chunk_size=1024, **params)
    out = str(tmp_path / "out")
    die_before_publish(monkeypatch, lambda: ds.edit(base, ft, out, method, chunk_size=1024, resume=True, **params))
    ds.edit(base, ft, out, method, chunk_size=1024, resume=True, **params)
    assert read_raw(out) == read_raw(reference)


class _Pwn:
    def __reduce__(self):
        return (os.system, (f"touch {os.path.abspath('PWNED')}",))


def test_a_malicious_or_broken_journal_runs_nothing(tmp_path, monkeypatch, pair):
    import deltastream.jobs.compress as job

    base, ft = pair
    monkeypatch.chdir(tmp_path)
    reference = ds.compress(base, ft, str(tmp_path / "ref.dsz"), "bitdelta", chunk_size=1024)
    out = str(tmp_path / "out.dsz")
    restore = stop_after(monkeypatch, job, "compress_chunk", 3)
    with pytest.raises(RuntimeError):
        ds.compress(base, ft, out, "bitdelta", chunk_size=1024, resume=True, workers=1)
    restore()
    found = records(out + ".partial")
    assert len(found) == 3
    evil = pickle.dumps(_Pwn())
    for path, content in zip(found, [evil, b"junk", b'{"format": "deltastream-journal-1"}']):
        with open(path, "wb") as f:
            f.write(content)
        with open(path[:-5] + ".pkl", "wb") as f:  # the old format's name too
            f.write(evil)
    ds.compress(base, ft, out, "bitdelta", chunk_size=1024, resume=True)
    assert not os.path.exists(tmp_path / "PWNED")
    rebuilt = ds.apply(base, out, str(tmp_path / "a"))
    assert read_raw(rebuilt) == read_raw(ds.apply(base, reference, str(tmp_path / "b")))


# --- 8: resume never mixes inputs ------------------------------------------------------------

def _rewrite_keeping_stat(path, offset, data):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("command", ["compress", "edit", "apply"])
def test_resume_after_the_input_changed_in_place_is_refused(tmp_path, capsys, monkeypatch, command):
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (256, 256)), "norm": ("F32", (16,))})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = str(tmp_path / "out")
    call = {"compress": lambda: ds.compress(base, ft, out, chunk_size=16384, resume=True),
            "edit": lambda: ds.edit(base, ft, out, "dare", p=0.5, chunk_size=16384, resume=True),
            "apply": lambda: ds.apply(base, art, out, resume=True)}[command]
    die_before_publish(monkeypatch, call)
    changed = os.path.join(base if command == "apply" else ft, "model.safetensors")
    with open(changed, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    # same size and mtime, as cp -p leaves it; past the base's head check (64 KiB) that apply makes
    _rewrite_keeping_stat(changed, 8 + header_len + 100_000, b"\x7f\x7f")
    before = tree_digest(base), tree_digest(ft)
    argv = {"compress": ["compress", base, ft, "--chunk-size", "16384"],
            "edit": ["edit", base, ft, "--method", "dare", "-p", "p=0.5", "--chunk-size", "16384"],
            "apply": ["apply", base, art]}[command]
    assert run_cli(*argv, "-o", out, "-q", "--resume") == 2
    assert error_line(capsys) == (f"deltastream: error: tensor 'layers.0.w' in file '{changed}': changed since the "
                                  "interrupted run; run without --resume to start over")
    assert (tree_digest(base), tree_digest(ft)) == before and not os.path.exists(out)
    if command == "apply":  # the changed base is no longer the artifact's: a fresh run says so
        assert run_cli(*argv, "-o", out, "-q") == 2 and "base" in error_line(capsys)
        return
    assert run_cli(*argv, "-o", out, "-q") == 0  # without --resume: the inputs as they are now
    ref = str(tmp_path / "ref")
    if command == "compress":
        assert read_raw(ds.apply(base, out, str(tmp_path / "r"))) == read_raw(ft)
    else:
        assert read_raw(out) == read_raw(ds.edit(base, ft, ref, "dare", p=0.5, chunk_size=16384))


def test_the_plan_fingerprints_the_artifact_manifest_and_headers_by_content(tmp_path, pair):
    """Same size and mtime, other content: an artifact's manifest or a header changed in place
    makes the partial output another job's."""
    from deltastream.engine.journal import inputs_fingerprint

    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    before = inputs_fingerprint([base, art])
    manifest = os.path.join(art, "zarr.json")
    with open(manifest, "rb") as f:
        at = f.read().index(b'"created"')
    _rewrite_keeping_stat(manifest, at, b'"Created"')
    assert inputs_fingerprint([base, art]) != before
    before = inputs_fingerprint([base, art])
    _rewrite_keeping_stat(os.path.join(base, "model.safetensors"), 12, b"X")  # in the header
    assert inputs_fingerprint([base, art]) != before


# --- 9 and 10: interrupts and concurrent runs ------------------------------------------------------

@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("slow"))
    return make_pair(tmp, {"w": ("F32", (512, 1024)), "v": ("F32", (512, 1024))})


def _start(argv):
    return subprocess.Popen([sys.executable, "-m", "deltastream.cli", *map(str, argv), "-q", "--workers", "1"],
                            stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc, partial, n=5):
    deadline = time.monotonic() + 60
    while len(records(partial)) < n:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_ctrl_c_during_a_resume_run_keeps_its_work(tmp_path, slow_pair):
    base, ft = slow_pair
    out = tmp_path / "out.dsz"
    argv = ["compress", base, ft, "-o", out, "--chunk-size", "2KiB"]
    proc = _start([*argv, "--resume"])
    _wait_for_records(proc, f"{out}.partial")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip() == (f"deltastream: error: interrupted by SIGINT; the finished work is kept in '{out}.partial': "
                           "run the same command with --resume to continue")
    done = len(records(f"{out}.partial"))
    assert done >= 5 and not out.exists()
    assert run_cli(*argv, "-q", "--resume") == 0
    assert read_raw(ds.apply(base, str(out), str(tmp_path / "r"))) == read_raw(ft)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, capsys, monkeypatch, pair):
    """The lock is held as the first run holds it (flock on the work folder's lock file, a pid in it)."""
    import fcntl

    base, ft = pair
    out = tmp_path / "out.dsz"
    die_before_publish(monkeypatch, lambda: ds.compress(base, ft, str(out), resume=True))
    before = tree_digest(base), tree_digest(ft)
    with open(f"{out}.partial/{atomic.LOCK}", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        partial = tree_digest(f"{out}.partial")
        for resume in ([], ["--resume"]):
            assert run_cli("compress", base, ft, "-o", out, "-q", *resume) == 2
            assert error_line(capsys) == (f"deltastream: error: output '{out}' is being written by another "
                                          "deltastream run (pid 4242); wait for it or choose another output")
        assert tree_digest(f"{out}.partial") == partial  # the other run's folder is left to it
    assert (tree_digest(base), tree_digest(ft)) == before and not out.exists()
    assert run_cli("compress", base, ft, "-o", out, "-q", "--resume") == 0  # once it is released
    assert read_raw(ds.apply(base, str(out), str(tmp_path / "r"))) == read_raw(ft)


# --- 17: a full disk ----------------------------------------------------------------------------------

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["apply", "compress"])
def test_a_full_disk_names_the_file_and_the_space_needed(tmp_path, capsys, monkeypatch, pair, command):
    import deltastream.artifact.codecs as codecs

    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    before = tree_digest(base), tree_digest(ft), tree_digest(art)
    out = tmp_path / "out"
    if command == "apply":
        monkeypatch.setattr(os, "pwrite", _no_space)
        argv = ["apply", base, art, "-o", out]
        where, needs = "tensor 'layers.", f"' in file '{out}.partial/model.safetensors': "
        needs += "cannot write output: No space left on device (6.0 KiB needed, "
    else:
        monkeypatch.setattr(codecs, "open", lambda *a, **k: _Full(), raising=False)
        argv = ["compress", base, ft, "-o", out]
        where = f"file '{out}.partial/"  # the first file written, and what was written (an artifact's size
        needs = "': cannot write output: No space left on device ("  # is known once it is written)
    assert run_cli(*argv, "-q", "--workers", "1") == 2
    line = error_line(capsys)
    assert line.startswith(f"deltastream: error: {where}") and needs in line
    assert line.endswith(" free)")
    assert (tree_digest(base), tree_digest(ft), tree_digest(art)) == before
    assert not out.exists() and not os.path.exists(f"{out}.partial")


class _Full:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        _no_space()


def test_too_little_free_space_is_refused_up_front_in_the_same_words(tmp_path, capsys, monkeypatch, pair):
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    real = os.statvfs

    class Tiny:
        f_bavail, f_frsize = 1, 512

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny() if "out" in str(p) else real(p))
    assert run_cli("apply", base, art, "-o", tmp_path / "out", "-q") == 2
    assert error_line(capsys) == (f"deltastream: error: file '{tmp_path / 'out.partial'}': not enough disk space "
                                  "for the output (6.2 KiB needed, 512 B free)")  # its headers too
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


# --- 20: a cluster run fails in one line --------------------------------------------------------

def test_a_cluster_run_that_fails_midway_prints_one_line(tmp_path):
    pytest.importorskip("distributed")
    base, ft = make_pair(str(tmp_path), {"w": ("F32", (128, 256))})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"), chunk_size=16384)
    path = os.path.join(base, "model.safetensors")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    _rewrite_keeping_stat(path, 8 + header_len + 100_000, b"\x01\x02\x03\x04")  # past the 64 KiB head check
    proc = subprocess.run([sys.executable, "-m", "deltastream.cli", "apply", base, art, "-o", str(tmp_path / "out"),
                           "-q", "--cluster", "local:2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"deltastream: error: tensor 'w' in file '{path}'")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_ctrl_c_at_the_terminal_during_a_cluster_run_prints_one_line(tmp_path, slow_pair):
    """The terminal signals the whole process group, workers included."""
    pytest.importorskip("distributed")
    base, ft = slow_pair
    out = tmp_path / "out.dsz"
    proc = subprocess.Popen([sys.executable, "-m", "deltastream.cli", "compress", base, ft, "-o", str(out), "-q",
                             "--chunk-size", "2KiB", "--cluster", "local:2"], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for_records(proc, f"{out}.partial")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err == "deltastream: error: interrupted by SIGINT; partial output removed\n"
    assert not out.exists() and not os.path.exists(f"{out}.partial")


# --- 22: durability --------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["compress", "apply"])
def test_every_file_and_folder_is_synced_before_the_output_appears(tmp_path, monkeypatch, pair, command):
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = str(tmp_path / "out")
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(out)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if command == "apply":
        ds.apply(base, art, out)
    else:
        ds.compress(base, ft, out)
    paths = {p.replace(out + ".partial", out) for p, appeared in synced if not appeared}
    every = {out} | {os.path.join(r, n) for r, ds_, fs in os.walk(out) for n in ds_ + fs}
    assert every <= paths  # all synced before the rename
    assert (str(tmp_path), True) in synced  # and the parent after it


# --- review fixes: the output engine ------------------------------------------------------------

@pytest.mark.parametrize("case", ["apply-index-shard", "compress-file-side-file", "edit-index-shard",
                                  "merge-index-shard"])
def test_an_output_that_is_a_file_the_checkpoint_opened_is_refused(tmp_path, capsys, case):
    """The shards an index names and the side files next to a checkpoint given as a file are
    inputs too: --overwrite never replaces one."""
    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (64, 32)), "layers.1.w": ("F32", (32, 16))},
                         shards=1 if case.startswith("compress") else 2, side_files={"config.json": "{}"})
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    index = os.path.join(base, "model.safetensors.index.json")
    shard = os.path.join(base, "model-00001-of-00002.safetensors")
    if case == "apply-index-shard":
        argv, out = ["apply", index, art], shard
    elif case == "edit-index-shard":
        argv, out = ["edit", index, ft, "--method", "lossless"], shard
    elif case == "merge-index-shard":
        config = tmp_path / "merge.yaml"
        config.write_text(f"merge_method: task_arithmetic\nbase_model: {index}\nmodels:\n"
                          f"  - model: {ft}\n    parameters: {{weight: 1.0}}\n")
        argv, out = ["merge", config], shard
    else:
        side = os.path.join(ft, "config.json")
        argv, out = ["compress", base, os.path.join(ft, "model.safetensors")], side
    before = tree_digest(tmp_path)
    assert run_cli(*argv, "-o", out, "-q", "--overwrite") == 2
    assert error_line(capsys) == (f"deltastream: error: output '{out}' would overwrite the input '{out}'; "
                                  "choose another output")
    assert tree_digest(tmp_path) == before


def test_a_failure_taking_over_a_work_folder_releases_its_lock(tmp_path, capsys, monkeypatch, pair):
    """An error while a left work folder is emptied (or cleaned for --resume) closes the lock:
    the next run in the same process is not told another run holds it."""
    base, ft = pair
    out = tmp_path / "out.dsz"
    die_before_publish(monkeypatch, lambda: ds.compress(base, ft, str(out), resume=True))
    before = tree_digest(base), tree_digest(ft)
    fds = len(os.listdir("/proc/self/fd"))

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    for name, resume in (("_empty", []), ("_drop_foreign", ["--resume"])):
        monkeypatch.setattr(atomic, name, denied)
        assert run_cli("compress", base, ft, "-o", out, "-q", *resume) == 2
        assert error_line(capsys) == f"deltastream: error: file '{out}.partial': Permission denied"
        monkeypatch.undo()
        assert len(os.listdir("/proc/self/fd")) == fds  # no lock fd left open
    assert (tree_digest(base), tree_digest(ft)) == before
    assert run_cli("compress", base, ft, "-o", out, "-q", "--resume") == 0
    assert read_raw(ds.apply(base, str(out), str(tmp_path / "r"))) == read_raw(ft)


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_ctrl_c_while_the_output_is_put_in_place_waits_for_it(tmp_path, capsys, monkeypatch, pair, resume):
    """A SIGINT after the journal and lock are gone, before the rename: the output is put in place
    (an existing one replaced whole), then the run stops, saying so; nothing is stranded."""
    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    real = atomic._fsync

    def fsync(path, directory=False):
        if path == f"{out}.partial" and directory and not os.path.exists(os.path.join(path, atomic.LOCK)):
            os.kill(os.getpid(), signal.SIGINT)
        real(path, directory)

    monkeypatch.setattr(atomic, "_fsync", fsync)
    before = tree_digest(base), tree_digest(art)
    assert run_cli("apply", base, art, "-o", out, "-q", "--overwrite", *resume) == 130
    assert error_line(capsys) == f"deltastream: error: interrupted by SIGINT; the output '{out}' was complete"
    assert read_raw(str(out)) == read_raw(ft) and not (out / "old").exists()
    assert sorted(os.listdir(tmp_path)) == ["a.dsz", "base", "ft", "out"]  # no partial, no backup
    assert (tree_digest(base), tree_digest(art)) == before


def test_a_work_folder_is_never_seen_without_its_lock(tmp_path, capsys, monkeypatch, pair):
    """Another run that finds the work folder the moment it appears names this run, never calls it
    someone else's folder (it appears with its lock file held inside)."""
    import types

    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = tmp_path / "out"
    seen, busy = [], []

    def probe(fn):
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            if not busy and os.path.lexists(f"{out}.partial"):
                busy.append(1)
                assert run_cli("apply", base, art, "-o", out, "-q") == 2
                seen.append(error_line(capsys))
            return result
        return call

    fake = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    fake.mkdir, fake.rename = probe(os.mkdir), probe(os.rename)
    monkeypatch.setattr(atomic, "os", fake)
    before = tree_digest(base), tree_digest(art)
    ds.apply(base, art, str(out))
    assert seen == [f"deltastream: error: output '{out}' is being written by another deltastream run "
                    f"(pid {os.getpid()}); wait for it or choose another output"]
    assert read_raw(str(out)) == read_raw(ft)
    assert (tree_digest(base), tree_digest(art)) == before


def test_the_input_fingerprint_never_follows_a_fifo_swapped_in(tmp_path):
    """A FIFO found where a file was (a swap between stat and open) is not waited on; a link to a
    regular file (a Hugging Face cache snapshot) is read through, as the reader reads it."""
    import threading

    from deltastream.engine import journal

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    found = []
    worker = threading.Thread(target=lambda: found.append(journal._digest(str(fifo))), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert found == [None]
    (tmp_path / "blob").write_text("{}")
    os.symlink(tmp_path / "blob", tmp_path / "linked.json")
    assert journal._digest(str(tmp_path / "linked.json")) == journal._digest(str(tmp_path / "blob")) is not None


def test_a_resume_that_remakes_every_shard_forgets_the_journal_once(tmp_path, monkeypatch, pair):
    from deltastream.engine.journal import Journal

    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "a.dsz"))
    out = str(tmp_path / "out")
    die_before_publish(monkeypatch, lambda: ds.apply(base, art, out, max_shard_size=4096, resume=True))
    shards = [n for n in os.listdir(out + ".partial") if n.endswith(".safetensors")]
    assert len(shards) == 2
    for name in shards:
        os.remove(os.path.join(out + ".partial", name))
    calls, real = [], Journal.forget
    monkeypatch.setattr(Journal, "forget", lambda self: (calls.append(1), real(self))[1])
    before = tree_digest(base), tree_digest(art)
    ds.apply(base, art, out, max_shard_size=4096, resume=True)
    assert calls == [1]
    assert read_raw(out) == read_raw(ft) and (tree_digest(base), tree_digest(art)) == before


def test_an_input_changed_since_the_interrupted_run_is_an_input_error(tmp_path, monkeypatch):
    from deltastream.errors import CheckpointError

    base, ft = make_pair(str(tmp_path), {"layers.0.w": ("BF16", (256, 256))})
    out = str(tmp_path / "out.dsz")
    die_before_publish(monkeypatch, lambda: ds.compress(base, ft, out, chunk_size=16384, resume=True))
    changed = os.path.join(ft, "model.safetensors")
    with open(changed, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    _rewrite_keeping_stat(changed, 8 + header_len + 100_000, b"\x7f\x7f")
    with pytest.raises(CheckpointError, match="changed since the interrupted run"):
        ds.compress(base, ft, out, chunk_size=16384, resume=True)
