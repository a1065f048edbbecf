"""Launchers of the CUDA projection kernels in ``fastattr._cuda``.

Same signatures as ``fastattr.kernels.cpu``. Layers are passed as raw device pointers with
their strides (nothing is copied), the work is enqueued on the current torch stream of the
input's device, and the call returns without synchronising. The extension is built without
torch headers, so pointers, sizes and the ``cudaStream_t`` handle cross as integers.
"""

from __future__ import annotations

import torch

from ..backends import load_extension
from ..rng import projection_scale
from . import DTYPE_CODES, KIND_CODES



def _ext():
    mod, err = load_extension("_cuda")
    if mod is None:
        raise RuntimeError(f"fastattr._cuda is not available: {err}")
    return mod


def _check_layers(layers) -> torch.device:
    # A pointer from another device or the host would fault inside the kernel and poison the
    # CUDA context, so device and dtype are checked here rather than trusted.
    device = layers[0].device
    if device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got a tensor on {device}")
    for i, x in enumerate(layers):
        if x.device != device:
            raise ValueError(f"layer {i} is on {x.device}, but layer 0 is on {device}")
        if x.dtype not in DTYPE_CODES:
            raise TypeError(f"layer {i} has dtype {x.dtype}; expected float32, bfloat16 or float16")
        if x.dim() != 2 or x.shape[0] != layers[0].shape[0]:
            raise ValueError(f"layer {i} must be [B, p_i] with B={layers[0].shape[0]}, "
                             f"got shape {tuple(x.shape)}")
    return device


def project(layers, offsets, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``[B, k]`` float32 projection of CUDA layers ``[B, p_l]`` (any strides)."""
    device = _check_layers(layers)
    batch = layers[0].shape[0]
    with torch.cuda.device_of(layers[0]):
        out = torch.empty(batch, k, dtype=torch.float32, device=device)
        specs = [
            (x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[1], x.stride(0), x.stride(1), off)
            for x, off in zip(layers, offsets)
        ]
        _ext().project(out.data_ptr(), batch, specs, k, KIND_CODES[kind], key[0], key[1],
                       stream, projection_scale(k), torch.cuda.current_stream(device).cuda_stream)
    return out


def materialize(rows: torch.Tensor, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """Rows of R as float32 ``[len(rows), k]`` on ``rows``' CUDA device."""
    if rows.device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got rows on {rows.device}")
    with torch.cuda.device_of(rows):
        rows = rows.to(torch.int64).contiguous()
        out = torch.empty(rows.numel(), k, dtype=torch.float32, device=rows.device)
        _ext().materialize(out.data_ptr(), rows.data_ptr(), rows.numel(), k, KIND_CODES[kind],
                           key[0], key[1], stream, projection_scale(k),
                           torch.cuda.current_stream(rows.device).cuda_stream)
    return out
