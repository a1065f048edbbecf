"""Triton kernels of the random projection ``x -> x @ R`` with ``R`` generated in registers.

``R`` (p x k) is the Philox4x32-10 matrix of shared/DESIGN.md ("The random projection is a
function, not a state"); the Philox rounds and the fp32 Gaussian formulas are ports, op for op,
of csrc/philox.h (``philox4x32_10``, ``fa_neg2log_uniform``, ``fa_sincos_2pi_uniform``,
``fa_gaussian4``), so Rademacher entries are bit-identical to every other backend and Gaussian
ones agree to a few ulp.

One program computes an output tile ``[BLOCK_B, BLOCK_K]``: it walks its share of the input
dimension in ``BLOCK_P`` steps, loads an ``x`` tile, generates the matching ``R`` tile and
accumulates ``tl.dot`` in fp32. Layers are separate launches that add into the output in
order; when a launch would leave the GPU idle (few output tiles, long p) the p dimension is
split across programs into a partial buffer that a second kernel sums in a fixed order. No
float atomics, so results are deterministic.

Launchers here are plain functions with the signature of ``fastattr.kernels.cpu``. Importing
this module imports triton, which is why only ``fastattr.kernels.implementation`` does so.
Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly; tests use it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...rng import projection_scale
from .. import DTYPE_CODES, KIND_CODES

__all__ = ["project", "materialize"]

_INPUT_DTYPES = tuple(DTYPE_CODES)

# Philox4x32-10 constants (csrc/philox.h). Globals read by @triton.jit code must be
# tl.constexpr instances (the interpreter also accepts plain ints; the compiler does not).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


# --------------------------------------------------------------------------------------------
# The matrix entries
# --------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors of one shape; k0, k1 uint32 scalars."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _neg2log_uniform(w):
    """-2 ln u, u = ((w >> 8) + 0.5) 2^-24, in fp32: fa_neg2log_uniform of csrc/philox.h."""
    m = w >> 8
    upper = m >= 11863283  # (2m+1) 2^-25 > sqrt(1/2)
    # v = y = 1 - u (exact) when upper, else v = fl(u); both integers are < 2^25, so the
    # uint32 -> int32 reinterpretation is exact.
    n = tl.where(upper, tl.full(m.shape, 1 << 25, tl.uint32) - 2 * m - 1, 2 * m + 1)
    v = n.to(tl.int32, bitcast=True).to(tl.float32) * 2.9802322387695312e-08  # 2^-25
    bits = v.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32, bitcast=True) - 127
    f = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # [1, 2)
    big = f > 1.41421356
    f = tl.where(big, 0.5 * f, f)
    e = e + big.to(tl.int32)
    num = tl.where(upper, -v, f - 1.0)
    den = tl.where(upper, 2.0 - v, f + 1.0)
    ef = tl.where(upper, 0.0, e.to(tl.float32))
    s = tl.math.div_rn(num, den)
    s2 = s * s
    poly = s2 * (1.0 / 9.0) + 1.0 / 7.0
    poly = poly * s2 + 1.0 / 5.0
    poly = poly * s2 + 1.0 / 3.0
    atanh2 = 2.0 * s + 2.0 * s * s2 * poly
    ln2_hi = 0.693145751953125  # 11 significant bits: ef * ln2_hi is exact
    ln2_lo = 1.42860682030941723212e-6  # ln2 - ln2_hi
    ln_u = ef * ln2_hi + (ef * ln2_lo + atanh2)
    return -2.0 * ln_u


@triton.jit
def _sincos_2pi_uniform(w):
    """(sin, cos) of 2 pi u, u = ((w >> 8) + 0.5) 2^-24: fa_sincos_2pi_uniform of philox.h."""
    m = w >> 8
    q = (m + (1 << 21)) >> 22  # 0..4 quarter turns
    r = (2 * m + 1).to(tl.int32, bitcast=True) - (q << 23).to(tl.int32, bitcast=True)
    x = r.to(tl.float32) * (1.57079632679489662 * 1.1920928955078125e-07)  # pi/2 * 2^-23
    x2 = x * x
    sp = x2 * (1.0 / 362880.0) - 1.0 / 5040.0
    sp = sp * x2 + 1.0 / 120.0
    sp = sp * x2 - 1.0 / 6.0
    sx = x + x * x2 * sp
    cp = x2 * (-1.0 / 3628800.0) + 1.0 / 40320.0
    cp = cp * x2 - 1.0 / 720.0
    cp = cp * x2 + 1.0 / 24.0
    cp = cp * x2 - 0.5
    cx = 1.0 + x2 * cp
    # sin(q pi/2 + x), cos(q pi/2 + x): odd q swaps them; sign flips as bit operations.
    odd = (q & 1) != 0
    sv = tl.where(odd, cx, sx)
    cv = tl.where(odd, sx, cx)
    sin_neg = ((q >> 1) & 1) << 31
    cos_neg = ((q ^ (q >> 1)) & 1) << 31
    s = (sv.to(tl.uint32, bitcast=True) ^ sin_neg).to(tl.float32, bitcast=True)
    c = (cv.to(tl.uint32, bitcast=True) ^ cos_neg).to(tl.float32, bitcast=True)
    return s, c


@triton.jit
def _matrix_tile(rows, col0, k0, k1, stream, KIND: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Unscaled entries R[rows, col0 : col0 + BLOCK_K] as fp32 ``[BLOCK_P, BLOCK_K]``.

    ``rows``: int64 ``[BLOCK_P]`` input indices; ``col0``: a multiple of BLOCK_K (itself a
    multiple of 32). Counter (lo32(i), hi32(i), j_block, stream) per DESIGN.md. Columns past
    k are generated too (finite values) and masked by the caller.
    """
    lo = rows.to(tl.uint32)  # int64 -> uint32 truncates: the low word
    hi = (rows >> 32).to(tl.uint32)
    if KIND == 0:
        # Rademacher: one Philox word per 32 columns (a "slot"); bit j % 32 of word
        # (j % 128) // 32 of block j // 128. The 4 words of a block serve 4 adjacent slots.
        NSLOT: tl.constexpr = BLOCK_K // 32
        slot = col0 // 32 + tl.arange(0, NSLOT)
        zero = tl.zeros([BLOCK_P, NSLOT], tl.uint32)
        c0 = zero + lo[:, None]
        c1 = zero + hi[:, None]
        c2 = zero + (slot >> 2).to(tl.uint32)[None, :]
        c3 = zero + stream
        w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
        which = (slot & 3)[None, :]
        word = tl.where(which == 0, w0, tl.where(which == 1, w1, tl.where(which == 2, w2, w3)))
        shift = tl.arange(0, 32).to(tl.uint32)
        bit = (word[:, :, None] >> shift[None, None, :]) & 1
        sign = tl.where(bit != 0, 1.0, -1.0)  # [BLOCK_P, NSLOT, 32]
        return tl.reshape(sign, [BLOCK_P, BLOCK_K])
    else:
        # Gaussian: one Philox call per 4 columns; Box-Muller on words (0, 1) for j % 4 in
        # {0, 1} (r cos, r sin) and on words (2, 3) for j % 4 in {2, 3}.
        NBLK: tl.constexpr = BLOCK_K // 4
        blk = col0 // 4 + tl.arange(0, NBLK)
        zero = tl.zeros([BLOCK_P, NBLK], tl.uint32)
        c0 = zero + lo[:, None]
        c1 = zero + hi[:, None]
        c2 = zero + blk.to(tl.uint32)[None, :]
        c3 = zero + stream
        w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
        r0 = tl.sqrt_rn(_neg2log_uniform(w0))
        r1 = tl.sqrt_rn(_neg2log_uniform(w2))
        s0, cos0 = _sincos_2pi_uniform(w1)
        s1, cos1 = _sincos_2pi_uniform(w3)
        t = tl.arange(0, 4)[None, None, :]
        z = tl.where(t == 0, (r0 * cos0)[:, :, None],
                     tl.where(t == 1, (r0 * s0)[:, :, None],
                              tl.where(t == 2, (r1 * cos1)[:, :, None], (r1 * s1)[:, :, None])))
        return tl.reshape(z, [BLOCK_P, BLOCK_K])


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _project_kernel(
    x_ptr, out_ptr, B, P, K, stride_xb, stride_xp, stride_ob, stride_ok, stride_os,
    offset, p_per_split, k0, k1, stream, scale,
    KIND: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[(split,) b, j] (+)= scale * sum_{i in split's p range} x[b, i] R[offset + i, j].

    Grid (b tiles, k tiles, splits); split s covers x columns [s * p_per_split, ...) and writes
    at ``out_ptr + s * stride_os``.
    """
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    k0 = tl.to_tensor(k0).to(tl.uint32)
    k1 = tl.to_tensor(k1).to(tl.uint32)
    stream = tl.to_tensor(stream).to(tl.uint32)
    offset = tl.to_tensor(offset).to(tl.int64)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    col0 = pid_k * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    mask_b = offs_b < B
    x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb

    p_start = pid_s.to(tl.int64) * p_per_split
    p_stop = tl.minimum(p_start + p_per_split, P)
    acc = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for p0 in range(p_start, p_stop, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < p_stop
        x = tl.load(x_rows + offs_p[None, :] * stride_xp,
                    mask=mask_b[:, None] & mask_p[None, :], other=0.0)
        r = _matrix_tile(offset + offs_p, col0, k0, k1, stream, KIND, BLOCK_P, BLOCK_K)
        if DOT_IN_INPUT_DTYPE:
            # Rademacher entries are +-1, exact in bf16/fp16: products are exact and the
            # tensor-core accumulation is fp32, the same sum as the fp32 path.
            acc = tl.dot(x, r.to(x.dtype), acc)
        else:
            acc = tl.dot(x.to(tl.float32), r, acc, input_precision="ieee")
    acc = acc * scale

    out_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os
                + offs_b.to(tl.int64)[:, None] * stride_ob + offs_k[None, :] * stride_ok)
    mask = mask_b[:, None] & (offs_k < K)[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, SPLITS, stride_split,
                       ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    """out[n] (+)= sum_s part[s, n], s in increasing order (deterministic split reduction)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if ACCUMULATE:
        acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
    part_ptrs = part_ptr + offs
    for _ in range(0, SPLITS):
        acc += tl.load(part_ptrs, mask=mask, other=0.0)
        part_ptrs += stride_split  # pointer steps: no int32 overflow of s * stride_split
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _materialize_kernel(rows_ptr, out_ptr, N, K, stride_on, k0, k1, stream, scale,
                        KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, j] = scale * R[rows[n], j]."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    k0 = tl.to_tensor(k0).to(tl.uint32)
    k1 = tl.to_tensor(k1).to(tl.uint32)
    stream = tl.to_tensor(stream).to(tl.uint32)
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    rows = tl.load(rows_ptr + offs_r, mask=mask_r, other=0)
    col0 = pid_k * BLOCK_K
    offs_k = col0 + tl.arange(0, BLOCK_K)
    r = _matrix_tile(rows, col0, k0, k1, stream, KIND, BLOCK_R, BLOCK_K) * scale
    out_ptrs = out_ptr + offs_r[:, None] * stride_on + offs_k[None, :]
    tl.store(out_ptrs, r, mask=mask_r[:, None] & (offs_k < K)[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(k: int, most: int) -> int:
    # A multiple of 32 (Rademacher slots: one Philox word per 32 columns) and >= 16 (tl.dot).
    return min(most, max(32, triton.next_power_of_2(k)))


def _config(batch: int, k: int, kind: str, dtype: torch.dtype) -> dict:
    """Tile sizes of one layer's launch (fixed, no autotuning).

    Rademacher entries (+-1) are exact in bf16/fp16, so those inputs take the tensor-core dot
    in their own dtype (exact products, fp32 accumulation). Everything else is an fp32 "ieee"
    dot on CUDA cores, whose operands live in registers: smaller tiles keep it from spilling
    (checked with ptxas for sm_90: no local memory at these sizes).
    """
    # The interpreter stores bf16 as uint16 and cannot take a bf16 dot; fp16 works there.
    low = dtype == torch.float16 or (dtype == torch.bfloat16 and not _interpreting())
    if kind == "rademacher" and low:
        return dict(DOT_IN_INPUT_DTYPE=True, BLOCK_B=min(64, max(16, triton.next_power_of_2(batch))),
                    BLOCK_P=32, BLOCK_K=_block_k(k, 128), num_warps=8)
    return dict(DOT_IN_INPUT_DTYPE=False, BLOCK_B=min(32, max(16, triton.next_power_of_2(batch))),
                BLOCK_P=16, BLOCK_K=_block_k(k, 64), num_warps=4)


_SPLIT_MIN_STEPS = 8  # each split walks at least this many BLOCK_P steps


def _num_splits(tiles: int, p: int, block_p: int, device: torch.device) -> int:
    """Programs per output tile along p so that a launch fills the GPU (1 on CPU)."""
    if device.type != "cuda" or _interpreting():
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, tiles)
    return max(1, min(wanted, triton.cdiv(p, block_p * _SPLIT_MIN_STEPS)))


def _check_common(k: int, kind: str, key, stream: int) -> None:
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {tuple(KIND_CODES)}, got {kind!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not all(0 <= int(w) <= 0xFFFFFFFF for w in (*key, stream)):
        raise ValueError("key words and stream must be uint32 values")


def project(layers, offsets, k: int, kind: str, key, stream: int, *,
            splits: int | None = None) -> torch.Tensor:
    """``sum_l layers[l] @ R[offsets[l] : offsets[l] + p_l]`` as float32 ``[B, k]``.

    ``layers``: 2-D ``[B, p_l]`` tensors (any strides; float32, bfloat16 or float16) on one
    device; ``offsets``: their first rows in R. ``splits`` forces the number of programs per
    output tile along p (default: enough to fill the GPU; 1 on CPU and in the interpreter).
    """
    _check_common(k, kind, key, stream)
    batch = layers[0].shape[0]
    device = layers[0].device
    out = torch.empty(batch, k, dtype=torch.float32, device=device)
    if batch == 0:
        return out
    code = KIND_CODES[kind]
    scale = projection_scale(k)
    seeds = (int(key[0]), int(key[1]), int(stream))
    written = False
    for x, offset in zip(layers, offsets):
        if x.dim() != 2 or x.shape[0] != batch:
            raise ValueError(f"layers must be [B={batch}, p_l], got {tuple(x.shape)}")
        if x.dtype not in _INPUT_DTYPES:
            raise TypeError(f"layer dtype must be one of {_INPUT_DTYPES}, got {x.dtype}")
        if x.device != device:
            raise ValueError(f"layers must share one device, got {x.device} and {device}")
        p, offset = x.shape[1], int(offset)
        if p == 0:
            continue
        if offset < 0 or offset + p > 2**63:
            raise ValueError(f"layer rows [{offset}, {offset + p}) are outside [0, 2**63)")
        cfg = _config(batch, k, kind, x.dtype)
        block_p = cfg["BLOCK_P"]
        tiles = triton.cdiv(batch, cfg["BLOCK_B"]) * triton.cdiv(k, cfg["BLOCK_K"])
        n_split = splits if splits is not None else _num_splits(tiles, p, block_p, device)
        n_split = max(1, min(int(n_split), triton.cdiv(p, block_p)))
        p_per_split = triton.cdiv(triton.cdiv(p, n_split), block_p) * block_p
        n_split = triton.cdiv(p, p_per_split)
        grid = (triton.cdiv(batch, cfg["BLOCK_B"]), triton.cdiv(k, cfg["BLOCK_K"]), n_split)
        # fp fusion on, as nvcc's default (--fmad=true) for the CUDA kernels; explicit so that
        # the result does not follow Triton's changing default.
        launch = dict(KIND=code, enable_fp_fusion=True, **cfg)
        if n_split == 1:
            _project_kernel[grid](
                x, out, batch, p, k, x.stride(0), x.stride(1), out.stride(0), out.stride(1), 0,
                offset, p_per_split, *seeds, scale, ACCUMULATE=written, **launch)
        else:
            part = torch.empty(n_split, batch, k, dtype=torch.float32, device=device)
            _project_kernel[grid](
                x, part, batch, p, k, x.stride(0), x.stride(1), part.stride(1), part.stride(2),
                part.stride(0), offset, p_per_split, *seeds, scale, ACCUMULATE=False, **launch)
            block = 1024
            _sum_splits_kernel[(triton.cdiv(batch * k, block),)](
                part, out, batch * k, n_split, part.stride(0), ACCUMULATE=written, BLOCK=block)
        written = True
    if not written:
        out.zero_()
    return out


def materialize(rows: torch.Tensor, k: int, kind: str, key, stream: int) -> torch.Tensor:
    """Rows ``rows`` (int64 indices on the target device) of R as float32 ``[len(rows), k]``."""
    _check_common(k, kind, key, stream)
    rows = rows.reshape(-1).to(torch.int64).contiguous()
    n = rows.numel()
    out = torch.empty(n, k, dtype=torch.float32, device=rows.device)
    if n == 0:
        return out
    block_r, block_k = 32, _block_k(k, 128)
    grid = (triton.cdiv(n, block_r), triton.cdiv(k, block_k))
    _materialize_kernel[grid](rows, out, n, k, out.stride(0), int(key[0]), int(key[1]),
                              int(stream), projection_scale(k), KIND=KIND_CODES[kind],
                              BLOCK_R=block_r, BLOCK_K=block_k, enable_fp_fusion=True)
    return out
