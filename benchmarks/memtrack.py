"""Run a command and sample the peak private memory (RssAnon) of its whole process tree.

RssAnon (``/proc/<pid>/status``) counts a process's anonymous pages only: heap, stacks,
numpy buffers. Pages of mmap'ed input files are file-backed and not in it, which is why it is
the figure deltastream's memory budget is checked against. The tree's total is summed over the
process and every descendant at each sample (every ~20 ms); the peak of those sums is reported.

    from memtrack import run_tracked
    r = run_tracked(["deltastream", "compress", ...])
    r.wall_s, r.peak_rss_anon, r.returncode

Linux only (reads /proc).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

__all__ = ["TrackResult", "run_tracked", "tree_pids", "read_status_kib", "system_busy_s", "warm"]


@dataclass
class TrackResult:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_anon: int  # bytes, max over samples of the sum over the process tree
    peak_rss: int  # bytes, same for VmRSS (includes file-backed mapped pages)
    max_procs: int  # most processes seen in the tree at one sample
    samples: int
    user_s: float  # CPU time of the tree (from wait4 rusage: the process and its reaped children)
    sys_s: float
    maxrss_kernel: int  # bytes, ru_maxrss of the main process (peak VmHWM: anon + file-backed)
    system_busy_s: float = 0.0  # CPU seconds all processes on the machine used meanwhile (/proc/stat)
    stdout: str = ""
    stderr: str = ""
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (t, rss_anon) every sample

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def other_cpu_s(self) -> float:
        """CPU seconds other processes used during the run (> 0: the machine was not idle)."""
        return max(0.0, self.system_busy_s - self.cpu_s)


def system_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all but idle and iowait, /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal
    busy -= fields[7] if len(fields) > 7 else 0  # steal is not time spent here
    return busy / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """Direct children of pid, via /proc/<pid>/task/*/children (CONFIG_PROC_CHILDREN)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def _children_by_scan(root: int) -> list[int]:
    """Fallback: every descendant of root, by scanning /proc/*/stat for parent ids."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            parent[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


_HAS_CHILDREN_FILE = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (alive at the time of the call)."""
    if not _HAS_CHILDREN_FILE:
        return [root] + _children_by_scan(root)
    seen, todo = [], [root]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def read_status_kib(pid: int, keys: tuple[str, ...] = ("RssAnon", "VmRSS")) -> dict[str, int]:
    """Selected kB fields of /proc/<pid>/status (missing for a zombie or a vanished process)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def run_tracked(argv: list[str], *, interval: float = 0.02, env: dict[str, str] | None = None,
                capture: bool = True, keep_timeline: bool = False, cwd: str | None = None) -> TrackResult:
    """Run argv to completion, sampling the tree's RssAnon every ``interval`` seconds."""
    peak = {"anon": 0, "rss": 0, "procs": 0, "n": 0}
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    out_r = err_r = None
    stdout = stderr = subprocess.PIPE if capture else None
    busy0 = system_busy_s()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=cwd, text=True)

    def sample() -> None:
        while not stop.is_set():
            pids = tree_pids(proc.pid)
            anon = rss = 0
            for p in pids:
                st = read_status_kib(p)
                anon += st.get("RssAnon", 0)
                rss += st.get("VmRSS", 0)
            peak["anon"] = max(peak["anon"], anon * 1024)
            peak["rss"] = max(peak["rss"], rss * 1024)
            peak["procs"] = max(peak["procs"], len(pids))
            peak["n"] += 1
            if keep_timeline:
                timeline.append((time.perf_counter() - start, anon * 1024))
            stop.wait(interval)

    sampler = threading.Thread(target=sample, name="memtrack", daemon=True)
    sampler.start()
    readers = []
    if capture:
        bufs: dict[str, list[str]] = {"out": [], "err": []}

        def drain(stream, key):
            bufs[key].append(stream.read())

        readers = [threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True)]
        for t in readers:
            t.start()
    # wait4 (not proc.wait) so that we get the child's rusage; the zombie stays readable until
    # reaped, and the sampler keeps going until then
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    busy = system_busy_s() - busy0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join()
    if capture:
        out_r, err_r = "".join(bufs["out"]), "".join(bufs["err"])
    return TrackResult(argv=list(argv), returncode=proc.returncode, wall_s=wall, peak_rss_anon=peak["anon"],
                       peak_rss=peak["rss"], max_procs=peak["procs"], samples=peak["n"],
                       user_s=usage.ru_utime, sys_s=usage.ru_stime,
                       maxrss_kernel=usage.ru_maxrss * 1024, stdout=out_r or "", stderr=err_r or "",
                       timeline=timeline, system_busy_s=busy)


if __name__ == "__main__":
    import sys

    r = run_tracked(sys.argv[1:], capture=False)
    print(f"rc={r.returncode} wall={r.wall_s:.2f}s cpu={r.cpu_s:.2f}s peak RssAnon={r.peak_rss_anon / 2**20:.1f} MiB "
          f"peak VmRSS={r.peak_rss / 2**20:.1f} MiB ru_maxrss={r.maxrss_kernel / 2**20:.1f} MiB "
          f"procs<={r.max_procs} samples={r.samples} other-processes-cpu={r.other_cpu_s:.2f}s", file=sys.stderr)
    sys.exit(r.returncode)


def warm(paths: list[str]) -> None:
    """Read the inputs' safetensors files once, so that each tool compared starts with them in the
    page cache (whoever ran first would otherwise pay for the disk)."""
    for path in paths:
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                with open(os.path.join(path, name), "rb") as f:
                    while f.read(64 << 20):
                        pass
