"""Fused per-sample gradient ops on captured layer inputs / output gradients.

For a ``Linear`` or ``Conv2d`` layer the per-sample weight gradient is
``G_b = sum_r g_r a_r^T`` over the rows r of sample b (tokens, pixels, and the K timesteps
of one image). The ops here multiply ``G_b`` straight into a right-hand matrix, tile by
tile, without writing ``G_b``:

- ``psg_project``: ``[B, k]`` = flattened ``G_b`` (and bias gradient) times rows of the
  Philox projection matrix at the parameter's global offset -- exactly
  ``Projector.project`` of the flat per-sample gradient;
- ``psg_matmul``: ``[B, q]`` = ``<G_b, Q_j>`` for loaded matrices ``Q [q, d_out, F]``.

Layouts (``LayerIO``):

- linear: ``a [N, T, d_in]``, ``g [N, T, d_out]`` (any leading dims folded into T);
- conv2d: NCHW ``a [N, C_in, H, W]``, ``g [N, C_out, H_out, W_out]``, geometry
  ``conv = (kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)``; patches are
  formed inside the kernels, never with ``F.unfold``.

``Segments`` says which rows form which sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from . import ops
from .backends import check_backend_name, select_backend

__all__ = ["Segments", "LayerIO", "psg_project", "psg_matmul"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Segments:
    """Rows grouped into samples: rows of sample b are ``order[seg_ptr[b]:seg_ptr[b+1]]``.

    Build it with ``Segments.from_ids(ids)`` (``ids[r]`` = sample of row r) or
    ``Segments.identity(n)`` (one row per sample).
    """

    seg_ptr: torch.Tensor  # int64 [B + 1], seg_ptr[0] = 0, non-decreasing
    order: torch.Tensor  # int64 [N], a permutation of the rows

    @classmethod
    def from_ids(cls, ids, num_segments: int | None = None, device=None) -> "Segments":
        """Segments from per-row sample ids ``ids`` (ints in ``[0, num_segments)``).

        ``num_segments`` defaults to ``max(ids) + 1``; samples with no rows are allowed
        (their gradient is zero). Rows keep their relative order inside a sample.
        """
        ids = torch.as_tensor(ids)
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"segment ids must be a 1-D integer tensor, got {ids.dtype} "
                            f"of shape {tuple(ids.shape)}")
        ids = ids.to(torch.int64)
        if device is not None:
            ids = ids.to(device)
        if ids.numel() == 0:
            raise ValueError("segment ids are empty: give one id per row")
        low, high = int(ids.min()), int(ids.max())
        if low < 0:
            raise ValueError(f"segment ids must be >= 0, got {low}")
        if num_segments is None:
            num_segments = high + 1
        if isinstance(num_segments, bool) or not isinstance(num_segments, int):
            raise TypeError(f"num_segments must be an int, got {type(num_segments).__name__}")
        if high >= num_segments:
            raise ValueError(f"segment id {high} is out of range for num_segments={num_segments}")
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids, minlength=num_segments)
        seg_ptr = torch.zeros(num_segments + 1, dtype=torch.int64, device=ids.device)
        seg_ptr[1:] = torch.cumsum(counts, 0)
        return cls(seg_ptr, order)

    @classmethod
    def identity(cls, n: int, device=None) -> "Segments":
        """One row per sample: ``n`` rows, ``n`` samples."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        return cls(torch.arange(n + 1, dtype=torch.int64, device=device),
                   torch.arange(n, dtype=torch.int64, device=device))

    @property
    def num_segments(self) -> int:
        return self.seg_ptr.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    def to(self, device) -> "Segments":
        if self.seg_ptr.device == torch.device(device) and self.order.device == self.seg_ptr.device:
            return self  # keeps the cached rows_per_sample
        return Segments(self.seg_ptr.to(device), self.order.to(device))

    @cached_property
    def rows_per_sample(self) -> int | None:
        """K when every sample has the same K >= 1 rows, stored in order (sample b = rows
        ``[b*K, (b+1)*K)``, e.g. K timesteps per image, image-major): per-sample sums are
        then a reshape and a sum. None otherwise."""
        n, batch = self.num_rows, self.num_segments
        if batch < 1 or n < batch or n % batch:
            return None
        k = n // batch
        if not torch.equal(self.seg_ptr, torch.arange(0, n + 1, k, device=self.seg_ptr.device)):
            return None
        return k if torch.equal(self.order, torch.arange(n, device=self.order.device)) else None


@dataclass(frozen=True)
class LayerIO:
    """One call of a ``Linear`` or ``Conv2d``: inputs ``a``, output gradients ``g``, geometry.

    ``conv`` is ``()`` for a linear layer, else the 9 ints
    ``(kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups)``.
    """

    a: torch.Tensor
    g: torch.Tensor
    conv: tuple = ()

    @property
    def is_conv(self) -> bool:
        return bool(self.conv)

    @property
    def d_out(self) -> int:
        return self.g.shape[1] if self.is_conv else self.g.shape[2]

    @property
    def features(self) -> int:
        """F: the columns of the flattened weight gradient ``[d_out, F]``."""
        if self.is_conv:
            kh, kw, groups = self.conv[0], self.conv[1], self.conv[8]
            return self.a.shape[1] // groups * kh * kw
        return self.a.shape[2]

    @property
    def weight_shape(self) -> tuple:
        if self.is_conv:
            kh, kw, groups = self.conv[0], self.conv[1], self.conv[8]
            return (self.d_out, self.a.shape[1] // groups, kh, kw)
        return (self.d_out, self.features)


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (kernel - 1) - 1) // stride + 1


def check_layer(layer: LayerIO, segments: Segments, name: str = "layer",
                contiguous: bool = True) -> LayerIO:
    """Validate ``layer`` against ``segments``; returns it with contiguous ``a`` and ``g``
    (as they are with ``contiguous=False``, for torch code that takes any strides)."""
    a, g, conv = layer.a, layer.g, tuple(layer.conv)
    for arg, t in (("a", a), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{arg} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}.{arg} must be float32, bfloat16 or float16, got {t.dtype}")
    if a.device != g.device:
        raise ValueError(f"{name}.a is on {a.device} but {name}.g is on {g.device}")
    if a.shape[0] != g.shape[0]:
        raise ValueError(f"{name}.a has {a.shape[0]} rows but {name}.g has {g.shape[0]}: "
                         "a and g must come from the same rows")
    if a.shape[0] != segments.num_rows:
        raise ValueError(f"{name} has {a.shape[0]} rows but segments describe "
                         f"{segments.num_rows}")
    if conv:
        if len(conv) != 9 or not all(isinstance(v, int) and not isinstance(v, bool) for v in conv):
            raise ValueError(f"{name}.conv must be 9 ints (kh, kw, stride_h, stride_w, pad_h, "
                             f"pad_w, dil_h, dil_w, groups), got {conv!r}")
        kh, kw, sh, sw, ph, pw, dh, dw, groups = conv
        if min(kh, kw, sh, sw, dh, dw, groups) < 1 or min(ph, pw) < 0:
            raise ValueError(f"{name}.conv has a non-positive size, stride, dilation or groups "
                             f"(or negative padding): {conv!r}")
        if a.dim() != 4 or g.dim() != 4:
            raise ValueError(f"{name}: a conv2d layer takes NCHW a and g, got a "
                             f"{tuple(a.shape)} and g {tuple(g.shape)}")
        if a.shape[1] % groups or g.shape[1] % groups:
            raise ValueError(f"{name}: channels ({a.shape[1]} in, {g.shape[1]} out) are not "
                             f"divisible by groups={groups}")
        h_out = conv_output_size(a.shape[2], kh, sh, ph, dh)
        w_out = conv_output_size(a.shape[3], kw, sw, pw, dw)
        if (h_out, w_out) != tuple(g.shape[2:]):
            raise ValueError(f"{name}: the convolution of a {tuple(a.shape)} gives "
                             f"{(h_out, w_out)} output positions but g is {tuple(g.shape)}")
    else:
        if a.dim() != 3 or g.dim() != 3:
            raise ValueError(f"{name}: a linear layer takes a [N, T, d_in] and g [N, T, d_out], "
                             f"got a {tuple(a.shape)} and g {tuple(g.shape)}")
        if a.shape[1] != g.shape[1]:
            raise ValueError(f"{name}.a has {a.shape[1]} tokens per row but {name}.g has "
                             f"{g.shape[1]}")
    if not contiguous:
        return LayerIO(a, g, conv)
    return LayerIO(a.contiguous(), g.contiguous(), conv)


def _resolve(backend: str, device) -> str:
    return select_backend(check_backend_name(backend), device)


def psg_project(layer: LayerIO, segments: Segments, projector, w_offset: int,
                b_offset: int | None = None) -> torch.Tensor:
    """``[B, k]`` float32: the per-sample gradients of one layer call, projected.

    Equal to ``projector`` applied to the flat gradient with the weight gradient at input
    indices ``[w_offset, w_offset + d_out * F)`` and, when ``b_offset`` is given, the bias
    gradient at ``[b_offset, b_offset + d_out)``. Sum the results of all layers (and calls)
    to project a whole model's per-sample gradient.

    Example::

        seg = Segments.identity(x.shape[0])
        feats = psg_project(LayerIO(a, g), seg, fastattr.Projector(k=512), w_offset=0)
    """
    layer = check_layer(layer, segments)
    seg = segments.to(layer.a.device)
    for arg, off in (("w_offset", w_offset), ("b_offset", b_offset)):
        if off is not None and (isinstance(off, bool) or not isinstance(off, int) or off < 0):
            raise ValueError(f"{arg} must be an int >= 0, got {off!r}")
    backend = projector.resolve_backend(layer.a.device)
    has_bias = b_offset is not None
    return ops.psg_project(layer.a, layer.g, seg.seg_ptr, seg.order, list(layer.conv), has_bias,
                           w_offset, b_offset if has_bias else 0, projector.k, projector.kind,
                           projector.key[0], projector.key[1], projector.stream, backend)


def psg_matmul(layer: LayerIO, segments: Segments, q_weight: torch.Tensor,
               q_bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``[B, q]`` float32: ``<G_b, Q_j>`` (+ ``<bias grad_b, q_bias_j>``) for every sample b.

    ``q_weight`` is ``[q, *weight_shape]`` (``[q, d_out, d_in]`` or
    ``[q, C_out, C_in/groups, kh, kw]``), float32 or bfloat16 (fp16 accepted);
    ``q_bias`` is ``[q, d_out]``.

    Example::

        scores = psg_matmul(LayerIO(a, g), Segments.identity(n), query_grads)  # [n, q]
    """
    layer = check_layer(layer, segments)
    seg = segments.to(layer.a.device)
    if not isinstance(q_weight, torch.Tensor):
        raise TypeError(f"q_weight must be a Tensor, got {type(q_weight).__name__}")
    if q_weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q_weight must be float32, bfloat16 or float16, got {q_weight.dtype}")
    if q_weight.dim() < 2 or tuple(q_weight.shape[1:]) != layer.weight_shape:
        raise ValueError(f"q_weight must have shape [q, {', '.join(map(str, layer.weight_shape))}]"
                         f", got {tuple(q_weight.shape)}")
    if q_weight.device != layer.a.device:
        raise ValueError(f"q_weight is on {q_weight.device} but the layer is on {layer.a.device}")
    if q_bias is not None:
        if not isinstance(q_bias, torch.Tensor) or q_bias.dtype not in _FLOAT_DTYPES:
            raise TypeError("q_bias must be a float32, bfloat16 or float16 Tensor [q, d_out]")
        if tuple(q_bias.shape) != (q_weight.shape[0], layer.d_out):
            raise ValueError(f"q_bias must have shape [{q_weight.shape[0]}, {layer.d_out}], "
                             f"got {tuple(q_bias.shape)}")
        if q_bias.device != layer.a.device:
            raise ValueError(f"q_bias is on {q_bias.device} but the layer is on {layer.a.device}")
        q_bias = q_bias.contiguous()
    return ops.psg_matmul(layer.a, layer.g, seg.seg_ptr, seg.order, list(layer.conv),
                          q_weight.contiguous(), q_bias, _resolve(backend, layer.a.device))
