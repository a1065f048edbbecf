"""Launchers of the CUDA kernels in ``fastattr._cuda``: projection, the fused
per-sample-gradient ops (psg_project, psg_matmul) and the curvature ops (covariance,
ekfac_lambda).

Same signatures as ``fastattr.kernels.cpu`` (psg ops: as ``fastattr.reference.psg``, curvature
ops: as ``fastattr.reference.curvature``).
Tensors are passed as raw device pointers with their sizes and strides (nothing is copied),
the work is enqueued on the current torch stream of the input's device, and the call returns
without synchronising. The extension is built without torch headers, so pointers, sizes and
the ``cudaStream_t`` handle cross as integers.
"""

from __future__ import annotations

import torch

from ..backends import load_extension
from ..reference.curvature import covariance_shape
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


def _check_psg_inputs(a, g, seg_ptr, order, conv, extra=()):
    """Device of the psg call; raises where the kernel would read the wrong memory."""
    device = a.device
    if device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got a on {device}")
    for name, t in (("g", g), ("seg_ptr", seg_ptr), ("order", order), *extra):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, but a is on {device}")
    for name, t in (("a", a), ("g", g), *extra):
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (fastattr.psg makes it so)")
    want = 4 if conv else 3
    if a.dim() != want or g.dim() != want:
        raise ValueError(f"a and g must be {want}-D for a {'conv2d' if conv else 'linear'} layer, "
                         f"got {tuple(a.shape)} and {tuple(g.shape)}")
    if seg_ptr.dim() != 1 or seg_ptr.numel() < 1 or order.dim() != 1 or order.numel() != a.shape[0]:
        raise ValueError(f"segments must be seg_ptr [B + 1] and order [{a.shape[0]}], got "
                         f"{tuple(seg_ptr.shape)} and {tuple(order.shape)}")
    return device


def _weight_shape(a, g, conv) -> tuple:
    """(d_out, F) of the flattened weight gradient."""
    if conv:
        kh, kw, groups = conv[0], conv[1], conv[8]
        return g.shape[1], a.shape[1] // groups * kh * kw
    return g.shape[2], a.shape[2]


def _segments(seg_ptr, order):
    return seg_ptr.to(torch.int64).contiguous(), order.to(torch.int64).contiguous()


def psg_project(a, g, seg_ptr, order, conv: tuple, has_bias: bool, w_offset: int, b_offset: int,
                k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``[B, k]`` float32: per-sample gradients of one layer call times rows of R (see
    ``fastattr.reference.psg.psg_project``), G_b formed on chip and never stored."""
    device = _check_psg_inputs(a, g, seg_ptr, order, conv)
    conv = [int(v) for v in conv]
    with torch.cuda.device_of(a):
        seg_ptr, order = _segments(seg_ptr, order)
        batch = seg_ptr.numel() - 1
        out = torch.empty(batch, k, dtype=torch.float32, device=device)
        _ext().psg_project(out.data_ptr(), a.data_ptr(), DTYPE_CODES[a.dtype], list(a.shape),
                           g.data_ptr(), DTYPE_CODES[g.dtype], list(g.shape), conv,
                           seg_ptr.data_ptr(), order.data_ptr(), batch, bool(has_bias),
                           w_offset, b_offset, k, KIND_CODES[kind], key[0], key[1], stream,
                           projection_scale(k), torch.cuda.current_stream(device).cuda_stream)
    return out


def psg_matmul(a, g, seg_ptr, order, conv: tuple, q_weight, q_bias) -> torch.Tensor:
    """``[B, q]`` float32: ``<G_b, Q_j>`` (+ ``<bias_b, q_bias_j>``), G_b never stored."""
    extra = [("q_weight", q_weight)] + ([("q_bias", q_bias)] if q_bias is not None else [])
    device = _check_psg_inputs(a, g, seg_ptr, order, conv, extra)
    conv = [int(v) for v in conv]
    # the kernel reads Q as [q, d_out * F] and q_bias as [q, d_out]: a mismatch would read
    # out of bounds, so the sizes are checked here rather than trusted
    d_out, features = _weight_shape(a, g, conv)
    q = q_weight.shape[0] if q_weight.dim() else 0
    if q_weight.dim() < 2 or q_weight.numel() != q * d_out * features:
        raise ValueError(f"q_weight must hold [q, {d_out} * {features}] values, got "
                         f"{tuple(q_weight.shape)}")
    if q_bias is not None and tuple(q_bias.shape) != (q, d_out):
        raise ValueError(f"q_bias must be [{q}, {d_out}], got {tuple(q_bias.shape)}")
    with torch.cuda.device_of(a):
        seg_ptr, order = _segments(seg_ptr, order)
        batch = seg_ptr.numel() - 1
        out = torch.empty(batch, q, dtype=torch.float32, device=device)
        _ext().psg_matmul(out.data_ptr(), a.data_ptr(), DTYPE_CODES[a.dtype], list(a.shape),
                          g.data_ptr(), DTYPE_CODES[g.dtype], list(g.shape), conv,
                          seg_ptr.data_ptr(), order.data_ptr(), batch, q_weight.data_ptr(),
                          DTYPE_CODES[q_weight.dtype], q,
                          0 if q_bias is None else q_bias.data_ptr(),
                          DTYPE_CODES[q_bias.dtype] if q_bias is not None else 0,
                          torch.cuda.current_stream(device).cuda_stream)
    return out


def _check_curvature_input(name: str, t: torch.Tensor, device=None) -> torch.device:
    # the kernels read contiguous memory of the dtype given by its code: anything else would read
    # the wrong bytes (or another device's), so it is checked here rather than trusted
    if t.device.type != "cuda":
        raise ValueError(f"the cuda backend takes CUDA tensors, got {name} on {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the first input is on {device}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (fastattr.factor_ops makes it so)")
    return t.device


def covariance(x, conv: tuple, reduce: bool):
    """``(S [G, F, F], s [G, F])`` float32 (see ``fastattr.reference.curvature.covariance``);
    conv patches are gathered inside the kernel, S is exactly symmetric."""
    device = _check_curvature_input("x", x)
    conv = [int(v) for v in conv]
    if x.dim() != (4 if conv else 3):
        raise ValueError(f"x must be {'NCHW [N, C, H, W]' if conv else '[N, T, F]'}, got shape "
                         f"{tuple(x.shape)}")
    groups, features = covariance_shape(x, conv)
    with torch.cuda.device_of(x):
        S = torch.empty(groups, features, features, dtype=torch.float32, device=device)
        s = torch.empty(groups, features, dtype=torch.float32, device=device)
        _ext().covariance(S.data_ptr(), s.data_ptr(), x.data_ptr(), DTYPE_CODES[x.dtype],
                          list(x.shape), conv, bool(reduce),
                          torch.cuda.current_stream(device).cuda_stream)
    return S, s


def ekfac_lambda(a, g):
    """``[O, F]`` float32: ``sum_n (g_n^T a_n)^2`` for ``a [N, P, F]``, ``g [N, P, O]``, the
    per-datum products kept on chip (see ``fastattr.reference.curvature.ekfac_lambda``)."""
    device = _check_curvature_input("a", a)
    _check_curvature_input("g", g, device)
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a and g must be [N, P, F] and [N, P, O], got {tuple(a.shape)} and "
                         f"{tuple(g.shape)}")
    n, p, f = a.shape
    o = g.shape[2]
    with torch.cuda.device_of(a):
        out = torch.empty(o, f, dtype=torch.float32, device=device)
        _ext().ekfac_lambda(out.data_ptr(), a.data_ptr(), DTYPE_CODES[a.dtype], g.data_ptr(),
                            DTYPE_CODES[g.dtype], n, p, f, o,
                            torch.cuda.current_stream(device).cuda_stream)
    return out
