#!/usr/bin/env python
"""I/O benchmark: how close do ``deltastream compress`` / ``apply`` get to merely reading their inputs?

    python benchmarks/bench_io.py                      # sizes 0.5B and 1B
    python benchmarks/bench_io.py --sizes tiny         # a smoke run (seconds)
    python benchmarks/bench_io.py --sizes 1B --workers 2 --chunk-size 32MiB --keep

For each size it (generating the synthetic base + fine-tune pair with make_checkpoints.py, the CLI
of deltastream/synthetic.py, into ``--data-dir/<size>`` first if it is not there) measures, in one
run:

a. the time to read the inputs, ``cat base/* ft/* > /dev/null``, after one untimed warm-up cat
   (so the page cache is warm, as it is for the runs that follow); the same for apply's inputs
   (base + the artifact's files);
b. ``deltastream compress BASE FT -o A.dsz --method lossless -q --overwrite``: wall time, CPU
   time, and peak RssAnon summed over the process tree (sampled every 20 ms, see memtrack.py);
c. ``deltastream apply BASE A.dsz -o OUT -q --overwrite``: the same; then the rebuilt tensors
   are compared byte for byte with the fine-tune's (not timed);
d. ``deltastream info A.dsz --json``: the ratio;
e. ``zstd -3 -T<cpus>`` of the fine-tune's safetensors files (python ``zstandard`` or numcodecs'
   Zstd, streamed, if there is no zstd binary): the plain "zstd the checkpoint" size.

It writes ``benchmarks/results/bench_io_<host>-<date>.md`` (+ ``.json``) and prints the table.
Artifacts and rebuilt checkpoints are deleted after each size unless ``--keep``; the generated
pairs are always kept (they are reused by the next run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from memtrack import run_tracked, system_busy_s  # noqa: E402

from deltastream.synthetic import SHAPES as SIZES  # noqa: E402
from deltastream.synthetic import pair_complete  # noqa: E402

MiB = 2**20


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def deltastream_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "deltastream")
    if os.path.isfile(exe) and os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("deltastream")
    return [found] if found else [sys.executable, "-m", "deltastream.cli"]


def wait_idle(max_s: float, *, busy_cores: float = 0.15, need: int = 3) -> float:
    """Wait until the machine is idle (< busy_cores CPUs busy for `need` 0.5 s windows); seconds waited."""
    start = time.perf_counter()
    ok = 0
    while ok < need and time.perf_counter() - start < max_s:
        b0, t0 = system_busy_s(), time.perf_counter()
        time.sleep(0.5)
        ok = ok + 1 if (system_busy_s() - b0) / (time.perf_counter() - t0) < busy_cores else 0
    waited = time.perf_counter() - start
    WAITED[0] += waited
    return waited


WAITED = [0.0]  # seconds spent in wait_idle, all steps


def tracked(argv: list[str], args: argparse.Namespace, log) -> tuple:
    """run_tracked, after waiting for an idle machine; rerun (up to --retries) if others used the CPU."""
    best, waited = None, 0.0
    for _attempt in range(1 + (args.retries if args.wait_idle else 0)):
        if args.wait_idle:
            waited += wait_idle(args.wait_idle)
        r = run_tracked(argv)
        if best is None or (r.returncode == 0 and r.other_cpu_s < best.other_cpu_s):
            best = r
        if r.returncode != 0 or r.other_cpu_s / r.wall_s < 0.1:
            break
        log(f"  other processes used {r.other_cpu_s / r.wall_s:.2f} CPUs during the run; rerunning")
    return best, waited


def files_under(path: str) -> list[str]:
    """All regular files under a folder (recursively), sorted."""
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        out += [os.path.join(root, n) for n in sorted(names)]
    return [p for p in out if os.path.isfile(p) and not os.path.islink(p)]


def top_files(folder: str) -> list[str]:
    """What the shell glob ``folder/*`` gives (regular files, no dot files)."""
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]


def total_size(paths: list[str]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def cat_time(paths: list[str], repeats: int, wait: float = 0) -> float:
    """Seconds to ``cat`` the files to /dev/null: one untimed warm-up, then the best of repeats."""
    listing = b"\0".join(p.encode() for p in paths)

    def once() -> float:
        start = time.perf_counter()
        subprocess.run(["xargs", "-0", "cat"], input=listing, stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    once()
    if wait:
        wait_idle(wait)
    return min(once() for _ in range(max(1, repeats)))


def zstd_size(paths: list[str], level: int, threads: int) -> dict:
    """Compressed size (and time) of the files' concatenation, one zstd stream, streamed."""
    start = time.perf_counter()
    if shutil.which("zstd"):
        cmd = f"cat {' '.join(shlex.quote(p) for p in paths)} | zstd -{level} -T{threads} -c -q | wc -c"
        out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, check=True)
        how = f"cat FT/*.safetensors | zstd -{level} -T{threads} -c | wc -c"
        size = int(out.stdout.split()[0])
    else:
        size = 0
        try:
            import zstandard

            cctx = zstandard.ZstdCompressor(level=level, threads=threads)
            co = cctx.compressobj()
            how = f"python zstandard level {level}, {threads} threads"
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(64 * MiB):
                        size += len(co.compress(block))
            size += len(co.flush())
        except ImportError:  # numcodecs' Zstd has no streaming API: one frame per 64 MiB block
            from numcodecs import Zstd

            codec = Zstd(level=level)
            how = f"numcodecs.Zstd level {level}, one frame per 64 MiB block"
            for p in paths:
                with open(p, "rb") as f:
                    while block := f.read(64 * MiB):
                        size += len(codec.encode(block))
    return {"bytes": size, "seconds": time.perf_counter() - start, "how": how}


def _read_header(path: str) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def tensor_index(folder: str) -> dict[str, tuple[str, str, list[int], int, int]]:
    """name -> (file, dtype, shape, absolute start, absolute end) over a folder's safetensors."""
    out = {}
    for path in top_files(folder):
        if path.endswith(".safetensors"):
            data_start, header = _read_header(path)
            for name, t in header.items():
                if name != "__metadata__":
                    a, b = t["data_offsets"]
                    out[name] = (path, t["dtype"], t["shape"], data_start + a, data_start + b)
    return out


def same_tensors(folder_a: str, folder_b: str, block: int = 64 * MiB) -> tuple[bool, str]:
    """Bit-exact comparison of every tensor (name, dtype, shape, bytes) of two checkpoint folders."""
    ia, ib = tensor_index(folder_a), tensor_index(folder_b)
    if set(ia) != set(ib):
        return False, f"tensor names differ ({len(set(ia) ^ set(ib))} not in both)"
    fds: dict[str, int] = {}
    try:
        for name, (pa, da, sa, a0, a1) in ia.items():
            pb, db, sb, b0, b1 = ib[name]
            if (da, sa, a1 - a0) != (db, sb, b1 - b0):
                return False, f"{name}: dtype/shape differ"
            fa = fds.setdefault(pa, os.open(pa, os.O_RDONLY))
            fb = fds.setdefault(pb, os.open(pb, os.O_RDONLY))
            for off in range(0, a1 - a0, block):
                n = min(block, a1 - a0 - off)
                if os.pread(fa, n, a0 + off) != os.pread(fb, n, b0 + off):
                    return False, f"{name}: bytes differ near offset {off}"
    finally:
        for fd in fds.values():
            os.close(fd)
    return True, f"{len(ia)} tensors bit-exact"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("deltastream", "numpy", "zarr", "numcodecs", "dask"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - a missing package is just not listed
            pass
    try:
        v = subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout
        m = re.search(r"v\d+\.\d+\.\d+", v)
        out["zstd"] = m.group(0) if m else v.strip("* \n")
    except OSError:
        pass
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release()}


# ----------------------------------------------------------------------------------------------
# one size
# ----------------------------------------------------------------------------------------------
def run_size(size: str, args: argparse.Namespace, ds: list[str], log) -> dict:
    d = os.path.join(args.data_dir, size)
    base, ft = os.path.join(d, "base"), os.path.join(d, "ft")
    art, rebuilt = os.path.join(d, "A.dsz"), os.path.join(d, "rebuilt")
    rec: dict = {"size": size, "params": SIZES[size].n_params, "data_dir": d}

    if not pair_complete(d, size, seed=args.seed):
        log(f"[{size}] generating the pair into {d} ...")
        gen = [sys.executable, os.path.join(HERE, "make_checkpoints.py"), "--size", size, "--out", d,
               "--seed", str(args.seed)]
        t0 = time.perf_counter()
        subprocess.run(gen, check=True)
        rec["generate_s"] = time.perf_counter() - t0
    base_files, ft_files = top_files(base), top_files(ft)
    ft_st = [p for p in ft_files if p.endswith(".safetensors")]
    rec["base_bytes"], rec["ft_bytes"] = total_size(base_files), total_size(ft_files)
    rec["ft_safetensors_bytes"] = total_size(ft_st)

    # (a) reading compress's inputs
    rec["read_compress_inputs_s"] = cat_time(base_files + ft_files, args.read_repeats, args.wait_idle)
    log(f"[{size}] cat base/* ft/*: {rec['read_compress_inputs_s']:.2f}s "
        f"({(rec['base_bytes'] + rec['ft_bytes']) / rec['read_compress_inputs_s'] / 1e9:.2f} GB/s)")

    # (b) compress
    extra = []
    if args.workers is not None:
        extra += ["--workers", str(args.workers)]
    cargv = ds + ["compress", base, ft, "-o", art, "--method", "lossless", "-q", "--overwrite"] + extra
    if args.chunk_size is not None:
        cargv += ["--chunk-size", args.chunk_size]
    r, rec["compress_waited_s"] = tracked(cargv, args, log)
    rec["compress"] = _tracked(r)
    if r.returncode != 0:
        rec["error"] = f"compress failed (rc {r.returncode}): {r.stderr.strip()[-2000:]}"
        log(f"[{size}] {rec['error']}")
        return rec
    log(f"[{size}] compress: {r.wall_s:.2f}s wall, {r.cpu_s:.2f}s CPU, peak RssAnon "
        f"{r.peak_rss_anon / MiB:.0f} MiB  ({r.stdout.strip()})")

    # (d) info
    info = json.loads(subprocess.run(ds + ["info", art, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    rec["info"] = {k: info.get(k) for k in ("fine_tune_bytes", "stored_bytes", "ratio")}
    art_files = files_under(art)
    rec["artifact_disk_bytes"] = total_size(art_files)
    rec["artifact_files"] = len(art_files)

    # (a') reading apply's inputs, (c) apply
    rec["read_apply_inputs_s"] = cat_time(base_files + art_files, args.read_repeats, args.wait_idle)
    aargv = ds + ["apply", base, art, "-o", rebuilt, "-q", "--overwrite"] + extra
    r, rec["apply_waited_s"] = tracked(aargv, args, log)
    rec["apply"] = _tracked(r)
    if r.returncode != 0:
        rec["error"] = f"apply failed (rc {r.returncode}): {r.stderr.strip()[-2000:]}"
        log(f"[{size}] {rec['error']}")
        return rec
    log(f"[{size}] cat base/* A.dsz/**: {rec['read_apply_inputs_s']:.2f}s; apply: {r.wall_s:.2f}s wall, "
        f"{r.cpu_s:.2f}s CPU, peak RssAnon {r.peak_rss_anon / MiB:.0f} MiB")
    if not args.no_check:
        ok, msg = same_tensors(ft, rebuilt)
        rec["exact"], rec["exact_detail"] = ok, msg
        log(f"[{size}] rebuilt vs fine-tune: {msg}")

    # (e) zstd of the fine-tune
    if not args.no_zstd:
        if args.wait_idle:
            wait_idle(args.wait_idle)
        rec["zstd"] = zstd_size(ft_st, 3, args.zstd_threads)
        log(f"[{size}] zstd -3 of the fine-tune: {rec['zstd']['bytes'] / MiB:.1f} MiB in "
            f"{rec['zstd']['seconds']:.1f}s")

    if not args.keep:
        shutil.rmtree(art, ignore_errors=True)
        shutil.rmtree(rebuilt, ignore_errors=True)
    rec["commands"] = {"compress": shlex.join(cargv), "apply": shlex.join(aargv),
                       "info": shlex.join(ds + ["info", art, "--json"])}
    return rec


def _tracked(r) -> dict:
    return {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "user_s": r.user_s, "sys_s": r.sys_s,
            "peak_rss_anon": r.peak_rss_anon, "peak_rss": r.peak_rss, "ru_maxrss": r.maxrss_kernel,
            "max_procs": r.max_procs, "samples": r.samples, "returncode": r.returncode,
            "other_cpu_s": r.other_cpu_s,
            "stdout": r.stdout.strip()[-500:]}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def derive(rec: dict) -> dict:
    """The ratios the table shows."""
    out = {}
    c, a = rec.get("compress"), rec.get("apply")
    if c and c["returncode"] == 0:
        out["compress_vs_read"] = rec["read_compress_inputs_s"] / c["wall_s"]
        out["compress_gbps"] = (rec["base_bytes"] + rec["ft_bytes"]) / c["wall_s"] / 1e9
        out["compress_cpu_util"] = c["cpu_s"] / c["wall_s"]
        out["compress_other_load"] = c["other_cpu_s"] / c["wall_s"]
    if a and a["returncode"] == 0:
        out["apply_vs_read"] = rec["read_apply_inputs_s"] / a["wall_s"]
        out["apply_gbps"] = rec["ft_safetensors_bytes"] / a["wall_s"] / 1e9
        out["apply_cpu_util"] = a["cpu_s"] / a["wall_s"]
        out["apply_other_load"] = a["other_cpu_s"] / a["wall_s"]
    if rec.get("info"):
        out["artifact_ratio"] = rec["info"]["ratio"]
        if rec.get("zstd"):
            out["zstd_ratio"] = rec["ft_safetensors_bytes"] / rec["zstd"]["bytes"]
            out["artifact_vs_zstd"] = rec["artifact_disk_bytes"] / rec["zstd"]["bytes"]
    return out


def render(results: list[dict], meta: dict) -> str:
    L = [f"# deltastream I/O benchmark ({meta['date']})", "",
         "Command:", "", "```", meta["command"], "```", "",
         f"Machine: {meta['machine']['cpus']} CPUs ({meta['machine']['cpu']}), {meta['machine']['ram_gib']} GiB RAM, "
         f"host `{meta['machine']['host']}`, kernel {meta['machine']['kernel']}. "
         f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}. "
         f"Total bench runtime: **{meta['runtime_s']:.0f} s** (data generation included: "
         f"{meta['generate_s']:.0f} s; waiting for an idle machine: {meta['waited_idle_s']:.0f} s).", "",
         "Inputs: synthetic Llama-shaped bf16 pairs from `benchmarks/make_checkpoints.py` (seed "
         f"{meta['seed']}; delta std ~3.3e-4, see `deltastream/synthetic.py`). "
         "Page cache warm for every timed step.", ""]
    L += ["## Compress (`deltastream compress BASE FT -o A.dsz --method lossless -q --overwrite`)", "",
          "| size | params | base+ft | read base+ft (cat) | compress wall | **speed vs read** | GB/s in | CPU util "
          "| other load | **peak RssAnon** | peak RSS (incl. file pages) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, d = r.get("compress"), r["derived"]
        if not c:
            continue
        L.append(f"| {r['size']} | {r['params'] / 1e9:.3f}e9 | {(r['base_bytes'] + r['ft_bytes']) / 1e9:.2f} GB | "
                 f"{r['read_compress_inputs_s']:.2f} s | {c['wall_s']:.2f} s | "
                 f"**{_f(d.get('compress_vs_read'), '{:.3f}')}** | {_f(d.get('compress_gbps'))} | "
                 f"{_f(d.get('compress_cpu_util'))} | {_f(d.get('compress_other_load'))} | "
                 f"**{c['peak_rss_anon'] / MiB:.0f} MiB** | "
                 f"{c['peak_rss'] / MiB:.0f} MiB |")
    L += ["", "## Apply (`deltastream apply BASE A.dsz -o OUT -q --overwrite`)", "",
          "| size | base+artifact | read base+artifact (cat) | apply wall | **speed vs read** | GB/s out | CPU util "
          "| other load | **peak RssAnon** | peak RSS (incl. file pages) | rebuilt == fine-tune |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, d = r.get("apply"), r["derived"]
        if not a:
            continue
        L.append(f"| {r['size']} | {(r['base_bytes'] + r['artifact_disk_bytes']) / 1e9:.2f} GB | "
                 f"{r['read_apply_inputs_s']:.2f} s | {a['wall_s']:.2f} s | "
                 f"**{_f(d.get('apply_vs_read'), '{:.3f}')}** | {_f(d.get('apply_gbps'))} | "
                 f"{_f(d.get('apply_cpu_util'))} | {_f(d.get('apply_other_load'))} | "
                 f"**{a['peak_rss_anon'] / MiB:.0f} MiB** | "
                 f"{a['peak_rss'] / MiB:.0f} MiB | {'yes' if r.get('exact') else r.get('exact_detail', '-')} |")
    L += ["", "## Size (`deltastream info A.dsz --json`; zstd = `zstd -3` of the fine-tune's safetensors)", "",
          "| size | fine-tune | artifact (info stored / on disk, files) | **artifact ratio** | zstd -3 size "
          "| zstd ratio | **artifact / zstd** | zstd time |",
          "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, z = r["derived"], r.get("zstd")
        if not r.get("info"):
            continue
        L.append(f"| {r['size']} | {r['ft_safetensors_bytes'] / MiB:.1f} MiB | "
                 f"{r['info']['stored_bytes'] / MiB:.1f} / {r['artifact_disk_bytes'] / MiB:.1f} MiB, "
                 f"{r['artifact_files']} | **{_f(d.get('artifact_ratio'), '{:.3f}x')}** | "
                 f"{_f(z and z['bytes'] / MiB, '{:.1f} MiB')} | {_f(d.get('zstd_ratio'), '{:.3f}x')} | "
                 f"**{_f(d.get('artifact_vs_zstd'), '{:.3f}')}** | {_f(z and z['seconds'], '{:.1f} s')} |")
    ok = [r for r in results if r.get("apply") and r["apply"]["returncode"] == 0]
    if len(ok) >= 2:
        first = ok[0]
        L += ["", f"## Memory scaling (peak RssAnon relative to {first['size']})", "",
              "| size | params ratio | compress RssAnon ratio | apply RssAnon ratio |", "|---|---|---|---|"]
        for r in ok[1:]:
            L.append(f"| {r['size']} / {first['size']} | {r['params'] / first['params']:.2f} | "
                     f"{r['compress']['peak_rss_anon'] / first['compress']['peak_rss_anon']:.3f} | "
                     f"{r['apply']['peak_rss_anon'] / first['apply']['peak_rss_anon']:.3f} |")
    errs = [r for r in results if r.get("error")]
    if errs:
        L += ["", "## Errors", ""] + [f"- {r['size']}: `{r['error']}`" for r in errs]
    L += ["", "Definitions: *speed vs read* = (time to `cat` the command's inputs to /dev/null, page cache warm) / "
          "(command wall time), so 1.0 = as fast as just reading the inputs. Wall times include process start-up "
          f"(`deltastream --version`: {meta['startup_s']:.2f} s). *Peak RssAnon* = max over 20 ms samples of the "
          "sum of RssAnon over the process tree (private memory; mapped input pages are file-backed and not "
          "counted). *CPU util* = (user+sys CPU s) / wall s; *other load* = CPU s that other processes on the machine "
          "used meanwhile / wall s (from /proc/stat; well above 0 means the timings were taken on a busy machine). "
          "*Artifact ratio* = fine-tune bytes / stored bytes "
          "(from `info`). *artifact / zstd* = artifact bytes on disk / zstd -3 bytes (< 1: deltastream smaller).",
          ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0.5B,1B", help=f"comma-separated, from {', '.join(SIZES)} (default 0.5B,1B)")
    ap.add_argument("--workers", type=int, default=None, help="passed to compress/apply as --workers")
    ap.add_argument("--chunk-size", default=None, help="passed to compress as --chunk-size (e.g. 32MiB)")
    ap.add_argument("--keep", action="store_true", help="keep the artifacts and rebuilt checkpoints")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "bench-data"), help="default: <repo>/bench-data")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default=None, help="results file name tag (default: <host>-<date>)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    ap.add_argument("--read-repeats", type=int, default=1, help="timed cat runs after the warm-up (best taken)")
    ap.add_argument("--zstd-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="before each timed step wait (at most this long) for other processes to go quiet, "
                         "and rerun a command they disturbed (default 0: off)")
    ap.add_argument("--retries", type=int, default=2, help="reruns of a disturbed command with --wait-idle")
    ap.add_argument("--no-zstd", action="store_true", help="skip the zstd reference")
    ap.add_argument("--no-check", action="store_true", help="skip the bit-exact check of the rebuild")
    args = ap.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}; choose from {', '.join(SIZES)}")

    start = time.perf_counter()
    now = _dt.datetime.now()
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd())]
                         + (sys.argv[1:] if argv is None else argv))
    ds = deltastream_argv()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    subprocess.run(ds + ["--version"], capture_output=True)  # warm the import caches
    t0 = time.perf_counter()
    subprocess.run(ds + ["--version"], capture_output=True, check=True)
    startup = time.perf_counter() - t0

    results = []
    for size in sizes:
        rec = run_size(size, args, ds, log)
        rec["derived"] = derive(rec)
        results.append(rec)

    runtime = time.perf_counter() - start
    meta = {"date": now.strftime("%Y-%m-%d %H:%M"), "command": command, "cwd": os.getcwd(),
            "machine": machine(), "versions": versions(), "runtime_s": runtime, "startup_s": startup,
            "generate_s": sum(r.get("generate_s", 0.0) for r in results), "seed": args.seed,
            "waited_idle_s": WAITED[0],
            "args": vars(args)}
    md = render(results, meta)
    tag = args.tag or f"{re.sub(r'[^A-Za-z0-9_.-]', '_', socket.gethostname())}-{now.strftime('%Y%m%d')}"
    os.makedirs(args.results_dir, exist_ok=True)
    md_path = os.path.join(args.results_dir, f"bench_io_{tag}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    with open(md_path[:-3] + ".json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
        f.write("\n")
    print()
    print(md)
    print(f"wrote {md_path} and .json ({runtime:.0f} s)")
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
