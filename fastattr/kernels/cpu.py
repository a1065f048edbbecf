"""Launchers of the C++/OpenMP projection kernels in ``fastattr._C``.

Layers are passed as raw pointers with their strides; nothing is copied unless a layer's
dtype needs converting (float64 is converted by the caller).
"""

from __future__ import annotations

import torch

from ..backends import load_extension
from ..rng import projection_scale
from . import DTYPE_CODES, KIND_CODES



def _ext():
    mod, err = load_extension("_C")
    if mod is None:
        raise RuntimeError(f"fastattr._C is not available: {err}")
    return mod


def project(layers, offsets, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``[B, k]`` float32 projection of CPU layers ``[B, p_l]`` (any strides)."""
    batch = layers[0].shape[0]
    out = torch.empty(batch, k, dtype=torch.float32)
    specs = [
        (x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[1], x.stride(0), x.stride(1), off)
        for x, off in zip(layers, offsets)
    ]
    _ext().project(out.data_ptr(), batch, specs, k, KIND_CODES[kind], key[0], key[1], stream,
                   projection_scale(k), torch.get_num_threads())
    return out


def materialize(rows: torch.Tensor, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """Rows of R as float32 ``[len(rows), k]``."""
    rows = rows.contiguous()
    out = torch.empty(rows.numel(), k, dtype=torch.float32)
    _ext().materialize(out.data_ptr(), rows.data_ptr(), rows.numel(), k, KIND_CODES[kind],
                       key[0], key[1], stream, projection_scale(k), torch.get_num_threads())
    return out
