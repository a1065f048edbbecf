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
