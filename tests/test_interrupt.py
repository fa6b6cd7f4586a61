"""An interrupt midway (SIGINT, SIGTERM) leaves no output that looks valid and the inputs intact."""

import os
import signal
import subprocess
import sys
import time

import pytest

from common import make_pair, read_raw


def _wait_for_chunks(folder: str, timeout: float = 60) -> None:
    """Until the run has written some chunks into its partial output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, _, files in os.walk(folder):
            if any(f.isdigit() or f.endswith(".safetensors") for f in files):
                return
        time.sleep(0.02)
    raise AssertionError(f"no progress in {folder}")


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("big"))
    return make_pair(tmp, {"w": ("F32", (512, 1024)), "v": ("F32", (512, 1024))})  # 2 MiB each


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("command", ["compress", "apply"])
def test_interrupt_midway_leaves_nothing(tmp_path, big_pair, sig, command):
    base, ft = big_pair
    before = read_raw(base), read_raw(ft)
    art = tmp_path / "a.dsz"
    if command == "apply":
        subprocess.run([sys.executable, "-m", "deltastream.cli", "compress", base, ft, "-o", str(art), "-q",
                        "--chunk-size", "2KiB"],
                       check=True)
        args, out = ["apply", base, str(art), "-o", str(tmp_path / "out")], tmp_path / "out"
    else:
        args, out = ["compress", base, ft, "-o", str(art)], art
    # tiny chunks and one worker: thousands of tasks, so the signal lands midway
    if command == "compress":
        args += ["--chunk-size", "2KiB"]
    proc = subprocess.Popen([sys.executable, "-m", "deltastream.cli", *args, "-q", "--workers", "1"],
                            stderr=subprocess.PIPE, text=True)
    _wait_for_chunks(str(out) + ".partial")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [err.strip()] and "interrupted" in err and "Traceback" not in err
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    assert (read_raw(base), read_raw(ft)) == before
