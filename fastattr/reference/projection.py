"""Reference projection: materialise the Philox matrix chunk by chunk and multiply.

Memory is bounded by ``chunk_entries`` matrix entries at a time, whatever p is.
"""

from __future__ import annotations

import torch

from ..rng import matrix_rows

# About 4M entries per chunk: the int64 bit tensors of matrix_rows stay near 128 MiB.
CHUNK_ENTRIES = 1 << 22


def materialize(rows: torch.Tensor, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """Rows ``rows`` of R as float32 ``[len(rows), k]``, scaled by 1/sqrt(k)."""
    out = torch.empty(rows.numel(), k, dtype=torch.float32, device=rows.device)
    step = max(1, CHUNK_ENTRIES // max(k, 1))
    for start in range(0, rows.numel(), step):
        out[start : start + step] = matrix_rows(rows[start : start + step], k, kind, key, stream)
    return out


def project(layers, offsets, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``sum_l layers[l] @ R[offsets[l] : offsets[l] + p_l]`` as float32 ``[B, k]``."""
    batch = layers[0].shape[0]
    device = layers[0].device
    out = torch.zeros(batch, k, dtype=torch.float32, device=device)
    step = max(1, CHUNK_ENTRIES // max(k, 1))
    for x, offset in zip(layers, offsets):
        for start in range(0, x.shape[1], step):
            stop = min(x.shape[1], start + step)
            rows = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=device)
            out.addmm_(x[:, start:stop].to(torch.float32), matrix_rows(rows, k, kind, key, stream))
    return out
