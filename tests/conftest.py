"""Test setup: the Triton interpreter runs Triton kernels on CPU tensors when no GPU is here.

TRITON_INTERPRET must be set before anything imports triton, hence here at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where a CUDA device is; elsewhere they are deselected."""
    if torch.cuda.is_available():
        return
    keep = [item for item in items if "cuda" not in item.keywords]
    dropped = [item for item in items if "cuda" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


class _PoisonedTorch:
    """``torch`` as a launcher module sees it, with ``empty`` returning NaN-filled tensors:
    every output and scratch buffer a kernel is given must be fully written by it."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        out = torch.empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out


@pytest.fixture
def poison_outputs(monkeypatch):
    """``poison_outputs(module)``: the buffers ``module`` allocates with torch.empty start as NaN."""

    def poison(module):
        monkeypatch.setattr(module, "torch", _PoisonedTorch())

    return poison
