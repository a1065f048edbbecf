"""Kernel launchers, one module per backend; each exposes the same functions per op.

``implementation(backend, op)`` returns the callable; modules are imported on first use so
that neither triton nor the compiled extensions load at package import time.
"""

from __future__ import annotations

import importlib

import torch

# Codes the compiled kernels use for input dtypes and matrix kinds (csrc/*/projection.h).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KIND_CODES = {"rademacher": 0, "gaussian": 1}

_MODULES = {
    "reference": {"project": "fastattr.reference.projection", "psg": "fastattr.reference.psg",
                  "curvature": "fastattr.reference.curvature"},
    "cpu": {"project": "fastattr.kernels.cpu", "psg": "fastattr.kernels.cpu",
            "curvature": "fastattr.kernels.cpu"},
    "triton": {"project": "fastattr.kernels.triton.projection", "psg": "fastattr.kernels.triton.psg",
               "curvature": "fastattr.kernels.triton.curvature"},
    "cuda": {"project": "fastattr.kernels.cuda", "psg": "fastattr.kernels.cuda",
             "curvature": "fastattr.kernels.cuda"},
}


def implementation(backend: str, family: str, name: str):
    """The function ``name`` of op family ``family`` on ``backend``."""
    return getattr(importlib.import_module(_MODULES[backend][family]), name)
