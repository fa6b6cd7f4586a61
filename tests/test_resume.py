"""A run killed midway (kill -9) and run again with --resume continues from its finished chunks
and gives the same bits as an uninterrupted run; without --resume the partial output is dropped."""

import os
import signal
import subprocess
import sys
import time

import pytest

import deltastream as ds

from common import make_pair, read_raw


def _journal_records(partial: str) -> int:
    folder = os.path.join(partial, ".journal")
    return sum(len([f for f in files if f.endswith(".json") and f != "plan.json"]) for _, _, files in os.walk(folder))


def _kill_midway(argv: list[str], partial: str, at_least: int = 20) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "deltastream.cli", *argv, "-q", "--workers", "1"],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _journal_records(partial) < at_least:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("resume"))
    return make_pair(tmp, {"layers.0.w": ("BF16", (512, 512)), "layers.1.w": ("BF16", (512, 512))})


@pytest.mark.parametrize("command", ["compress", "edit", "apply"])
def test_kill_then_resume_gives_the_uninterrupted_bits(tmp_path, pair, command):
    base, ft = pair
    if command == "apply":
        art = ds.compress(base, ft, str(tmp_path / "a.dsz"), chunk_size="2KiB")
        argv = ["apply", base, art]
        reference = ds.apply(base, art, str(tmp_path / "ref"))
    elif command == "edit":
        argv = ["edit", base, ft, "--method", "dare", "-p", "p=0.7", "--chunk-size", "2KiB"]
        reference = ds.edit(base, ft, str(tmp_path / "ref"), "dare", p=0.7, chunk_size="2KiB")
    else:
        argv = ["compress", base, ft, "--method", "bitdelta", "--chunk-size", "2KiB"]
        reference = ds.apply(base, ds.compress(base, ft, str(tmp_path / "ref.dsz"), "bitdelta", chunk_size="2KiB"),
                             str(tmp_path / "ref"))
    out = str(tmp_path / "out")
    _kill_midway([*argv, "-o", out], out + ".partial")
    assert os.path.isdir(out + ".partial") and not os.path.exists(out)  # kill -9 leaves only the partial
    done = _journal_records(out + ".partial")
    first = sorted(os.listdir(os.path.join(out + ".partial", ".journal")))
    start = time.monotonic()
    assert subprocess.run([sys.executable, "-m", "deltastream.cli", *argv, "-o", out, "-q", "--resume"]).returncode == 0
    assert time.monotonic() - start < 120 and done > 0 and first
    rebuilt = ds.apply(base, out, str(tmp_path / "rebuilt")) if command == "compress" else out
    assert read_raw(rebuilt) == read_raw(reference)
    assert not os.path.exists(out + ".partial") and not os.path.exists(os.path.join(out, ".journal"))


def test_resume_skips_finished_tasks(tmp_path, pair, monkeypatch):
    import deltastream.jobs.compress as job

    base, ft = pair
    out = str(tmp_path / "out.dsz")
    _kill_midway(["compress", base, ft, "--chunk-size", "2KiB", "-o", out], out + ".partial", at_least=50)
    done = _journal_records(out + ".partial")
    calls = []
    original = job.compress_chunk
    monkeypatch.setattr(job, "compress_chunk", lambda *a: calls.append(1) or original(*a))
    ds.compress(base, ft, out, chunk_size="2KiB", resume=True)
    assert len(calls) <= 2 * 512 * 512 * 2 // 2048 - done + 2  # only the unfinished chunks ran again
    assert read_raw(ds.apply(base, out, str(tmp_path / "r"))) == read_raw(ft)


def test_without_resume_the_partial_output_is_dropped(tmp_path, pair):
    base, ft = pair
    out = str(tmp_path / "out.dsz")
    _kill_midway(["compress", base, ft, "--chunk-size", "2KiB", "-o", out], out + ".partial")
    ds.compress(base, ft, out, chunk_size="2KiB")  # starts over
    assert not os.path.exists(out + ".partial")
    assert read_raw(ds.apply(base, out, str(tmp_path / "r"))) == read_raw(ft)


def test_resume_refuses_a_partial_output_of_another_job(tmp_path, pair):
    from deltastream.errors import ParameterError

    base, ft = pair
    out = str(tmp_path / "out.dsz")
    _kill_midway(["compress", base, ft, "--chunk-size", "2KiB", "-o", out], out + ".partial")
    with pytest.raises(ParameterError, match="made by a different job"):
        ds.compress(base, ft, out, "dare", chunk_size="2KiB", resume=True)


def test_merge_kill_then_resume(tmp_path, pair):
    base, ft = pair
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
                   f"  - model: {ft}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                   f"  - model: {base}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    reference = ds.merge(str(cfg), str(tmp_path / "ref"), chunk_size="2KiB")
    out = str(tmp_path / "out")
    _kill_midway(["merge", str(cfg), "--chunk-size", "2KiB", "-o", out], out + ".partial")
    assert subprocess.run([sys.executable, "-m", "deltastream.cli", "merge", str(cfg), "--chunk-size", "2KiB",
                           "-o", out, "-q", "--resume"]).returncode == 0
    assert read_raw(out) == read_raw(reference)


def test_merge_resume_refuses_an_artifact_model_replaced_since_the_kill(tmp_path, pair):
    from deltastream.errors import ParameterError

    base, ft = pair
    art = ds.compress(base, ft, str(tmp_path / "ft.dsz"))
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                   f"  - model: {art}\n    parameters: {{weight: 0.5}}\n")
    out = str(tmp_path / "out")
    _kill_midway(["merge", str(cfg), "--chunk-size", "2KiB", "-o", out], out + ".partial")
    # the same path, another artifact (its chunk reads are not journaled: its digest is the plan's)
    ds.compress(base, ft, art, "dare", p=0.5, overwrite=True)
    with pytest.raises(ParameterError, match="made by a different job"):
        ds.merge(str(cfg), out, chunk_size="2KiB", resume=True)
