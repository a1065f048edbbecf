"""Reference curvature (K-FAC / EK-FAC) accumulation ops: plain torch, ``F.unfold`` allowed.

The oracle for the compiled kernels (and their fallback). Two ops, and ``add_packed``: a
``covariance`` result added to float64 running sums with the upper triangle packed
(``pack_upper``), which is what the op ``covariance_add`` means and the form
``fastattr.curvature`` accumulates A in.

``covariance(x, conv, reduce) -> (S [G, F, F], s [G, F])``, float32, where the rows ``v``
of ``x`` are

- linear (``conv == ()``): ``x [N, T, F]``, one row per (n, t) -- or, with ``reduce``,
  one row per n: ``sum_t x[n, t]``; ``G = 1``;
- conv2d (``conv`` = ``(kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)``):
  ``x [N, C, H, W]`` NCHW; the rows are the patch vectors of every output position, split
  into ``G = groups`` channel groups of ``F = C / groups * kh * kw`` entries ordered
  ``(c, i, j)`` as the conv weight ``[C_out, C/groups, kh, kw]`` flattens (zero padding
  contributes zeros); with ``reduce`` one row per (n, group): the sum over output positions.
  The output gradient of a conv is the special case ``kh = kw = 1``, stride 1, no padding.

``S[g] = sum_v v_g v_g^T`` (symmetric: kernels compute the upper triangle and mirror it)
and ``s[g] = sum_v v_g`` (the column sums that give the bias row of an augmented ``[a; 1]``
covariance without a ones column).

``ekfac_lambda(a, g) -> L [O, F]`` float32: ``L = sum_n (g_n^T a_n)^2`` (elementwise square)
for ``a [N, P, F]``, ``g [N, P, O]`` -- the squared per-datum weight gradients in the
(rotated) eigenbasis summed over data, the EK-FAC correction. Inputs float32 / bfloat16 /
float16, upcast to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Data (n) per bmm in ekfac_lambda: bounds the [chunk, O, F] gradients this oracle forms.
LAMBDA_CHUNK = 64


def conv_features(channels: int, conv) -> int:
    """F: entries of one group's patch vector, ``channels / groups * kh * kw``."""
    return channels // conv[8] * conv[0] * conv[1]


def covariance_shape(x: torch.Tensor, conv) -> tuple:
    """``(G, F)`` of ``covariance(x, conv, ...)``: ``S`` is ``[G, F, F]``, ``s`` ``[G, F]``."""
    if conv:
        return conv[8], conv_features(x.shape[1], conv)
    return 1, x.shape[2]


def covariance_rows(x: torch.Tensor, conv, reduce: bool) -> torch.Tensor:
    """The rows of ``covariance`` as float32 ``[G, M, F]`` (materialised: an oracle only)."""
    x = x.to(torch.float32)
    if not conv:
        rows = x.sum(dim=1) if reduce else x.reshape(-1, x.shape[2])
        return rows.unsqueeze(0)
    kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
    n = x.shape[0]
    patches = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    patches = patches.reshape(n, groups, -1, patches.shape[-1])  # [N, G, F, P]
    if reduce:
        return patches.sum(dim=3).transpose(0, 1)  # [G, N, F]
    return patches.permute(1, 0, 3, 2).reshape(groups, -1, patches.shape[2])


def covariance(x: torch.Tensor, conv, reduce: bool):
    """``(S [G, F, F], s [G, F])`` float32: second moments and sums of the rows of ``x``."""
    rows = covariance_rows(x, conv, reduce)
    return rows.transpose(1, 2) @ rows, rows.sum(dim=1)


def _upper_mask(f: int, device) -> torch.Tensor:
    return torch.ones(f, f, dtype=torch.bool, device=device).triu()


def pack_upper(S: torch.Tensor) -> torch.Tensor:
    """``[G, f(f+1)/2]``: the upper triangles of ``S [G, f, f]`` packed row by row (row i's
    entries ``j >= i`` at ``i*f - i*(i-1)/2 + j - i``), the layout of ``covariance_add``."""
    return S[:, _upper_mask(S.shape[1], S.device)]


def unpack_upper(packed: torch.Tensor, f: int, symmetric: bool = True,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``[G, f, f]`` of ``pack_upper``'s layout: symmetric, or (``symmetric=False``) the upper
    triangle only -- all ``torch.linalg.eigh(..., UPLO="U")`` reads, without the transient
    of mirroring. ``out``: a zero-filled ``[G, f, f]`` tensor (or view) to fill instead."""
    full = packed.new_zeros(packed.shape[0], f, f) if out is None else out
    full[:, _upper_mask(f, packed.device)] = packed
    if symmetric:
        full += full.triu(1).transpose(1, 2)
    return full


def add_packed(S: torch.Tensor, s: torch.Tensor, packed: torch.Tensor,
               sums: torch.Tensor) -> None:
    """``packed += pack_upper(S)``, ``sums += s``: a covariance result added to running
    sums (float64) in the packed layout (what ``covariance_add`` does)."""
    packed += pack_upper(S).to(packed.dtype)
    sums += s.to(sums.dtype)


def ekfac_lambda(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``[O, F]`` float32: ``sum_n (g_n^T a_n)^2`` for ``a [N, P, F]``, ``g [N, P, O]``."""
    out = torch.zeros(g.shape[2], a.shape[2], dtype=torch.float32, device=a.device)
    for start in range(0, a.shape[0], LAMBDA_CHUNK):
        aa = a[start:start + LAMBDA_CHUNK].to(torch.float32)
        gg = g[start:start + LAMBDA_CHUNK].to(torch.float32)
        out += (gg.transpose(1, 2) @ aa).square().sum(dim=0)
    return out
