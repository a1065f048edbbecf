"""The diffusion-loss protocol of shared/METHODS.md: timesteps and noise keyed by sample id.

Every (x, t, ε) triple is one datum. For an example with stable id ``i`` and draw ``j < K``:

- timestep ``t_ij``: ``uniform`` = ``j * T // K`` (the D-TRAK grid); ``random`` = K i.i.d.
  draws keyed by (seed, i) from the Philox generator (stream ``TIMESTEP``);
- noise ``ε(i, t)``: Philox Gaussian entries (stream ``NOISE``) at row ``i * T + t`` of the
  generator's matrix, so features never depend on batch size, order or position;
- the datum id is ``i * K + j`` (it keys the GGN-model random output vectors).

``DiffusionLoss`` turns a batch of clean images into these rows for the curvature module
(``fastattr.curvature.fit_factors``): model outputs ``ε_θ(x_t, t)`` and targets ``ε``; the
per-datum loss is ``mean_pixels (ε_θ − ε)²``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import rng
from .backends import select_backend
from .kernels import implementation

__all__ = ["Rows", "DiffusionLoss", "ddpm_alphas_cumprod", "timesteps", "noise"]

TIMESTEP_SETS = ("uniform", "random")


class Rows(NamedTuple):
    """The data of one batch: ``outputs [N, ...]`` (model outputs, part of the autograd
    graph), ``targets [N, ...]`` (same shape; the loss is the mean squared error over the
    non-leading dims) and ``ids`` (``int64 [N]`` stable datum ids, or ``None``)."""

    outputs: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor | None = None


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t of DDPM's linear schedule (float64 ``[T]``), as diffusers' ``DDPMScheduler``."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def _ids_tensor(ids, name: str = "ids") -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be a 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(ids.min())}")
    return ids.to(torch.int64)


def timesteps(ids, K: int, T: int, kind: str = "random", seed: int = 0) -> torch.Tensor:
    """``int64 [len(ids), K]``: the K timesteps of each example (see the module docstring).

    Example::

        t = timesteps(torch.arange(4), K=10, T=1000, kind="uniform")   # rows 0, 100, ..., 900
    """
    ids = _ids_tensor(ids)
    if kind not in TIMESTEP_SETS:
        raise ValueError(f"kind must be one of {TIMESTEP_SETS}, got {kind!r}")
    if kind == "uniform":
        grid = torch.arange(K, dtype=torch.int64) * T // K
        return grid.expand(ids.numel(), K).to(ids.device).clone()
    k0, k1 = rng.philox_key(seed)
    c0 = (ids & rng.MASK32).reshape(-1, 1)
    c1 = (ids >> 32).reshape(-1, 1)
    blocks = torch.arange((K + 3) // 4, dtype=torch.int64, device=ids.device)
    words = torch.stack(rng.philox4x32_10(c0, c1, blocks, int(rng.Stream.TIMESTEP), k0, k1), -1)
    return (words.reshape(ids.numel(), -1)[:, :K] % T).to(torch.int64)


def noise(ids, t, shape, T: int, seed: int = 0, backend: str = "auto") -> torch.Tensor:
    """``float32 [N, *shape]``: the noise ``ε(ids[r], t[r])`` of every row (unit Gaussian).

    Example::

        eps = noise(ids, t, (1, 8, 8), T=1000)
    """
    ids, t = _ids_tensor(ids), _ids_tensor(t, "t").to(ids.device)
    if ids.shape != t.shape:
        raise ValueError(f"ids {tuple(ids.shape)} and t {tuple(t.shape)} must have one entry per row")
    if t.numel() and int(t.max()) >= T:
        raise ValueError(f"t must be < T={T}, got {int(t.max())}")
    d = math.prod(shape)
    materialize = implementation(select_backend(backend, ids.device), "project", "materialize")
    rows = materialize(ids * T + t, d, "gaussian", rng.philox_key(seed), int(rng.Stream.NOISE))
    # materialize scales by 1/sqrt(d) (rounded to fp32): undo it for unit variance
    return (rows * (1.0 / rng.projection_scale(d))).reshape(ids.numel(), *shape)


class DiffusionLoss:
    """Rows of the DDPM loss for ``fastattr.curvature.fit_factors``: each example gives
    ``samples_per_example`` (x_t, t, ε) data.

    Args:
        alphas_cumprod: ᾱ_t (``[T]``); default DDPM's linear schedule with T = 1000 (pass
            ``scheduler.alphas_cumprod`` of a diffusers scheduler to match it).
        timesteps: "random" (K draws keyed by id) or "uniform" (the grid ``j*T//K``).
        noise_seed: seed of the noise and timestep generators.

    A batch is ``(images, ids)`` or ``(images, ids, class_labels)`` (labels are passed to the
    model as ``class_labels``); the model is called as ``model(x_t, t)`` and its ``.sample``
    is used when it has one (diffusers ``UNet2DModel``).

    Example::

        loss = DiffusionLoss(timesteps="uniform")
        factors = fastattr.curvature.fit_factors(unet, loader, loss, samples_per_example=10)
    """

    def __init__(self, alphas_cumprod=None, timesteps: str = "random", noise_seed: int = 0):
        if timesteps not in TIMESTEP_SETS:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SETS}, got {timesteps!r}")
        abar = ddpm_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
        if abar.dim() != 1 or abar.numel() < 1 or not bool(((abar > 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
        self.alphas_cumprod = abar.to(torch.float64)
        self.timesteps = timesteps
        self.noise_seed = int(noise_seed)

    def config(self) -> dict:
        """What determines the rows (recorded with fitted factors)."""
        return {"loss": "ddpm", "T": self.alphas_cumprod.numel(), "timesteps": self.timesteps,
                "noise_seed": self.noise_seed}

    def __call__(self, model, batch, samples_per_example: int = 1) -> Rows:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError("a DiffusionLoss batch is (images, ids) or (images, ids, class_labels)")
        x0, ids = batch[0], _ids_tensor(batch[1])
        if x0.shape[0] != ids.numel():
            raise ValueError(f"images has {x0.shape[0]} rows but ids has {ids.numel()}")
        K, T = samples_per_example, self.alphas_cumprod.numel()
        t = timesteps(ids, K, T, self.timesteps, self.noise_seed).reshape(-1).to(x0.device)
        rid = ids.repeat_interleave(K).to(x0.device)
        eps = noise(rid, t, x0.shape[1:], T, self.noise_seed).to(x0.dtype)
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).reshape(-1, *[1] * (x0.dim() - 1))
        x_t = abar.sqrt() * x0.repeat_interleave(K, dim=0) + (1 - abar).sqrt() * eps
        kwargs = {}
        if len(batch) == 3:
            kwargs["class_labels"] = batch[2].repeat_interleave(K, dim=0)
        out = model(x_t, t, **kwargs)
        out = getattr(out, "sample", out)
        draw = torch.arange(K, device=x0.device).repeat(ids.numel())
        return Rows(out, eps, rid * K + draw)
