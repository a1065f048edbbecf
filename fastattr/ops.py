"""fastattr's ops as ``torch.library`` custom ops, so they trace under ``torch.compile``.

Each op is registered once here with a fake (meta) implementation; the real implementation
dispatches to the backend chosen by ``fastattr.backends.select_backend``.
"""

from __future__ import annotations

import torch

from .kernels import implementation
from .reference.curvature import add_packed, covariance_shape

__all__ = ["project", "project_transpose_rows", "psg_project", "psg_matmul", "covariance",
           "covariance_add", "ekfac_lambda"]

# Rows of R materialised at a time by the transpose: about 4M entries (16 MiB fp32).
TRANSPOSE_CHUNK_ENTRIES = 1 << 22


def project_transpose_rows(y: torch.Tensor, offset: int, p: int, k: int, kind: str, key,
                           stream: int, backend: str, chunk_rows: int | None = None):
    """``y @ R[offset : offset + p].T`` for float32 ``y [B, k]``: ``[B, p]`` float32.

    Rows of R are materialised ``chunk_rows`` at a time with ``backend``'s generator, so
    memory stays bounded for any p.
    """
    materialize = implementation(backend, "project", "materialize")
    step = chunk_rows or max(1, TRANSPOSE_CHUNK_ENTRIES // k)
    out = torch.empty(y.shape[0], p, dtype=torch.float32, device=y.device)
    for start in range(0, p, step):
        stop = min(p, start + step)
        rows = torch.arange(offset + start, offset + stop, dtype=torch.int64, device=y.device)
        out[:, start:stop] = y @ materialize(rows, k, kind, key, stream).T
    return out


@torch.library.custom_op("fastattr::project", mutates_args=())
def project(
    layers: list[torch.Tensor],
    offsets: list[int],
    k: int,
    kind: str,
    key0: int,
    key1: int,
    stream: int,
    backend: str,
) -> torch.Tensor:
    """``sum_l layers[l] @ R[offsets[l] : offsets[l] + p_l]`` as float32 ``[B, k]``.

    ``layers`` are 2-D ``[B, p_l]`` views, already validated (``Projector.project`` does it);
    ``backend`` is a resolved backend name, not ``"auto"``.
    """
    impl = implementation(backend, "project", "project")
    return impl(layers, offsets, k, kind, (key0, key1), stream)


@project.register_fake
def _project_fake(layers, offsets, k, kind, key0, key1, stream, backend):
    return layers[0].new_empty((layers[0].shape[0], k), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    layers, offsets, k, kind, key0, key1, stream, backend = inputs
    ctx.layer_info = [(off, x.shape[1], x.dtype) for x, off in zip(layers, offsets)]
    ctx.matrix = (k, kind, (key0, key1), stream, backend)


def _backward(ctx, grad):
    # d/dx_l of x_l @ R_l is R_l^T applied to the output gradient: the transpose product
    k, kind, key, stream, backend = ctx.matrix
    grad = grad.to(torch.float32)
    grads = [
        project_transpose_rows(grad, off, p, k, kind, key, stream, backend).to(dtype)
        for off, p, dtype in ctx.layer_info
    ]
    return grads, None, None, None, None, None, None, None


project.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastattr::psg_project", mutates_args=())
def psg_project(
    a: torch.Tensor,
    g: torch.Tensor,
    seg_ptr: torch.Tensor,
    order: torch.Tensor,
    conv: list[int],
    has_bias: bool,
    w_offset: int,
    b_offset: int,
    k: int,
    kind: str,
    key0: int,
    key1: int,
    stream: int,
    backend: str,
) -> torch.Tensor:
    """Projected per-sample gradients of one layer call, ``[B, k]`` float32.

    Arguments are validated by ``fastattr.psg.psg_project`` (contiguous ``a``/``g``, see its
    layouts); ``backend`` is resolved.
    """
    impl = implementation(backend, "psg", "psg_project")
    return impl(a, g, seg_ptr, order, tuple(conv), has_bias, w_offset, b_offset, k, kind,
                (key0, key1), stream)


@psg_project.register_fake
def _psg_project_fake(a, g, seg_ptr, order, conv, has_bias, w_offset, b_offset, k, kind, key0,
                      key1, stream, backend):
    return a.new_empty((seg_ptr.shape[0] - 1, k), dtype=torch.float32)


@torch.library.custom_op("fastattr::psg_matmul", mutates_args=())
def psg_matmul(
    a: torch.Tensor,
    g: torch.Tensor,
    seg_ptr: torch.Tensor,
    order: torch.Tensor,
    conv: list[int],
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    """``<G_b, Q_j>`` for every sample b and matrix j, ``[B, q]`` float32.

    Arguments are validated by ``fastattr.psg.psg_matmul``; ``backend`` is resolved.
    """
    impl = implementation(backend, "psg", "psg_matmul")
    return impl(a, g, seg_ptr, order, tuple(conv), q_weight, q_bias)


@psg_matmul.register_fake
def _psg_matmul_fake(a, g, seg_ptr, order, conv, q_weight, q_bias, backend):
    return a.new_empty((seg_ptr.shape[0] - 1, q_weight.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastattr::covariance", mutates_args=())
def covariance(x: torch.Tensor, conv: list[int], reduce: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S [G, F, F], s [G, F])`` float32: second moments and sums of the rows of ``x``
    (conv patches formed in the kernel). Validated by ``fastattr.factor_ops.covariance``."""
    impl = implementation(backend, "curvature", "covariance")
    return impl(x, tuple(conv), reduce)


@covariance.register_fake
def _covariance_fake(x, conv, reduce, backend):
    groups, features = covariance_shape(x, conv)
    return (x.new_empty((groups, features, features), dtype=torch.float32),
            x.new_empty((groups, features), dtype=torch.float32))


@torch.library.custom_op("fastattr::covariance_add", mutates_args=("packed", "sums"))
def covariance_add(x: torch.Tensor, conv: list[int], reduce: bool, packed: torch.Tensor,
                   sums: torch.Tensor, backend: str) -> None:
    """``packed += pack_upper(S)``, ``sums += s`` in float64 for ``covariance``'s ``(S, s)``.
    The cpu kernel adds into the running sums itself; other backends run their
    ``covariance`` and pack (``fastattr.reference.curvature.add_packed``). Validated by
    ``fastattr.factor_ops.covariance_add``."""
    if backend == "cpu":
        return implementation(backend, "curvature", "covariance_add")(
            x, tuple(conv), reduce, packed, sums)
    S, s = implementation(backend, "curvature", "covariance")(x, tuple(conv), reduce)
    add_packed(S, s, packed, sums)


@covariance_add.register_fake
def _covariance_add_fake(x, conv, reduce, packed, sums, backend):
    return None


@torch.library.custom_op("fastattr::ekfac_lambda", mutates_args=())
def ekfac_lambda(a: torch.Tensor, g: torch.Tensor, backend: str) -> torch.Tensor:
    """``[O, F]`` float32: ``sum_n (g_n^T a_n)^2``. Validated by
    ``fastattr.factor_ops.ekfac_lambda``."""
    impl = implementation(backend, "curvature", "ekfac_lambda")
    return impl(a, g)


@ekfac_lambda.register_fake
def _ekfac_lambda_fake(a, g, backend):
    return a.new_empty((g.shape[2], a.shape[2]), dtype=torch.float32)
