"""K-FAC / EK-FAC accumulation ops: covariances with implicit conv patches, and the EK-FAC
eigenvalue correction without per-sample gradients.

- ``covariance(x, conv=(), reduce=False)`` -> ``(S [G, F, F], s [G, F])``: ``S = sum v vᵀ``
  and ``s = sum v`` over the rows ``v`` of a layer input or output gradient. For a
  ``Conv2d`` input the rows are the patch vectors of every output position, formed inside
  the kernel from the NCHW tensor (never with ``F.unfold``), one block per channel group;
  ``reduce=True`` sums each row's positions / tokens first (the "reduce" weight-sharing
  variant). ``s`` gives the bias row of the augmented covariance of ``[a; 1]`` without a
  ones column.
- ``covariance_add(x, packed, sums, conv, reduce)``: the same added in place to float64
  running sums, upper triangle packed (``pack_upper`` / ``unpack_upper``), the form
  ``fastattr.curvature`` keeps A in between batches.
- ``ekfac_lambda(a, g)`` -> ``[O, F]``: ``sum_n (g_nᵀ a_n)²`` for ``a [N, P, F]``,
  ``g [N, P, O]``: with ``a``, ``g`` rotated into the K-FAC eigenbases this is the EK-FAC
  correction ``sum_n (Q_Gᵀ G_n Q_A)²``; each ``G_n`` tile lives in registers / cache only.

Both accumulate in float32 from float32 / bfloat16 / float16 input and return float32; the
caller sums batches in float64 (``fastattr.curvature``). Layouts and the exact definitions are
in ``fastattr.reference.curvature``, the pure-torch oracle.
"""

from __future__ import annotations

import torch

from . import ops
from .backends import check_backend_name, select_backend
from .psg import conv_output_size
from .reference.curvature import conv_features, covariance_shape, pack_upper, unpack_upper

__all__ = ["covariance", "covariance_add", "ekfac_lambda", "conv_features", "covariance_shape",
           "pack_upper", "unpack_upper"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_conv(conv, name: str = "conv") -> tuple:
    conv = tuple(conv)
    if len(conv) != 9 or not all(isinstance(v, int) and not isinstance(v, bool) for v in conv):
        raise ValueError(f"{name} must be () or 9 ints (kh, kw, stride_h, stride_w, pad_h, pad_w, "
                         f"dil_h, dil_w, groups), got {conv!r}")
    kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
    if min(kh, kw, sh, sw, dh, dw, groups) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{name} has a non-positive size, stride, dilation or groups (or "
                         f"negative padding): {conv!r}")
    return conv


def covariance(x: torch.Tensor, conv=(), reduce: bool = False, backend: str = "auto"):
    """``(S [G, F, F], s [G, F])`` float32: second moments and sums of the rows of ``x``.

    ``x`` is ``[N, T, F]`` (linear: rows are the N*T token vectors, G = 1) or NCHW
    ``[N, C, H, W]`` with ``conv = (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    groups)`` (rows are the patch vectors of the output positions, G = groups blocks of
    F = C/groups*kh*kw). ``reduce=True``: one row per n (per group), the sum over its tokens /
    positions.

    Example::

        S, s = covariance(a, conv=(3, 3, 2, 2, 1, 1, 1, 1, 1))   # a conv's input
        A = S[0] / rows                                          # expand-variant factor
    """
    conv = _check_cov_input(x, conv, reduce)
    backend = select_backend(check_backend_name(backend), x.device)
    return ops.covariance(x.contiguous(), list(conv), reduce, backend)


def _check_cov_input(x, conv, reduce) -> tuple:
    _check_float("x", x)
    if not isinstance(reduce, bool):
        raise TypeError(f"reduce must be a bool, got {type(reduce).__name__}")
    conv = tuple(conv)
    if conv:
        conv = _check_conv(conv)
        if x.dim() != 4:
            raise ValueError(f"x must be NCHW [N, C, H, W] for a conv, got shape {tuple(x.shape)}")
        kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
        if x.shape[1] % groups:
            raise ValueError(f"x has {x.shape[1]} channels, not divisible by groups={groups}")
        if min(conv_output_size(x.shape[2], kh, sh, ph, dh),
               conv_output_size(x.shape[3], kw, sw, pw, dw)) < 1:
            raise ValueError(f"conv {conv!r} gives no output position for an input of "
                             f"{tuple(x.shape[2:])}")
    elif x.dim() != 3:
        raise ValueError(f"x must be [N, T, F] for a linear layer, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")
    return conv


def covariance_add(x: torch.Tensor, packed: torch.Tensor, sums: torch.Tensor, conv=(),
                   reduce: bool = False, backend: str = "auto") -> None:
    """Add ``covariance(x, conv, reduce)`` to float64 running sums in place: ``packed [G,
    F(F+1)/2] += pack_upper(S)``, ``sums [G, F] += s``. The cpu kernel adds its finished
    upper triangle straight in, so neither ``S`` nor a packed copy of it is ever allocated.

    Example::

        packed = torch.zeros(1, F * (F + 1) // 2, dtype=torch.float64)
        sums = torch.zeros(1, F, dtype=torch.float64)
        for a in batches:
            covariance_add(a, packed, sums, conv=(3, 3, 1, 1, 1, 1, 1, 1, 1))
        A = unpack_upper(packed, F)[0] / rows
    """
    conv = _check_cov_input(x, conv, reduce)
    groups, f = covariance_shape(x, conv)
    for name, t, shape in (("packed", packed, (groups, f * (f + 1) // 2)),
                           ("sums", sums, (groups, f))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 \
                or tuple(t.shape) != shape or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous float64 tensor {list(shape)} on "
                             f"{x.device}, got {getattr(t, 'dtype', type(t).__name__)} "
                             f"{list(getattr(t, 'shape', []))}")
    backend = select_backend(check_backend_name(backend), x.device)
    ops.covariance_add(x.contiguous(), list(conv), reduce, packed, sums, backend)


def ekfac_lambda(a: torch.Tensor, g: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``[O, F]`` float32: ``sum_n (g_nᵀ a_n)²`` (elementwise square) for ``a [N, P, F]``,
    ``g [N, P, O]`` -- the EK-FAC correction when ``a``, ``g`` are rotated into the
    eigenbases of A and G; never forms the ``[N, O, F]`` gradients.

    Example::

        lam = ekfac_lambda(a @ QA, g @ QG)     # [O, F], sum over the N data
    """
    _check_float("a", a)
    _check_float("g", g)
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"a and g must be [N, P, F] and [N, P, O], got {tuple(a.shape)} and "
                         f"{tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must share N and P")
    if a.device != g.device:
        raise ValueError(f"a is on {a.device} but g is on {g.device}")
    if a.numel() == 0 or g.numel() == 0:
        raise ValueError(f"a {tuple(a.shape)} and g {tuple(g.shape)} must not be empty")
    backend = select_backend(check_backend_name(backend), a.device)
    return ops.ekfac_lambda(a.contiguous(), g.contiguous(), backend)
