"""Shared by the benchmark scripts: the machine/version record and atomic JSON output."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch

import fastattr
from fastattr.backends import backends as fastattr_backends
from fastattr.batching import release_free_memory

GiB = 1 << 30


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / GiB, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def machine_info() -> dict:
    status = fastattr_backends()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "triton": _version("triton"),
        "fastattr": getattr(fastattr, "__version__", None),
        "fastattr_path": os.path.dirname(os.path.abspath(fastattr.__file__)),
        "fastattr_backends": {name: repr(s) for name, s in status.items()},
        "traker": _version("traker"),
        "diffusers": _version("diffusers"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_mem_gib=round(props.total_memory / GiB, 1),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


# ----------------------------------------------------- peak memory and one case per process

MiB = 1 << 20


def proc_status(field: str) -> int:
    """A byte count from /proc/self/status (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory(device: str) -> int:
    """Start a peak-memory window; returns the baseline (bytes) that ``peak_memory_mib``
    subtracts: CUDA allocations, or this process's resident set (VmHWM reset to VmRSS)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # without it, memory a warm-up freed stays resident and the next run reuses it unseen,
    # so the RSS growth under-counts by an amount that depends on the allocator's history
    release_free_memory()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
        fh.write("5")  # resets VmHWM (peak RSS) to the current RSS
    return proc_status("VmRSS")


def peak_memory_mib(device: str, base: int) -> float:
    """Peak growth over ``base`` since ``reset_peak_memory``, in MiB."""
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else proc_status("VmHWM")
    return (peak - base) / MiB


def run_in_subprocess(script: str, spec: dict, timeout: float) -> dict:
    """Run ``script --run-case JSON`` (so its peak memory is its own) and parse the JSON line
    it prints; a failure or timeout becomes a row with status "error" / "skipped"."""
    cmd = [sys.executable, os.path.abspath(script), "--run-case", json.dumps(spec)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, status="skipped", reason=f"timed out after {timeout:.0f} s")
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        return dict(spec, status="error", reason=(res.stderr or res.stdout)[-1500:])
    return json.loads(lines[-1])


def write_json_atomic(path: str, payload: dict) -> None:
    """Write ``payload`` to ``path`` via a temp file and a rename: never half-written."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bench.", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def finish(benchmark: str, args, rows: list, checks: list, start: float) -> int:
    """Print the acceptance checks, write the JSON record (``args.json``) and return the exit
    status: 0 when every case ran."""
    import time

    for c in checks:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['check']}: {c['value']:.2f}")
    if args.json:
        write_json_atomic(args.json, dict(benchmark=benchmark, machine=machine_info(),
                                          config=vars(args), rows=rows, acceptance=checks,
                                          wall_s=time.perf_counter() - start))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
