"""Triton kernels of the fused per-sample-gradient ops ``psg_project`` and ``psg_matmul``.

For sample b, ``G_b[o, f] = sum_{r in b, s} g[r, o, s] A[r, f, s]`` (s: tokens of a linear
layer, output pixels of a conv; ``A`` the inputs or, for a conv, the input patches). The ops
multiply the flattened ``G_b`` into a right-hand matrix with ``d_out * F`` rows: the Philox
projection matrix ``R`` at the layer's offset (generated in registers with the helpers of
``projection.py``) or the loaded query matrices ``Q [q, d_out, F]``. ``G_b`` is never written
to global memory:

- a program owns ``BLOCK_B`` segments (samples) and ``BLOCK_K`` output columns; it walks a
  range of ``[BLOCK_O, BLOCK_F]`` tiles of the flat weight index (o, f);
- per tile it forms the ``G`` tiles of its segments with one batched ``tl.dot``
  ``[BLOCK_B, BLOCK_O, BLOCK_M] @ [BLOCK_B, BLOCK_M, BLOCK_F]`` per ``BLOCK_M`` step over the
  segments' (row, position) pairs; conv patches are gathered from NCHW ``a`` with masks for
  padding (no unfold);
- it flattens them to ``[BLOCK_B, BLOCK_O * BLOCK_F]`` and multiplies into the matching
  ``[BLOCK_O * BLOCK_F, BLOCK_K]`` right-hand tile with a second ``tl.dot``, fp32 accumulate.

The bias gradient ``sum_s g[r, o, s]`` is the column ``f = F`` of ``G`` with ``A = 1`` there,
so it rides in the same tiles; its right-hand row is ``R[b_offset + o]`` / ``q_bias[:, o]``.

A conv with groups: an o tile never crosses a group, so one gathered ``A`` tile (the input
channels of that group) serves the whole tile.

Programs along the flat (o, f) tile index (splits) write into a partial buffer that
``projection._sum_splits_kernel`` reduces in a fixed order: no float atomics, deterministic.

Cost note: each output-column tile re-forms the ``G`` tiles (``k / BLOCK_K`` times). That is
the price of keeping ``G`` out of global memory; ``BLOCK_K`` is as wide as registers allow.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...rng import projection_scale
from .. import KIND_CODES
from .projection import (_block_k, _check_common, _interpreting, _matrix_tile,
                         _sum_splits_kernel)

__all__ = ["psg_project", "psg_matmul"]


@triton.jit
def _psg_kernel(
    a_ptr, g_ptr, seg_ptr, order_ptr, q_ptr, qb_ptr, out_ptr,
    B, K, S, F, OPG, CPG, D_OUT, stride_a_row, stride_g_row,
    H, W, W_OUT, KH, KW, SH, SW, PH, PW, DH, DW,
    n_o_tiles, n_f_tiles, n_tiles, tiles_per_split,
    w_offset, b_offset, k0, k1, stream, scale,
    stride_ob, stride_ok, stride_os,
    IS_CONV: tl.constexpr, HAS_BIAS: tl.constexpr, RHS_LOADED: tl.constexpr,
    KIND: tl.constexpr, LOW_DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[(split,) b, j] = scale * sum_{(o, f) in split's tiles} G_b[o, f] RHS[(o, f), j].

    Grid (segment tiles, column tiles, splits). ``S`` positions per row (tokens / output
    pixels), ``F`` weight columns, ``OPG`` / ``CPG`` output / input channels per group
    (``OPG = D_OUT`` for a linear layer). ``n_o_tiles`` o tiles per group. RHS is
    ``R[w_offset + o F + f]`` (``R[b_offset + o]`` for the bias column) or, with
    ``RHS_LOADED``, ``q[j, o, f]`` (``qb[j, o]``).
    """
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    w_offset = tl.to_tensor(w_offset).to(tl.int64)
    b_offset = tl.to_tensor(b_offset).to(tl.int64)
    k0 = tl.to_tensor(k0).to(tl.uint32)
    k1 = tl.to_tensor(k1).to(tl.uint32)
    stream = tl.to_tensor(stream).to(tl.uint32)
    S = tl.to_tensor(S).to(tl.int64)
    F = tl.to_tensor(F).to(tl.int64)

    # The segments of this program and their row ranges in ``order``.
    segs = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    seg_ok = segs < B
    start = tl.load(seg_ptr + segs, mask=seg_ok, other=0)
    count = tl.load(seg_ptr + segs + 1, mask=seg_ok, other=0) - start
    # Reduction length of G: (row, position) pairs of the longest segment of the group.
    m_len = tl.max(count, axis=0) * S
    m_end = count * S  # [BLOCK_B]

    col0 = pid_k * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K

    # The flat index q of a G tile as the second dot sees it: q = oi * BLOCK_F + fi.
    BLOCK_OF: tl.constexpr = BLOCK_O * BLOCK_F
    q_oi = tl.arange(0, BLOCK_OF) // BLOCK_F
    q_fi = tl.arange(0, BLOCK_OF) % BLOCK_F

    acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    t_start = pid_s * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, n_tiles)
    for t in range(t_start, t_stop):
        o_tile = t // n_f_tiles
        grp = o_tile // n_o_tiles
        o_loc0 = (o_tile % n_o_tiles) * BLOCK_O
        f0 = (t % n_f_tiles) * BLOCK_F

        o_loc = o_loc0 + tl.arange(0, BLOCK_O)
        o_ok = o_loc < OPG
        o = grp.to(tl.int64) * OPG + o_loc  # global output channel
        f = f0 + tl.arange(0, BLOCK_F).to(tl.int64)
        f_w = f < F  # weight columns
        f_b = f == F  # the bias column (A = 1; read only when HAS_BIAS)
        if IS_CONV:
            # f = c_local * KH * KW + ky * KW + kx; c is the input channel of o's group
            c = grp.to(tl.int64) * CPG + f // (KH * KW)
            ky = (f // KW) % KH
            kx = f % KW

        # ---- G tiles of the BLOCK_B segments: sum over (row, position) pairs m ----
        gacc = tl.zeros([BLOCK_B, BLOCK_O, BLOCK_F], tl.float32)
        for m0 in range(0, m_len, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            m_ok = m[None, :] < m_end[:, None]  # [BLOCK_B, BLOCK_M]
            s = m % S
            row = tl.load(order_ptr + start[:, None] + m[None, :] // S, mask=m_ok, other=0)
            row_g = row * stride_g_row
            row_a = row * stride_a_row
            if IS_CONV:
                g_off = row_g[:, None, :] + o[None, :, None] * S + s[None, None, :]
            else:
                g_off = row_g[:, None, :] + s[None, None, :] * D_OUT + o[None, :, None]
            gt = tl.load(g_ptr + g_off, mask=m_ok[:, None, :] & o_ok[None, :, None], other=0.0)

            if IS_CONV:
                iy = (s // W_OUT)[:, None] * SH - PH + ky[None, :] * DH  # [BLOCK_M, BLOCK_F]
                ix = (s % W_OUT)[:, None] * SW - PW + kx[None, :] * DW
                in_ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W) & f_w[None, :]
                a_off = row_a[:, :, None] + (c[None, :] * H * W + iy * W + ix)[None, :, :]
            else:
                in_ok = (s[:, None] >= 0) & f_w[None, :]
                a_off = row_a[:, :, None] + (s[:, None] * F + f[None, :])[None, :, :]
            at = tl.load(a_ptr + a_off, mask=m_ok[:, :, None] & in_ok[None, :, :], other=0.0)
            at = at.to(tl.float32)
            if HAS_BIAS:
                at = tl.where(f_b[None, None, :] & m_ok[:, :, None], 1.0, at)
            if LOW_DOT:
                # bf16/fp16 products are exact in fp32: tensor cores, fp32 accumulation
                gacc = tl.dot(gt, at.to(gt.dtype), gacc)
            else:
                gacc = tl.dot(gt.to(tl.float32), at, gacc, input_precision="ieee")

        # ---- multiply the flattened G tiles into the right-hand tile ----
        qo = o_loc0 + q_oi
        qf = f0 + q_fi.to(tl.int64)
        qo_glob = grp.to(tl.int64) * OPG + qo
        q_w = (qo < OPG) & (qf < F)
        q_b = (qo < OPG) & (qf == F)  # zero G there unless HAS_BIAS
        if RHS_LOADED:
            rhs = tl.load(q_ptr + offs_k.to(tl.int64)[None, :] * (D_OUT * F)
                          + (qo_glob * F + qf)[:, None],
                          mask=q_w[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if HAS_BIAS:
                rb = tl.load(qb_ptr + offs_k.to(tl.int64)[None, :] * D_OUT + qo_glob[:, None],
                             mask=q_b[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                rhs = tl.where(q_b[:, None], rb, rhs)
        else:
            rows = tl.where(q_b, b_offset + qo_glob, w_offset + qo_glob * F + qf)
            rows = tl.where(q_w | q_b, rows, 0)  # G is 0 there; keep the counter in range
            rhs = _matrix_tile(rows, col0, k0, k1, stream, KIND, BLOCK_OF, BLOCK_K)
        g_flat = tl.reshape(gacc, [BLOCK_B, BLOCK_OF])
        acc = tl.dot(g_flat, rhs, acc, input_precision="ieee")
    acc = acc * scale

    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os
                + segs[:, None] * stride_ob + offs_k[None, :] * stride_ok)
    tl.store(out_ptrs, acc, mask=seg_ok[:, None] & k_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _config(a: torch.Tensor, g: torch.Tensor, k: int, kind: str | None) -> dict:
    """Tile sizes (fixed, no autotuning; not yet timed on hardware).

    16 is tl.dot's smallest M/N/K, so BLOCK_B = BLOCK_O = BLOCK_F = BLOCK_M = 16 and the
    second dot reduces over BLOCK_O * BLOCK_F = 256. bf16/fp16 ``a`` and ``g`` of one dtype
    form G on tensor cores (exact products, fp32 accumulation); fp32 takes the "ieee" dot.
    Registers (ptxas for sm_90, 8 warps): Rademacher tiles of 64 columns fit without spills;
    Gaussian generation and loaded Q tiles take 32 columns (fp32 inputs still spill a little
    there: 32-200 bytes of stack; bf16 none).
    """
    # The interpreter stores bf16 as uint16 and cannot take a bf16 dot; fp16 works there.
    low = a.dtype == g.dtype and (a.dtype == torch.float16
                                  or (a.dtype == torch.bfloat16 and not _interpreting()))
    most = 64 if kind == "rademacher" else 32
    return dict(LOW_DOT=low, BLOCK_B=16, BLOCK_M=16, BLOCK_O=16, BLOCK_F=16,
                BLOCK_K=_block_k(k, most), num_warps=8)


def _num_splits(out_tiles: int, n_tiles: int, device: torch.device) -> int:
    """Programs per output tile along the (o, f) tiles so that a launch fills the GPU."""
    if device.type != "cuda" or _interpreting():
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, out_tiles)
    return max(1, min(wanted, triton.cdiv(n_tiles, 2)))  # at least 2 tiles per split


def _geometry(a: torch.Tensor, g: torch.Tensor, conv: tuple) -> dict:
    """Kernel size arguments of a linear (``conv == ()``) or conv2d layer."""
    if conv:
        kh, kw, sh, sw, ph, pw, dh, dw, groups = (int(v) for v in conv)
        c_in, h, w = a.shape[1], a.shape[2], a.shape[3]
        d_out, h_out, w_out = g.shape[1], g.shape[2], g.shape[3]
        return dict(S=h_out * w_out, F=c_in // groups * kh * kw, OPG=d_out // groups,
                    CPG=c_in // groups, D_OUT=d_out, H=h, W=w, W_OUT=w_out, KH=kh, KW=kw,
                    SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw, groups=groups)
    d_out = g.shape[2]
    return dict(S=a.shape[1], F=a.shape[2], OPG=d_out, CPG=a.shape[2], D_OUT=d_out, H=1, W=1,
                W_OUT=1, KH=1, KW=1, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, groups=1)


def _launch(a, g, seg_ptr, order, conv, has_bias: bool, k: int, q, qb, w_offset: int,
            b_offset: int, kind: str | None, key, stream: int, scale: float,
            splits: int | None) -> torch.Tensor:
    """Shared launcher: ``[B, k]`` float32 for R of ``kind`` (q is None) or loaded q, qb."""
    batch = seg_ptr.numel() - 1
    device = a.device
    out = torch.empty(batch, k, dtype=torch.float32, device=device)
    if batch == 0 or k == 0:
        return out
    geo = _geometry(a, g, conv)
    groups = geo.pop("groups")
    cfg = _config(a, g, k, kind)
    n_o_tiles = triton.cdiv(geo["OPG"], cfg["BLOCK_O"])
    n_f_tiles = triton.cdiv(geo["F"] + int(has_bias), cfg["BLOCK_F"])
    n_tiles = groups * n_o_tiles * n_f_tiles
    if n_tiles == 0 or a.shape[0] == 0:
        return out.zero_()
    b_tiles = triton.cdiv(batch, cfg["BLOCK_B"])
    k_tiles = triton.cdiv(k, cfg["BLOCK_K"])
    n_split = splits if splits is not None else _num_splits(b_tiles * k_tiles, n_tiles, device)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(int(n_split), n_tiles)))
    n_split = triton.cdiv(n_tiles, tiles_per_split)  # no split without tiles
    dst = out if n_split == 1 else torch.empty(n_split, batch, k, dtype=torch.float32,
                                               device=device)
    stride_os = 0 if n_split == 1 else dst.stride(0)
    rhs_loaded = q is not None
    q_arg = q if rhs_loaded else out  # an unused pointer argument still needs a tensor
    qb_arg = qb if qb is not None else q_arg
    _psg_kernel[(b_tiles, k_tiles, n_split)](
        a, g, seg_ptr, order, q_arg, qb_arg, dst,
        batch, k, geo["S"], geo["F"], geo["OPG"], geo["CPG"], geo["D_OUT"],
        a.stride(0), g.stride(0), geo["H"], geo["W"], geo["W_OUT"], geo["KH"], geo["KW"],
        geo["SH"], geo["SW"], geo["PH"], geo["PW"], geo["DH"], geo["DW"],
        n_o_tiles, n_f_tiles, n_tiles, tiles_per_split,
        w_offset, b_offset, int(key[0]), int(key[1]), int(stream), scale,
        dst.stride(-2), dst.stride(-1), stride_os,
        IS_CONV=bool(conv), HAS_BIAS=has_bias, RHS_LOADED=rhs_loaded,
        KIND=KIND_CODES[kind] if kind is not None else 0,
        # fp fusion on, as in projection.py (nvcc's default for the CUDA kernels)
        enable_fp_fusion=True, **cfg)
    if n_split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(batch * k, block),)](
            dst, out, batch * k, n_split, dst.stride(0), ACCUMULATE=False, BLOCK=block)
    return out


def _check_rows(a, seg_ptr, order) -> None:
    if seg_ptr.dtype != torch.int64 or order.dtype != torch.int64:
        raise TypeError("seg_ptr and order must be int64 tensors")
    if seg_ptr.device != a.device or order.device != a.device:
        raise ValueError(f"seg_ptr and order must be on the data's device {a.device}")


def psg_project(a, g, seg_ptr, order, conv: tuple, has_bias: bool, w_offset: int,
                b_offset: int, k: int, kind: str, key, stream: int, *,
                splits: int | None = None) -> torch.Tensor:
    """``[B, k]`` float32: flat ``G_b`` (and bias gradient) times R at their offsets.

    Arguments as ``fastattr.reference.psg.psg_project`` (contiguous ``a``, ``g``);
    ``splits`` forces the programs per output tile along the (o, f) tiles (default: enough
    to fill the GPU; 1 on CPU and in the interpreter).
    """
    _check_common(k, kind, key, stream)
    _check_rows(a, seg_ptr, order)
    a, g = a.contiguous(), g.contiguous()
    seg_ptr, order = seg_ptr.contiguous(), order.contiguous()
    w_offset, b_offset = int(w_offset), int(b_offset)
    d_out = g.shape[1 if conv else 2]
    p = d_out * _geometry(a, g, conv)["F"]
    if w_offset < 0 or w_offset + p > 2**63 or (has_bias and not 0 <= b_offset <= 2**63 - d_out):
        raise ValueError("the weight / bias rows of R must lie in [0, 2**63)")
    return _launch(a, g, seg_ptr, order, tuple(conv), bool(has_bias), k, None, None, w_offset,
                   b_offset if has_bias else 0, kind, key, stream,
                   projection_scale(k), splits)


def psg_matmul(a, g, seg_ptr, order, conv: tuple, q_weight: torch.Tensor, q_bias, *,
               splits: int | None = None) -> torch.Tensor:
    """``[B, q]`` float32: ``<G_b, Q_j>`` (+ ``<bias grad_b, q_bias_j>``) for every b, j.

    Arguments as ``fastattr.reference.psg.psg_matmul``; ``splits`` as in ``psg_project``.
    """
    _check_rows(a, seg_ptr, order)
    a, g = a.contiguous(), g.contiguous()
    seg_ptr, order = seg_ptr.contiguous(), order.contiguous()
    q_weight = q_weight.contiguous()
    q_bias = None if q_bias is None else q_bias.contiguous()
    return _launch(a, g, seg_ptr, order, tuple(conv), q_bias is not None, q_weight.shape[0],
                   q_weight, q_bias, 0, 0, None, (0, 0), 0, 1.0, splits)
