"""Which compute backends exist on this machine, and which one an op runs on.

Every op has four implementations: ``reference`` (pure torch, always there), ``cpu``
(``fastattr._C``, C++/OpenMP), ``triton`` and ``cuda`` (``fastattr._cuda``). Nothing here
imports triton or the extensions at package import time; availability is probed on first
use and cached.

Choice, in order: an explicit ``backend=`` argument; else the ``FASTATTR_BACKEND``
environment variable; else ``auto``: ``cuda`` (then ``triton``) on CUDA tensors, ``cpu`` on
CPU tensors, ``reference`` when nothing compiled is there.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

__all__ = ["BACKENDS", "BackendStatus", "backends", "check_backend_name", "select_backend",
           "load_extension"]

BACKENDS = ("reference", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend: ``available`` means an op can run on it here."""

    available: bool
    reason: str
    built: bool = True

    def __repr__(self) -> str:
        state = "available" if self.available else "unavailable"
        return f"<{state}: {self.reason}>"


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """Import ``fastattr._C`` / ``fastattr._cuda``; returns (module or None, error text)."""
    try:
        return importlib.import_module(f"fastattr.{name}"), ""
    except ImportError as exc:  # not built, or built against a missing runtime
        return None, str(exc)


def _build_info() -> dict:
    import json

    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError:
        return {}


def _cuda_device_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "pure torch, always available")
    if name == "cpu":
        mod, err = load_extension("_C")
        if mod is None:
            return BackendStatus(False, f"fastattr._C not importable: {err}", built=False)
        return BackendStatus(True, f"fastattr._C ({mod.simd_level()}, OpenMP threads)")
    if name == "cuda":
        mod, err = load_extension("_cuda")
        if mod is None:
            why = _build_info().get("cuda", "") or err
            return BackendStatus(False, f"fastattr._cuda not built: {why}", built=False)
        if not _cuda_device_visible():
            return BackendStatus(False, "fastattr._cuda built, but no CUDA device is visible")
        if mod.device_count() < 1:  # its static runtime needs a driver new enough for it
            why = mod.version().get("device_status", "")
            return BackendStatus(False, f"fastattr._cuda built, but its CUDA runtime sees no device: {why}")
        import torch

        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return BackendStatus(False, f"fastattr._cuda needs compute capability >= 8.0 (bf16 "
                                 f"tensor cores); this GPU is sm_{major}{minor}")
        return BackendStatus(True, "fastattr._cuda on " + _cuda_device_name())
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return BackendStatus(False, "triton is not installed (pip install fastattr[triton])",
                                 built=False)
        if _cuda_device_visible():
            return BackendStatus(True, "triton on " + _cuda_device_name())
        if os.environ.get("TRITON_INTERPRET") == "1":
            return BackendStatus(True, "triton interpreter on CPU (TRITON_INTERPRET=1; slow)")
        return BackendStatus(False, "triton installed, but no GPU (set TRITON_INTERPRET=1 to "
                             "run its kernels on CPU, slowly)")
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def _cuda_device_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, when absent, why."""
    return {name: _status(name) for name in BACKENDS}


def check_backend_name(backend) -> str:
    """``backend`` if it is "auto" or a backend name; ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def select_backend(requested: str, device) -> str:
    """Resolve ``requested`` ("auto" or a backend name) for tensors on ``device``.

    Raises ``ValueError`` for an unknown name or a backend that cannot take tensors on this
    device, and ``RuntimeError`` for a named backend that is not available here.
    """
    import torch

    device = torch.device(device)
    check_backend_name(requested)
    if requested == "auto":
        requested = os.environ.get("FASTATTR_BACKEND", "auto") or "auto"
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(name for name in order if _status(name).available)
    if requested not in BACKENDS:
        raise ValueError(f"FASTATTR_BACKEND must be 'auto' or one of {BACKENDS}, got {requested!r}")
    status = _status(requested)
    if not status.available:
        raise RuntimeError(f"backend {requested!r} is not available: {status.reason}")
    if requested == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' takes CPU tensors, got tensors on {device}")
    if requested == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' takes CUDA tensors, got tensors on {device}")
    if requested == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return requested
