"""Triton kernels of the curvature ops ``covariance`` and ``ekfac_lambda``.

Definitions and layouts: ``fastattr.reference.curvature`` (the oracle these are tested against).

``covariance(x, conv, reduce) -> (S [G, F, F], s [G, F])``, ``S[g] = sum_v v vᵀ``, ``s = sum_v v``
over the rows ``v`` (token vectors of a linear layer, patch vectors of a conv per channel
group; with ``reduce`` one row per datum, the sum of its tokens / positions):

- a program owns one ``[BLOCK_F, BLOCK_F]`` tile ``(i, j)`` of one group's ``S`` with
  ``j >= i``; programs of lower tiles return at once (S is symmetric, half the work);
- it walks its rows ``BLOCK_R`` at a time, gathers the two panels ``V[rows, i-block]`` and
  ``V[rows, j-block]`` straight from ``x`` -- conv patches from the NCHW tensor with computed
  (channel, ky, kx) -> (iy, ix) indices and masked loads for the zero padding, never
  ``F.unfold`` -- and accumulates ``V_iᵀ V_j`` with ``tl.dot`` in fp32; with ``reduce`` a
  panel is first summed over the datum's positions ``BLOCK_Q`` at a time;
- it stores the tile and its mirror ``S[j, i] = S[i, j]ᵀ`` (a diagonal tile takes its upper
  half for both), so S is exactly symmetric; diagonal programs also store the column sums.

``ekfac_lambda(a, g) -> L [O, F]``, ``L = sum_n (g_nᵀ a_n)²``: a program owns an ``[BLOCK_O,
BLOCK_F]`` tile of L and walks the data; per datum it forms that tile of ``g_nᵀ a_n`` over
``BLOCK_P`` position chunks with ``tl.dot``, squares it and adds it to its running tile. The
``[N, O, F]`` per-datum products never leave registers.

Both ops may split their reduction (rows, data) over programs when too few output tiles
would leave the GPU idle: the splits write a partial buffer that
``projection._sum_splits_kernel`` sums in a fixed order. No float atomics: the result is
the same bits on every call for a given configuration.

Precision: products of fp32 inputs take the "ieee" dot (TF32 would keep 10 mantissa bits);
bf16 / fp16 inputs of one dtype take the tensor-core dot in their own dtype, whose products
are exact in fp32 and whose accumulation is fp32. Reduced (summed) panels are fp32 and so
take the ieee dot too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...psg import conv_output_size
from .projection import _interpreting, _sum_splits_kernel

__all__ = ["covariance", "ekfac_lambda"]


@triton.jit
def _feature_parts(f, grp, CPG, H, W, KH, KW, DH, DW, IS_CONV: tl.constexpr):
    """int32 ``(offset, ky * DH, kx * DW)`` of features ``f`` of channel group ``grp``.

    Conv features are (c_local, ky, kx) flattened as the conv weight; the offset is that of
    channel c in a datum. Linear features are columns: offset f. Split from the positions
    so that the divisions run once per feature, not once per (row, feature) element.
    """
    if IS_CONV:
        return ((grp * CPG + f // (KH * KW)) * (H * W), ((f // KW) % KH) * DH,
                (f % KW) * DW)
    none = tl.zeros_like(f)  # unused by a linear gather (the compiler drops it)
    return f, none, none


@triton.jit
def _position_parts(pos, F, W_OUT, SH, SW, PH, PW, IS_CONV: tl.constexpr):
    """int32 ``(offset, top row, left column)`` of positions ``pos`` inside a datum: output
    pixel ``pos`` reads input rows ``top + ky * DH`` (conv), token ``pos`` is at ``pos * F``."""
    if IS_CONV:
        return tl.zeros_like(pos), (pos // W_OUT) * SH - PH, (pos % W_OUT) * SW - PW
    none = tl.zeros_like(pos)  # unused by a linear gather
    return pos * F, none, none


@triton.jit
def _gather(x_ptr, row_off, top, left, f_off, ky, kx, ok, H, W, IS_CONV: tl.constexpr):
    """x entries at datum offsets ``row_off`` (int64) + position / feature parts (int32, all
    broadcast to one shape) in the input dtype; 0 where not ``ok`` and in conv padding."""
    if IS_CONV:
        iy = top + ky
        ix = left + kx
        ok = ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        return tl.load(x_ptr + row_off + (f_off + iy * W + ix), mask=ok, other=0.0)
    return tl.load(x_ptr + row_off + f_off, mask=ok, other=0.0)


@triton.jit
def _covariance_kernel(
    x_ptr, s_ptr, sum_ptr, ROWS, S, F, CPG, stride_n, H, W, W_OUT,
    KH, KW, SH, SW, PH, PW, DH, DW, n_f_tiles, rows_per_split,
    stride_sg, stride_ss, stride_vg, stride_vs,
    IS_CONV: tl.constexpr, REDUCE: tl.constexpr, LOW_DOT: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Tile (i, j >= i) of ``S[grp]`` (+ its mirror) and, on diagonal tiles, ``s[grp]``, over
    the rows of split ``split``; written at ``split * stride_ss`` / ``split * stride_vs``.

    Grid (n_f_tiles ** 2, G, splits). ``ROWS`` rows: data (``REDUCE``, each the sum of its
    ``S`` positions) or (datum, position) pairs ``r = n * S + pos``. A datum spans fewer
    than 2**31 elements (``stride_n``), so offsets inside one are int32.
    """
    tile = tl.program_id(0)
    bi = tile // n_f_tiles
    bj = tile % n_f_tiles
    if bj < bi:
        return  # the mirror of tile (j, i), which its own program writes
    grp = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)

    fi = bi * BLOCK_F + tl.arange(0, BLOCK_F)
    fj = bj * BLOCK_F + tl.arange(0, BLOCK_F)
    fi_ok = fi < F
    fj_ok = fj < F
    fi_off, fi_ky, fi_kx = _feature_parts(fi, grp, CPG, H, W, KH, KW, DH, DW, IS_CONV)
    fj_off, fj_ky, fj_kx = _feature_parts(fj, grp, CPG, H, W, KH, KW, DH, DW, IS_CONV)
    r_start = split * rows_per_split
    r_stop = tl.minimum(r_start + rows_per_split, ROWS)

    acc = tl.zeros([BLOCK_F, BLOCK_F], tl.float32)
    colsum = tl.zeros([BLOCK_F], tl.float32)
    for r0 in range(r_start, r_stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = r < r_stop
        if REDUCE:
            # Rows are data: sum their positions. V_i is gathered as [F, Q, R] so that the
            # sum over Q leaves the transposed panel the dot wants, V_j as [R, Q, F].
            n_off = r * stride_n
            vi = tl.zeros([BLOCK_F, BLOCK_R], tl.float32)
            vj = tl.zeros([BLOCK_R, BLOCK_F], tl.float32)
            for q0 in range(0, S, BLOCK_Q):
                q = q0 + tl.arange(0, BLOCK_Q)
                q_ok = q < S
                q_off, top, left = _position_parts(q, F, W_OUT, SH, SW, PH, PW, IS_CONV)
                ti = _gather(x_ptr, n_off[None, None, :] + q_off[None, :, None],
                             top[None, :, None], left[None, :, None], fi_off[:, None, None],
                             fi_ky[:, None, None], fi_kx[:, None, None],
                             fi_ok[:, None, None] & q_ok[None, :, None] & r_ok[None, None, :],
                             H, W, IS_CONV)
                tj = _gather(x_ptr, n_off[:, None, None] + q_off[None, :, None],
                             top[None, :, None], left[None, :, None], fj_off[None, None, :],
                             fj_ky[None, None, :], fj_kx[None, None, :],
                             r_ok[:, None, None] & q_ok[None, :, None] & fj_ok[None, None, :],
                             H, W, IS_CONV)
                vi += tl.sum(ti.to(tl.float32), axis=1)
                vj += tl.sum(tj.to(tl.float32), axis=1)
            acc = tl.dot(vi, vj, acc, input_precision="ieee")
        else:
            n = r // S
            pos = (r - n * S).to(tl.int32)
            p_off, top, left = _position_parts(pos, F, W_OUT, SH, SW, PH, PW, IS_CONV)
            row_off = n * stride_n + p_off
            vi = _gather(x_ptr, row_off[None, :], top[None, :], left[None, :], fi_off[:, None],
                         fi_ky[:, None], fi_kx[:, None], r_ok[None, :] & fi_ok[:, None],
                         H, W, IS_CONV)  # [F, R]
            vj = _gather(x_ptr, row_off[:, None], top[:, None], left[:, None], fj_off[None, :],
                         fj_ky[None, :], fj_kx[None, :], r_ok[:, None] & fj_ok[None, :],
                         H, W, IS_CONV)  # [R, F]
            if LOW_DOT:
                acc = tl.dot(vi, vj, acc)  # exact bf16/fp16 products, fp32 accumulation
            else:
                acc = tl.dot(vi.to(tl.float32), vj.to(tl.float32), acc, input_precision="ieee")
        colsum += tl.sum(vj.to(tl.float32), axis=0)

    # Entries on or above the diagonal go to both S[a, b] and S[b, a]: off-diagonal tiles
    # write all of theirs twice, diagonal ones their upper half, so S is symmetric to the
    # bit even where the dot summed S[a, b] and S[b, a] in different orders.
    # 64-bit tile corners, 32-bit offsets inside a tile (fewer registers for the addresses)
    s_base = s_ptr + grp.to(tl.int64) * stride_sg + split * stride_ss
    i0 = (bi * BLOCK_F).to(tl.int64)
    j0 = (bj * BLOCK_F).to(tl.int64)
    a = tl.arange(0, BLOCK_F)
    mask = fi_ok[:, None] & fj_ok[None, :] & (fi[:, None] <= fj[None, :])
    tl.store(s_base + (i0 * F + j0) + (a[:, None] * F + a[None, :]), acc, mask=mask)
    tl.store(s_base + (j0 * F + i0) + (a[None, :] * F + a[:, None]), acc, mask=mask)
    # fi == fj exactly on diagonal tiles (written elementwise: the interpreter rejects a
    # mask broadcast from a scalar comparison)
    tl.store(sum_ptr + grp.to(tl.int64) * stride_vg + split * stride_vs + fj, colsum,
             mask=fj_ok & (fi == fj))


@triton.jit
def _ekfac_lambda_kernel(
    a_ptr, g_ptr, out_ptr, N, P, F, O, data_per_split, stride_os,
    LOW_DOT: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[(split,) o, f] = sum_{n in split's data} (sum_p g[n, p, o] a[n, p, f])².

    Grid (o tiles, f tiles, splits); split s covers data [s * data_per_split, ...).
    """
    pid_o = tl.program_id(0)
    pid_f = tl.program_id(1)
    split = tl.program_id(2).to(tl.int64)
    P = tl.to_tensor(P).to(tl.int64)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F).to(tl.int64)
    o_ok = o < O
    f_ok = f < F

    n_start = split * data_per_split
    n_stop = tl.minimum(n_start + data_per_split, N)
    lam = tl.zeros([BLOCK_O, BLOCK_F], tl.float32)
    for n in range(n_start, n_stop):
        a_n = a_ptr + n * P * F
        g_n = g_ptr + n * P * O
        prod = tl.zeros([BLOCK_O, BLOCK_F], tl.float32)  # the (o, f) tile of g_nᵀ a_n
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
            p_ok = p < P
            gt = tl.load(g_n + p[None, :] * O + o[:, None], mask=p_ok[None, :] & o_ok[:, None],
                         other=0.0)  # [O, P]
            at = tl.load(a_n + p[:, None] * F + f[None, :], mask=p_ok[:, None] & f_ok[None, :],
                         other=0.0)  # [P, F]
            if LOW_DOT:
                prod = tl.dot(gt, at, prod)  # exact bf16/fp16 products, fp32 accumulation
            else:
                prod = tl.dot(gt.to(tl.float32), at.to(tl.float32), prod, input_precision="ieee")
        lam += prod * prod
    out_ptrs = out_ptr + split * stride_os + o[:, None] * F + f[None, :]
    tl.store(out_ptrs, lam, mask=o_ok[:, None] & f_ok[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

# Each split walks at least this many BLOCK_R row chunks / data: fewer would spend more on
# the partial buffer than the extra programs gain.
_SPLIT_MIN_STEPS = 8


def _low_dot(*dtypes: torch.dtype) -> bool:
    """Dot in the inputs' own dtype: bf16 / fp16 of one dtype (exact products, fp32 sums).

    The interpreter stores bf16 as uint16 and cannot take a bf16 dot; fp16 works there.
    """
    first = dtypes[0]
    return all(d == first for d in dtypes) and (
        first == torch.float16 or (first == torch.bfloat16 and not _interpreting()))


def _block(size: int, most: int) -> int:
    """A power of two >= 16 (tl.dot's smallest dimension), at most ``most``, near ``size``."""
    return min(most, max(16, triton.next_power_of_2(size)))


def _covariance_config(features: int, reduce: bool, dtype: torch.dtype) -> dict:
    """Tile sizes (fixed, no autotuning; not yet timed on hardware).

    The interpreter takes the smallest tiles (its cost is per element and per loop step).
    On a GPU the fp32 "ieee" dot runs on CUDA cores with each thread's operand slices in
    registers, so its reduction step BLOCK_R stays at 16; the bf16 / fp16 tensor-core dot
    takes 32. Reduced panels are gathered [BLOCK_F, BLOCK_Q, BLOCK_R] at a time, so BLOCK_Q
    stays small. 128-wide tiles spill (the two mirrored stores hold a 64-bit address per
    entry). Checked with ptxas for sm_90 (Triton 3.9, 8 warps): 128 to 244 registers, no
    spills, for linear / conv, expand / reduce, fp32 / bf16 / fp16.
    """
    if _interpreting():
        return dict(LOW_DOT=_low_dot(dtype) and not reduce, BLOCK_F=16, BLOCK_R=16, BLOCK_Q=4)
    low = _low_dot(dtype) and not reduce
    return dict(LOW_DOT=low, BLOCK_F=_block(features, 64), BLOCK_R=32 if low else 16,
                BLOCK_Q=4 if reduce else 1, num_warps=8)


def _ekfac_lambda_config(o: int, f: int, dtype_a: torch.dtype, dtype_g: torch.dtype) -> dict:
    """Tile sizes (fixed, no autotuning; not yet timed on hardware).

    Two [BLOCK_O, BLOCK_F] fp32 tiles (running sum and current product) live in registers;
    the fp32 "ieee" dot also holds its operand slices there, so its P step is 16 at 8 warps.
    ptxas for sm_90: 250 (fp32) and 249 (bf16, 4 warps) registers, no spills.
    """
    low = _low_dot(dtype_a, dtype_g)
    if _interpreting():
        return dict(LOW_DOT=low, BLOCK_O=16, BLOCK_F=16, BLOCK_P=16)
    return dict(LOW_DOT=low, BLOCK_O=_block(o, 64), BLOCK_F=_block(f, 64),
                BLOCK_P=32 if low else 16, num_warps=4 if low else 8)


def _num_splits(tiles: int, steps: int, device: torch.device) -> int:
    """Programs per output tile along the reduction (``steps`` chunks) so that a launch fills
    the GPU; 1 on CPU and in the interpreter."""
    if device.type != "cuda" or _interpreting():
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, tiles), steps // _SPLIT_MIN_STEPS))


def _split_range(total: int, n_split: int, step: int) -> tuple[int, int]:
    """(per_split, n_split): ``total`` items in ranges of a multiple of ``step``, no empty one."""
    n_split = max(1, min(int(n_split), triton.cdiv(total, step)))
    per_split = triton.cdiv(triton.cdiv(total, n_split), step) * step
    return per_split, triton.cdiv(total, per_split)


def _sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """out = sum of ``part[s]`` over s in increasing order (both contiguous)."""
    block = 1024
    numel = out.numel()
    _sum_splits_kernel[(triton.cdiv(numel, block),)](
        part, out, numel, part.shape[0], part.stride(0), ACCUMULATE=False, BLOCK=block)


def _covariance_geometry(x: torch.Tensor, conv: tuple) -> dict:
    """Kernel size arguments: positions per datum ``S``, features ``F`` and the conv's."""
    if conv:
        kh, kw, sh, sw, ph, pw, dh, dw, groups = (int(v) for v in conv)
        c, h, w = x.shape[1], x.shape[2], x.shape[3]
        h_out = conv_output_size(h, kh, sh, ph, dh)
        w_out = conv_output_size(w, kw, sw, pw, dw)
        return dict(S=h_out * w_out, F=c // groups * kh * kw, CPG=c // groups, H=h, W=w,
                    W_OUT=w_out, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
                    groups=groups)
    return dict(S=x.shape[1], F=x.shape[2], CPG=1, H=1, W=1, W_OUT=1, KH=1, KW=1, SH=1, SW=1,
                PH=0, PW=0, DH=1, DW=1, groups=1)


def covariance(x: torch.Tensor, conv: tuple, reduce: bool, *, splits: int | None = None):
    """``(S [G, F, F], s [G, F])`` float32, as ``fastattr.reference.curvature.covariance``.

    ``x`` contiguous; ``splits`` forces the programs per S tile along the rows (default:
    enough to fill the GPU; 1 on CPU and in the interpreter).
    """
    x = x.contiguous()
    conv = tuple(conv)
    geo = _covariance_geometry(x, conv)
    groups, features = geo.pop("groups"), geo["F"]
    if x.stride(0) >= 2**31:
        raise ValueError(f"one datum of x has {x.stride(0)} >= 2**31 elements (int32 offsets)")
    device = x.device
    cov = torch.empty(groups, features, features, dtype=torch.float32, device=device)
    sums = torch.empty(groups, features, dtype=torch.float32, device=device)
    rows = x.shape[0] if reduce else x.shape[0] * geo["S"]
    cfg = _covariance_config(features, reduce, x.dtype)
    n_f_tiles = triton.cdiv(features, cfg["BLOCK_F"])
    chunks = triton.cdiv(rows, cfg["BLOCK_R"])
    if splits is None:
        splits = _num_splits(groups * n_f_tiles * (n_f_tiles + 1) // 2, chunks, device)
    rows_per_split, n_split = _split_range(rows, splits, cfg["BLOCK_R"])
    if n_split == 1:
        cov_dst, sums_dst = cov, sums
    else:
        cov_dst = torch.empty(n_split, *cov.shape, dtype=torch.float32, device=device)
        sums_dst = torch.empty(n_split, *sums.shape, dtype=torch.float32, device=device)
    _covariance_kernel[(n_f_tiles * n_f_tiles, groups, n_split)](
        x, cov_dst, sums_dst, rows, geo["S"], features, geo["CPG"], x.stride(0), geo["H"],
        geo["W"], geo["W_OUT"], geo["KH"], geo["KW"], geo["SH"], geo["SW"], geo["PH"],
        geo["PW"], geo["DH"], geo["DW"], n_f_tiles, rows_per_split,
        cov.stride(0), cov_dst.stride(0) if n_split > 1 else 0,
        sums.stride(0), sums_dst.stride(0) if n_split > 1 else 0,
        IS_CONV=bool(conv), REDUCE=bool(reduce), enable_fp_fusion=True, **cfg)
    if n_split > 1:
        _sum_splits(cov_dst, cov)
        _sum_splits(sums_dst, sums)
    return cov, sums


def ekfac_lambda(a: torch.Tensor, g: torch.Tensor, *, splits: int | None = None) -> torch.Tensor:
    """``[O, F]`` float32 ``sum_n (g_nᵀ a_n)²``, as ``fastattr.reference.curvature.ekfac_lambda``.

    ``a [N, P, F]``, ``g [N, P, O]`` contiguous; ``splits`` forces the programs per L tile
    along the data (default: enough to fill the GPU; 1 on CPU and in the interpreter).
    """
    a, g = a.contiguous(), g.contiguous()
    n, p, f = a.shape
    o = g.shape[2]
    device = a.device
    out = torch.empty(o, f, dtype=torch.float32, device=device)
    cfg = _ekfac_lambda_config(o, f, a.dtype, g.dtype)
    o_tiles = triton.cdiv(o, cfg["BLOCK_O"])
    f_tiles = triton.cdiv(f, cfg["BLOCK_F"])
    if splits is None:
        splits = _num_splits(o_tiles * f_tiles, n, device)
    data_per_split, n_split = _split_range(n, splits, 1)
    dst = out if n_split == 1 else torch.empty(n_split, o, f, dtype=torch.float32, device=device)
    _ekfac_lambda_kernel[(o_tiles, f_tiles, n_split)](
        a, g, dst, n, p, f, o, data_per_split, dst.stride(0) if n_split > 1 else 0,
        enable_fp_fusion=True, **cfg)
    if n_split > 1:
        _sum_splits(dst, out)
    return out
