"""fastattr's ops as ``torch.library`` custom ops, so they trace under ``torch.compile``.

Each op is registered once here with a fake (meta) implementation; the real implementation
dispatches to the backend chosen by ``fastattr.backends.select_backend``.
"""

from __future__ import annotations

import torch

from .kernels import implementation

__all__ = ["project"]


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
