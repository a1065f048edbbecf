"""fastattr's projector as a drop-in ``trak`` projector (``pip install traker``).

Usage with trak's ``TRAKer``::

    from fastattr.integrations.trak import FastattrProjector

    projector = FastattrProjector.for_model(model, proj_dim=2048, seed=0, device="cuda")
    traker = TRAKer(model, task, train_set_size, projector=projector, ...)

TRAKer takes the projector as it is (its CPU/CUDA projector choice applies only when
``projector`` is None) and uses from it: ``proj_dim`` (TRAKer's ``proj_dim`` argument is
then ignored), ``proj_type`` (recorded in save_dir's metadata), ``project(grads,
model_id=...)`` with the dict of per-parameter gradients of its gradient computer (after
``grad_wrt`` filtering) and the checkpoint's model id, and ``free_memory()``. It divides
the result by sqrt(number of parameters) in place and stores it in its own dtype.
``grad_dim`` must be that number of parameters (``for_model`` computes it as TRAKer does).
trak's save_dir metadata records only the matrix kind, not whose matrix it is: do not mix
projectors of different libraries in one save_dir.

Importing this module needs trak (it subclasses ``trak.projectors.AbstractProjector``);
importing ``fastattr`` never does.

Differences from trak's own projectors, all deliberate:

* The matrix is fastattr's: a pure function of ``(seed, model_id, kind, proj_dim)``
  (Philox, shared/DESIGN.md), the same on every backend, batch split and GPU model.
  Its entries therefore differ from trak's ``BasicProjector`` (torch generator) and
  ``CudaProjector`` (fast_jl, whose matrix depends on the GPU's SM count); the
  distribution is the same. ``model_id`` selects an independent matrix through a
  mixed key (trak uses ``seed + 1e4 * model_id`` or ``seed + 1e5 * model_id``, which
  collide across seeds and models).
* The input is never down-cast: fp32/bf16/fp16 gradients are read in their own
  precision and accumulated in fp32. Only the result is stored in ``dtype`` (what
  trak's projectors return and TRAKer stores), so ``dtype=torch.float16`` rounds the
  projected features once, never the gradients.
* The result stays on the input's device (trak's projectors move it to ``device``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

try:
    from trak.projectors import AbstractProjector, ProjectionType
except ImportError as _exc:  # pragma: no cover - exercised only without trak
    raise ImportError(
        "fastattr.integrations.trak needs trak: `pip install traker` "
        f"(importing trak.projectors failed: {_exc})"
    ) from _exc

from ..backends import check_backend_name
from ..projection import Projector
from ._args import as_index

__all__ = ["FastattrProjector", "ProjectionType"]

_KIND_OF = {"rademacher": "rademacher", "normal": "gaussian", "gaussian": "gaussian"}


def _projection_type(proj_type) -> ProjectionType:
    """trak's ``ProjectionType`` (or its value, or fastattr's "gaussian") -> ProjectionType."""
    value = proj_type.value if isinstance(proj_type, ProjectionType) else proj_type
    if not isinstance(value, str) or value not in _KIND_OF:
        raise ValueError(
            f"proj_type must be ProjectionType.rademacher / ProjectionType.normal or one of "
            f"'rademacher', 'normal' ('gaussian' is accepted as 'normal'), got {proj_type!r}"
        )
    return ProjectionType.normal if _KIND_OF[value] == "gaussian" else ProjectionType.rademacher





def _features_per_sample(grads) -> int:
    """Number of input features per sample of a Tensor [B, p] or a dict/list of [B, ...]."""
    if isinstance(grads, torch.Tensor):
        return grads.shape[1] if grads.dim() == 2 else -1  # Projector explains the bad rank
    if isinstance(grads, Mapping):
        values = list(grads.values())
    elif isinstance(grads, Sequence) and not isinstance(grads, (str, bytes)):
        values = list(grads)
    else:
        raise TypeError(
            f"grads must be a Tensor [B, grad_dim] or a dict of per-parameter tensors "
            f"[B, ...], got {type(grads).__name__}"
        )
    return sum(math.prod(t.shape[1:]) for t in values if isinstance(t, torch.Tensor))


class FastattrProjector(AbstractProjector):
    """trak projector backed by ``fastattr.Projector`` (matrix generated on the fly).

    Args:
        grad_dim: number of gradient entries per sample (the input dimension p).
        proj_dim: output dimension k.
        seed: seed of the matrix (any int in [0, 2**64)).
        proj_type: ``ProjectionType.rademacher`` / ``ProjectionType.normal`` or the strings
            ``"rademacher"`` / ``"normal"`` (``"gaussian"`` also accepted).
        device: recorded as trak records it; computation happens on the input's device.
        dtype: dtype of the returned features (trak's projectors return their ``dtype``;
            TRAKer stores features in it). Accumulation is always fp32.
        backend: fastattr backend (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``,
            ``"reference"``).
        ensemble_id: the model id used when ``project`` is called without ``model_id``.
            ``model_id=`` (the keyword of trak's ``BasicProjector``) is an alias.
        normalize: ``False`` (default, trak's convention): entries are +-1 (Rademacher) or
            N(0, 1), as in trak's ``BasicProjector`` and ``CudaProjector``, so TRAKer's
            ``normalize_factor``, ``lambda_reg`` and fp16 storage see the magnitudes they
            were written for. ``True``: fastattr's JL scaling, entries / sqrt(proj_dim),
            ``E ||R^T g||^2 = ||g||^2`` (exactly ``fastattr.Projector.project``).
        check_finite: raise ``ValueError`` on NaN/Inf gradients.
        max_batch_size, block_size: accepted for signature compatibility with trak's
            ``CudaProjector`` / ``BasicProjector`` (TRAKer passes ``max_batch_size``);
            fastattr needs no batch or block tiling from the caller, so they are unused.

    Example::

        import torch
        from fastattr.integrations.trak import FastattrProjector

        proj = FastattrProjector(grad_dim=1000, proj_dim=256, seed=0, proj_type="rademacher")
        feats = proj.project(torch.randn(8, 1000), model_id=0)   # Tensor[8, 256]
    """

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        proj_type=ProjectionType.rademacher,
        device="cpu",
        dtype: torch.dtype = torch.float32,
        *,
        backend: str = "auto",
        ensemble_id: int = 0,
        model_id: int | None = None,
        normalize: bool = False,
        check_finite: bool = False,
        max_batch_size: int | None = None,
        block_size: int | None = None,
    ) -> None:
        grad_dim = as_index("grad_dim", grad_dim)
        proj_dim = as_index("proj_dim", proj_dim)
        seed = as_index("seed", seed)
        if grad_dim < 1:
            raise ValueError(f"grad_dim must be >= 1, got {grad_dim}")
        if model_id is not None:
            ensemble_id = model_id
        ensemble_id = as_index("ensemble_id", ensemble_id)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        super().__init__(grad_dim, proj_dim, seed, _projection_type(proj_type), device)
        check_backend_name(backend)
        self.dtype = dtype
        self.backend = backend
        self.ensemble_id = ensemble_id
        self.normalize = bool(normalize)
        self.check_finite = bool(check_finite)
        self.max_batch_size = max_batch_size
        self.block_size = block_size
        self._projectors: dict[int, Projector] = {}
        # Validates proj_dim, seed, ensemble_id and backend now rather than at the first call.
        self.projector(ensemble_id)

    @classmethod
    def for_model(cls, model: torch.nn.Module, proj_dim: int, seed: int = 0,
                  proj_type=ProjectionType.rademacher, device="cpu",
                  dtype: torch.dtype = torch.float32, *, grad_wrt=None,
                  **kwargs) -> FastattrProjector:
        """A projector whose ``grad_dim`` is the gradient size TRAKer computes for ``model``.

        That is the number of entries of ``model.named_parameters()`` (trak's gradient
        computer differentiates all of them), or of the parameters named in ``grad_wrt``
        (the list given to ``TRAKer(grad_wrt=...)``). Other arguments as ``__init__``.

        Example::

            projector = FastattrProjector.for_model(model, 2048, grad_wrt=["fc.weight"])
            traker = TRAKer(model, task, n_train, projector=projector,
                            grad_wrt=["fc.weight"], device="cuda")
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        if grad_wrt is None:
            names = list(params)
        else:
            if isinstance(grad_wrt, str) or not isinstance(grad_wrt, Iterable):
                raise TypeError(
                    f"grad_wrt must be a list of parameter names, got {type(grad_wrt).__name__}"
                )
            names = list(grad_wrt)
            unknown = [name for name in names if name not in params]
            if unknown:
                raise ValueError(f"grad_wrt names no parameter of model: {unknown}")
        grad_dim = sum(params[name].numel() for name in names)
        return cls(grad_dim, proj_dim, seed, proj_type, device, dtype, **kwargs)

    @property
    def kind(self) -> str:
        """fastattr's name of the matrix kind: ``"rademacher"`` or ``"gaussian"``."""
        return _KIND_OF[self.proj_type.value]

    def projector(self, model_id: int) -> Projector:
        """The ``fastattr.Projector`` of ``model_id`` (created once, then cached).

        Example::

            fastattr_proj = FastattrProjector(1000, 256).projector(model_id=0)
        """
        model_id = as_index("model_id", model_id)
        proj = self._projectors.get(model_id)
        if proj is None:
            proj = Projector(
                self.proj_dim,
                kind=self.kind,
                seed=self.seed,
                ensemble_id=model_id,
                backend=self.backend,
                check_finite=self.check_finite,
            )
            self._projectors[model_id] = proj
        return proj

    def project(self, grads, model_id: int | None = None) -> torch.Tensor:
        """Project ``grads`` -> ``Tensor[B, proj_dim]`` in ``self.dtype`` on the input's device.

        ``grads`` is a ``Tensor[B, grad_dim]`` or a dict of per-parameter gradients
        ``{name: [B, ...]}`` (projected as their flattened concatenation in dict order,
        without building it). ``model_id`` selects the matrix (default ``ensemble_id``).

        Example::

            proj = FastattrProjector(grad_dim=12, proj_dim=4)
            grads = {"w": torch.randn(2, 3, 3), "b": torch.randn(2, 3)}
            proj.project(grads, model_id=1)   # == proj.project(flat [2, 12], model_id=1)
        """
        features = _features_per_sample(grads)
        if features >= 0 and features != self.grad_dim:
            raise ValueError(
                f"grads has {features} entries per sample, but this projector was built "
                f"for grad_dim={self.grad_dim}"
            )
        proj = self.projector(self.ensemble_id if model_id is None else model_id)
        out = proj.project(grads)
        if not self.normalize:
            out.mul_(math.sqrt(self.proj_dim))
        return out if out.dtype == self.dtype else out.to(self.dtype)

    def free_memory(self) -> None:
        """Drop the cached per-model projectors (fastattr stores no matrix to free).

        TRAKer calls it before finalizing features; the next ``project`` rebuilds the
        same matrices.

        Example::

            proj.free_memory()
        """
        self._projectors.clear()

    def __repr__(self) -> str:
        return (
            f"FastattrProjector(grad_dim={self.grad_dim}, proj_dim={self.proj_dim}, "
            f"seed={self.seed}, proj_type={self.proj_type.value!r}, dtype={self.dtype}, "
            f"backend={self.backend!r}, normalize={self.normalize})"
        )
