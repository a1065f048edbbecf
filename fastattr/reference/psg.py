"""Reference per-sample gradient ops: materialise every per-sample weight gradient ``G_b``.

The oracle for the fused kernels (and their fallback). A layer is described by its inputs
``a`` and output gradients ``g`` (see ``fastattr.psg`` for the layouts):

- linear: ``a [N, T, d_in]``, ``g [N, T, d_out]`` (T tokens per row);
- conv2d: ``a [N, C_in, H, W]``, ``g [N, C_out, H_out, W_out]`` with
  ``conv = (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)``.

Rows are grouped into segments (samples): the rows of segment ``b`` are
``order[seg_ptr[b] : seg_ptr[b + 1]]``, and ``G_b`` sums their gradients. The weight
gradient is flattened as the parameter is (``[d_out, F]`` with ``F = d_in`` or
``C_in/groups * kh * kw``), the bias gradient is ``sum_r g_r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import projection as ref_projection


def segment_ids(seg_ptr: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Segment id of every row ``r`` (``int64 [N]``), from the CSR grouping."""
    counts = seg_ptr[1:] - seg_ptr[:-1]
    ids_sorted = torch.repeat_interleave(torch.arange(counts.numel(), device=order.device),
                                         counts.to(order.device))
    ids = torch.empty_like(order)
    ids[order] = ids_sorted
    return ids


def per_row_grads(a: torch.Tensor, g: torch.Tensor, conv, has_bias: bool):
    """Per-row weight gradients ``[N, d_out, F]`` and bias gradients ``[N, d_out]`` (fp32)."""
    a = a.to(torch.float32)
    g = g.to(torch.float32)
    if not conv:
        weight = torch.einsum("nto,nti->noi", g, a)
        bias = g.sum(dim=1) if has_bias else None
        return weight, bias
    kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
    patches = F.unfold(a, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    n, c_out = g.shape[0], g.shape[1]
    positions = g.shape[2] * g.shape[3]
    if patches.shape[2] != positions:
        raise ValueError(
            f"g has {positions} output positions but the convolution of a gives "
            f"{patches.shape[2]}: a, g and conv do not describe one Conv2d"
        )
    patches = patches.reshape(n, groups, -1, positions)
    gg = g.reshape(n, groups, c_out // groups, positions)
    weight = torch.einsum("ngol,ngfl->ngof", gg, patches).reshape(n, c_out, -1)
    bias = g.sum(dim=(2, 3)) if has_bias else None
    return weight, bias


def per_sample_grads(a, g, seg_ptr, order, conv, has_bias: bool):
    """Per-sample (segment-summed) ``(weight [B, d_out, F], bias [B, d_out] | None)``, fp32."""
    weight, bias = per_row_grads(a, g, conv, has_bias)
    ids = segment_ids(seg_ptr, order)
    batch = seg_ptr.numel() - 1
    w_out = weight.new_zeros((batch, *weight.shape[1:])).index_add_(0, ids, weight)
    b_out = None if bias is None else bias.new_zeros((batch, bias.shape[1])).index_add_(0, ids, bias)
    return w_out, b_out


def psg_project(a, g, seg_ptr, order, conv, has_bias: bool, w_offset: int, b_offset: int,
                k: int, kind: str, key, stream: int) -> torch.Tensor:
    """``[B, k]`` float32: ``G_b`` (and the bias gradient) times rows of R at their offsets."""
    weight, bias = per_sample_grads(a, g, seg_ptr, order, conv, has_bias)
    layers, offsets = [weight.flatten(1)], [w_offset]
    if bias is not None:
        layers.append(bias)
        offsets.append(b_offset)
    return ref_projection.project(layers, offsets, k, kind, key, stream)


def psg_matmul(a, g, seg_ptr, order, conv, q_weight: torch.Tensor, q_bias) -> torch.Tensor:
    """``[B, q]`` float32: ``<G_b, Q_j>`` (plus ``<bias grad_b, q_bias_j>`` when given)."""
    weight, bias = per_sample_grads(a, g, seg_ptr, order, conv, q_bias is not None)
    out = weight.flatten(1) @ q_weight.to(torch.float32).flatten(1).T
    if q_bias is not None:
        out += bias @ q_bias.to(torch.float32).T
    return out
