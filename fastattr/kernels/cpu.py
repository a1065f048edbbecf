"""Launchers of the C++/OpenMP kernels in ``fastattr._C``: projection, fused per-sample
gradients and curvature accumulation.

Tensors are passed as raw pointers with their shapes / strides; nothing is copied unless a
layout or dtype needs converting (float64 is converted by the caller). The extension checks
shapes and segments again before it releases the GIL, so a bad call raises, never crashes.
"""

from __future__ import annotations

import torch

from ..backends import load_extension
from ..reference.curvature import covariance_shape
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


def _psg_layer_args(a, g, seg_ptr, order, conv) -> tuple:
    """The layer and segment arguments of ``_C.psg_project`` / ``_C.psg_matmul``, and the
    (possibly converted) tensors they point into: the caller holds those until the call ends.
    """
    for name, t in (("a", a), ("g", g), ("seg_ptr", seg_ptr), ("order", order)):
        if t.device.type != "cpu":
            raise ValueError(f"the cpu psg kernels take CPU tensors, got {name} on {t.device}")
    a, g = a.contiguous(), g.contiguous()
    seg_ptr = seg_ptr.to(torch.int64).contiguous()
    order = order.to(torch.int64).contiguous()
    args = (a.data_ptr(), DTYPE_CODES[a.dtype], list(a.shape), g.data_ptr(), DTYPE_CODES[g.dtype],
            list(g.shape), [int(v) for v in conv], seg_ptr.data_ptr(), order.data_ptr(),
            seg_ptr.numel() - 1)
    return args, (a, g, seg_ptr, order)


def psg_project(a, g, seg_ptr, order, conv: tuple, has_bias: bool, w_offset: int, b_offset: int,
                k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``[B, k]`` float32: per-sample gradients of one layer call times R, fused (see
    ``fastattr.reference.psg.psg_project``)."""
    args, _tensors = _psg_layer_args(a, g, seg_ptr, order, conv)
    out = torch.empty(args[-1], k, dtype=torch.float32)
    _ext().psg_project(out.data_ptr(), *args, bool(has_bias), int(w_offset), int(b_offset), k,
                       KIND_CODES[kind], key[0], key[1], stream, projection_scale(k),
                       torch.get_num_threads())
    return out


def psg_matmul(a, g, seg_ptr, order, conv: tuple, q_weight, q_bias) -> torch.Tensor:
    """``[B, q]`` float32: ``<G_b, Q_j>`` (+ ``<bias_b, q_bias_j>``), fused (see
    ``fastattr.reference.psg.psg_matmul``)."""
    args, _tensors = _psg_layer_args(a, g, seg_ptr, order, conv)
    q = q_weight.shape[0]
    q_weight = q_weight.contiguous()
    d_out = g.shape[1] if conv else g.shape[2]
    features = (a.shape[1] // conv[8] * conv[0] * conv[1]) if conv else a.shape[2]
    if q_weight.numel() != q * d_out * features:
        raise ValueError(f"q_weight has {q_weight.numel()} entries, expected q * d_out * F = "
                         f"{q} * {d_out} * {features}")
    if q_bias is not None:
        q_bias = q_bias.contiguous()
        if tuple(q_bias.shape) != (q, d_out):
            raise ValueError(f"q_bias must be [{q}, {d_out}], got {tuple(q_bias.shape)}")
    out = torch.empty(args[-1], q, dtype=torch.float32)
    _ext().psg_matmul(out.data_ptr(), *args, q_weight.data_ptr(), DTYPE_CODES[q_weight.dtype], q,
                      0 if q_bias is None else q_bias.data_ptr(),
                      DTYPE_CODES[torch.float32 if q_bias is None else q_bias.dtype],
                      torch.get_num_threads())
    return out


def covariance(x, conv: tuple, reduce: bool):
    """``(S [G, F, F], s [G, F])`` float32 of the rows of ``x`` (see
    ``fastattr.reference.curvature.covariance``); conv patches are formed in the kernel."""
    if x.device.type != "cpu":
        raise ValueError(f"the cpu covariance kernel takes a CPU tensor, got x on {x.device}")
    x = x.contiguous()
    conv = [int(v) for v in conv]
    groups, features = covariance_shape(x, conv)
    S = torch.empty(groups, features, features, dtype=torch.float32)
    s = torch.empty(groups, features, dtype=torch.float32)
    _ext().covariance(S.data_ptr(), s.data_ptr(), 0, 0, x.data_ptr(), DTYPE_CODES[x.dtype],
                      list(x.shape), conv, bool(reduce), torch.get_num_threads())
    return S, s


def covariance_add(x, conv: tuple, reduce: bool, packed, sums) -> None:
    """``packed += pack_upper(S)``, ``sums += s`` in float64 for ``covariance(x, conv,
    reduce)``'s float32 ``(S, s)``, without writing S or its packed copy out: the kernel adds
    its finished upper triangle straight into the running sums (contiguous float64 CPU
    tensors of the right shapes: checked by ``fastattr.factor_ops.covariance_add``)."""
    if x.device.type != "cpu":
        raise ValueError(f"the cpu covariance kernel takes a CPU tensor, got x on {x.device}")
    x = x.contiguous()
    conv = [int(v) for v in conv]
    _ext().covariance(0, 0, packed.data_ptr(), sums.data_ptr(), x.data_ptr(),
                      DTYPE_CODES[x.dtype], list(x.shape), conv, bool(reduce),
                      torch.get_num_threads())


def ekfac_lambda(a, g):
    """``[O, F]`` float32: ``sum_n (g_n^T a_n)^2`` for ``a [N, P, F]``, ``g [N, P, O]``, each
    datum's product formed tile by tile in cache (see ``fastattr.reference.curvature``)."""
    for name, t in (("a", a), ("g", g)):
        if t.device.type != "cpu":
            raise ValueError(f"the cpu ekfac_lambda kernel takes CPU tensors, got {name} on "
                             f"{t.device}")
    a, g = a.contiguous(), g.contiguous()
    out = torch.empty(g.shape[2], a.shape[2], dtype=torch.float32)
    _ext().ekfac_lambda(out.data_ptr(), a.data_ptr(), DTYPE_CODES[a.dtype], list(a.shape),
                        g.data_ptr(), DTYPE_CODES[g.dtype], list(g.shape),
                        torch.get_num_threads())
    return out
