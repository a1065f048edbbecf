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

``DiffusionTask`` is what the attribution methods (``fastattr.methods``) attribute: a model
(diffusers ``UNet2DModel`` / ``UNet2DConditionModel``, a peft-LoRA-adapted one, or any
``nn.Module`` through ``model_fn``), its noise schedule, the output function f of
shared/METHODS.md, the timestep set and the attributed parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import rng
from .backends import select_backend
from .kernels import implementation

__all__ = ["Rows", "DiffusionLoss", "DiffusionTask", "Trajectory", "ddpm_alphas_cumprod", "timesteps",
           "noise", "output_values", "OUTPUTS"]

TIMESTEP_SETS = ("uniform", "random")
OUTPUTS = ("loss", "square", "mean", "l1", "l2", "linf", "elbo")


class Rows(NamedTuple):
    """The data of one batch: ``outputs [N, ...]`` (model outputs, part of the autograd
    graph), ``targets [N, ...]`` (same shape; the loss is the mean squared error over the
    non-leading dims) and ``ids`` (``int64 [N]`` stable datum ids, or ``None``).

    Example::

        rows = Rows(model(x), y, ids)      # what a fit_factors loss returns
    """

    outputs: torch.Tensor
    targets: torch.Tensor
    ids: torch.Tensor | None = None


def ddpm_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t of DDPM's linear schedule (float64 ``[T]``), as diffusers' ``DDPMScheduler``.

    Example::

        abar = ddpm_alphas_cumprod(1000)
    """
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


def _condition_kwargs(cond, num_images: int, K: int) -> dict:
    """The model's keyword arguments for a batch's condition, each repeated K times.

    ``cond`` is None, an integer tensor (``class_labels``), a floating tensor
    (``encoder_hidden_states``, text conditioning) or a dict of keyword -> tensor; every tensor
    has one entry per image (leading dim B).
    """
    if cond is None:
        return {}
    if isinstance(cond, torch.Tensor):
        cond = {("encoder_hidden_states" if cond.is_floating_point() else "class_labels"): cond}
    if not isinstance(cond, dict):
        raise TypeError("a batch's condition must be a Tensor (integer: class_labels, float: "
                        f"encoder_hidden_states) or a dict of model keyword arguments, got "
                        f"{type(cond).__name__}")
    out = {}
    for key, value in cond.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != num_images:
            raise ValueError(f"condition {key!r} must be a Tensor with one entry per image "
                             f"({num_images}), got {getattr(value, 'shape', type(value).__name__)}")
        out[key] = value.repeat_interleave(K, dim=0)
    return out


def _unpack_batch(batch, what: str = "a batch"):
    """``(images, ids)`` or ``(images, ids, condition)`` -> (images, int64 ids, condition)."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise TypeError(f"{what} is (images, ids) or (images, ids, condition), got "
                        f"{type(batch).__name__}")
    x0, ids = batch[0], _ids_tensor(batch[1])
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 2:
        raise TypeError(f"the images of {what} must be a floating Tensor [B, ...], got "
                        f"{getattr(x0, 'dtype', type(x0).__name__)}")
    if x0.shape[0] != ids.numel():
        raise ValueError(f"images has {x0.shape[0]} rows but ids has {ids.numel()}")
    return x0, ids, (batch[2] if len(batch) == 3 else None)


def _call_model(model, x_t, t, kwargs):
    out = model(x_t, t, **kwargs)
    return getattr(out, "sample", out)


class _Noised(NamedTuple):
    """The K noisy rows of a batch of B images: ``x_t``, ``t``, ``eps`` (``[N = B*K, ...]``),
    the model's condition kwargs (repeated), the row's image id and draw index ``j < K``."""

    x_t: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    cond: dict
    rid: torch.Tensor
    draw: torch.Tensor


def _noised(x0, ids, cond, K: int, abar: torch.Tensor, kind: str, seed: int,
            at: torch.Tensor | None = None) -> _Noised:
    """The K noisy rows of every image; ``at`` ([B] timesteps, K = 1) fixes the timesteps."""
    T = abar.numel()
    if at is None:
        t = timesteps(ids, K, T, kind, seed).reshape(-1).to(x0.device)
    else:
        t = _ids_tensor(at, "t").to(x0.device)
        if t.numel() != ids.numel() or K != 1:
            raise ValueError(f"t must hold one timestep per image ({ids.numel()}), got "
                             f"{t.numel()}")
        if t.numel() and int(t.max()) >= T:
            raise ValueError(f"t must be < T={T}, got {int(t.max())}")
    rid = ids.repeat_interleave(K).to(x0.device)
    eps = noise(rid, t, x0.shape[1:], T, seed).to(x0.dtype)
    a = abar.to(x0.device)[t].to(x0.dtype).reshape(-1, *[1] * (x0.dim() - 1))
    x_t = a.sqrt() * x0.repeat_interleave(K, dim=0) + (1 - a).sqrt() * eps
    draw = torch.arange(K, device=x0.device).repeat(ids.numel())
    return _Noised(x_t, t, eps, _condition_kwargs(cond, ids.numel(), K), rid, draw)


def _check_alphas(abar) -> torch.Tensor:
    abar = torch.as_tensor(abar)
    if abar.dim() != 1 or abar.numel() < 1 or not bool(((abar > 0) & (abar <= 1)).all()):
        raise ValueError("alphas_cumprod must be a 1-D tensor of values in (0, 1]")
    return abar.to(torch.float64)


class DiffusionLoss:
    """Rows of the DDPM loss for ``fastattr.curvature.fit_factors``: each example gives
    ``samples_per_example`` (x_t, t, ε) data.

    Args:
        alphas_cumprod: ᾱ_t (``[T]``); default DDPM's linear schedule with T = 1000 (pass
            ``scheduler.alphas_cumprod`` of a diffusers scheduler to match it).
        timesteps: "random" (K draws keyed by id) or "uniform" (the grid ``j*T//K``).
        noise_seed: seed of the noise and timestep generators.
        model_fn: ``model_fn(model, x_t, t, **condition) -> ε_θ``; default calls
            ``model(x_t, t, **condition)`` and takes ``.sample`` when there is one.

    A batch is ``(images, ids)`` or ``(images, ids, condition)``: an integer condition is
    passed as ``class_labels``, a floating one as ``encoder_hidden_states``, a dict as
    keyword arguments (each repeated for the K rows of its image).

    Example::

        loss = DiffusionLoss(timesteps="uniform")
        factors = fastattr.curvature.fit_factors(unet, loader, loss, samples_per_example=10)
    """

    def __init__(self, alphas_cumprod=None, timesteps: str = "random", noise_seed: int = 0,
                 model_fn=None):
        if timesteps not in TIMESTEP_SETS:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SETS}, got {timesteps!r}")
        if model_fn is not None and not callable(model_fn):
            raise TypeError("model_fn must be a callable (model, x_t, t, **condition) -> eps")
        self.alphas_cumprod = _check_alphas(ddpm_alphas_cumprod() if alphas_cumprod is None
                                            else alphas_cumprod)
        self.timesteps = timesteps
        self.noise_seed = int(noise_seed)
        self.model_fn = model_fn

    def config(self) -> dict:
        """What determines the rows (recorded with fitted factors).

        Example::

            DiffusionLoss(timesteps="uniform").config()["timesteps"]    # 'uniform'
        """
        return {"loss": "ddpm", "T": self.alphas_cumprod.numel(), "timesteps": self.timesteps,
                "noise_seed": self.noise_seed}

    def __call__(self, model, batch, samples_per_example: int = 1) -> Rows:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise TypeError("a DiffusionLoss batch is (images, ids) or (images, ids, class_labels)")
        x0, ids, cond = _unpack_batch(batch, "a DiffusionLoss batch")
        K = samples_per_example
        rows = _noised(x0, ids, cond, K, self.alphas_cumprod, self.timesteps, self.noise_seed)
        if self.model_fn is None:
            out = _call_model(model, rows.x_t, rows.t, rows.cond)
        else:
            out = self.model_fn(model, rows.x_t, rows.t, **rows.cond)
        return Rows(out, rows.eps, rows.rid * K + rows.draw)


# ------------------------------------------------------------------------ output functions


def ddpm_betas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """β_t from ᾱ_t: ``β_t = 1 − ᾱ_t / ᾱ_{t−1}`` (``ᾱ_{−1} = 1``).

    Example::

        betas = ddpm_betas(ddpm_alphas_cumprod())     # linspace(1e-4, 0.02, 1000)
    """
    abar = alphas_cumprod.to(torch.float64)
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1 - abar / prev


def elbo_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``w_t = β_t / (2 α_t (1 − ᾱ_t))`` (float64 ``[T]``), the ELBO weight of the ε-loss.

    Example::

        w = elbo_weights(scheduler.alphas_cumprod)
    """
    abar = alphas_cumprod.to(torch.float64)
    beta = ddpm_betas(abar)
    return beta / (2 * (1 - beta) * (1 - abar))


def output_values(output, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                  alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row values ``[N]`` of an output function of shared/METHODS.md.

    ``output`` is one of ``OUTPUTS`` -- ``loss`` (mean over pixels of ``(ε_θ − ε)²``),
    ``square`` (mean ``ε_θ²``), ``mean`` (mean ``ε_θ``), ``l1`` (``Σ|ε_θ|``), ``l2``
    (``‖ε_θ‖₂``), ``linf`` (``max|ε_θ|``), ``elbo`` (``w_t · loss``) -- or a callable
    ``output(pred, target, t) -> Tensor[N]``. ``pred`` is ``ε_θ(x_t, t)``, ``target`` ε.

    Example::

        f = output_values("square", eps_pred, eps, t)       # D-TRAK's output function
    """
    if callable(output):
        return output(pred, target, t)
    p = pred.flatten(1)
    if output == "loss":
        return (p - target.flatten(1)).pow(2).mean(1)
    if output == "square":
        return p.pow(2).mean(1)
    if output == "mean":
        return p.mean(1)
    if output == "l1":
        return p.abs().sum(1)
    if output == "l2":
        return p.pow(2).sum(1).sqrt()
    if output == "linf":
        return p.abs().amax(1)
    if output == "elbo":
        abar = ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        w = elbo_weights(abar).to(pred.device)[t].to(pred.dtype)
        return w * (p - target.flatten(1)).pow(2).mean(1)
    raise ValueError(f"output must be one of {OUTPUTS} or a callable (pred, target, t) -> "
                     f"Tensor[N], got {output!r}")


def _check_output(output, name: str = "output"):
    if not callable(output) and output not in OUTPUTS:
        raise ValueError(f"unknown {name} {output!r}: expected one of {OUTPUTS} or a callable "
                         "(pred, target, t) -> Tensor[N]")
    return output


def _output_name(output) -> str:
    if isinstance(output, str):
        return output
    return f"{getattr(output, '__module__', '?')}.{getattr(output, '__qualname__', repr(output))}"


# ------------------------------------------------------------------------------ the task


def _alphas_of(scheduler, alphas_cumprod):
    if scheduler is not None and alphas_cumprod is not None:
        raise ValueError("give scheduler or alphas_cumprod, not both")
    if scheduler is None:
        return _check_alphas(ddpm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"scheduler must be a diffusers DDPM/DDIM scheduler (with alphas_cumprod),"
                        f" got {type(scheduler).__name__}")
    config = getattr(scheduler, "config", {})
    prediction = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
    if prediction != "epsilon":
        raise ValueError(f"scheduler.config.prediction_type is {prediction!r}: fastattr's output "
                         "functions are defined for ε-prediction models ('epsilon')")
    return _check_alphas(scheduler.alphas_cumprod)


def _expected_image_shape(model, sample_shape):
    if sample_shape is not None:
        return tuple(int(s) for s in sample_shape)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get") or config.get("in_channels") is None:
        return None
    size = config.get("sample_size")
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(config["in_channels"]), int(h), int(w))


class Trajectory(NamedTuple):
    """A DDIM sampling run of n samples over S steps: ``latents [n, S, C, H, W]`` (x_t fed
    to the model at each step), ``steps [S]`` (their timesteps, descending),
    ``x0_hat [n, S, C, H, W]`` (the model's prediction of x_0 at each step), ``images``
    (the final samples) and ``ids`` (sample ids keying the noise of per-step features).

    Example::

        traj = task.sample(4, num_steps=20)
        traj.x0_hat[:, -1]          # the last step's prediction of x_0
    """

    latents: torch.Tensor
    steps: torch.Tensor
    x0_hat: torch.Tensor
    images: torch.Tensor
    ids: torch.Tensor


def _lora_filter(name, p):
    return "lora_" in name


class DiffusionTask:
    """What the attribution methods attribute: a diffusion model, its noise schedule, the
    output function f, the K timesteps per example and the attributed parameters.

    Args:
        model: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (LoRA-adapted with peft
            or not), or any ``nn.Module`` called through ``model_fn``.
        output: the output function f (``OUTPUTS`` or a callable ``(pred, target, t) ->
            Tensor[N]``, see ``output_values``): "loss" for TRAK / TracIn / influence,
            "square" for D-TRAK.
        samples_per_example: K, the (t, ε) draws of each example; a feature is the average
            of the K gradients (``g(x) = (1/K) Σ_t ∇f``).
        timesteps: "uniform" (the D-TRAK grid ``j*T//K``) or "random" (K draws keyed by id).
        scheduler: a diffusers DDPM / DDIM scheduler (ε-prediction) giving ᾱ_t; or pass
            ``alphas_cumprod`` directly; default DDPM's linear schedule with T = 1000.
        noise_seed: seed of the noise ``ε(id, t)`` and random timesteps (Philox; never the
            batch position, so features do not depend on batch size or order).
        params: the attributed parameters: None (every parameter with ``requires_grad``,
            which for a peft model is its LoRA adapters), "lora" (names containing
            ``lora_``), a list of names or a filter ``(name, param) -> bool``.
        model_fn: ``model_fn(model, x_t, t, **condition) -> ε_θ`` for any model; default
            ``model(x_t, t, **condition)`` (``.sample`` taken when there is one).
        sample_shape: the image shape ``(C, H, W)`` the model takes (read from a diffusers
            model's config when not given); inputs of another shape are refused.

    Data are ``(images, ids)`` or ``(images, ids, condition)`` batches (ids: stable int64
    sample ids; an integer condition is ``class_labels``, a floating one
    ``encoder_hidden_states``, a dict is passed as keyword arguments), or a whole dataset
    as a Tensor of images (ids ``0..n−1``) or such a tuple, split by ``batch_size``.

    Example::

        from diffusers import DDPMScheduler
        task = DiffusionTask(unet, output="square", samples_per_example=10,
                             scheduler=DDPMScheduler(num_train_timesteps=1000))
        feats = task.features((images, ids), fastattr.Projector(k=2048))   # [B, 2048]
    """

    def __init__(self, model, *, output="loss", samples_per_example: int = 10,
                 timesteps: str = "uniform", scheduler=None, alphas_cumprod=None,
                 noise_seed: int = 0, params=None, model_fn=None, sample_shape=None):
        from torch import nn

        from .capture import select_params

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.output = _check_output(output)
        if isinstance(samples_per_example, bool) or not isinstance(samples_per_example, int) \
                or samples_per_example < 1:
            raise ValueError(f"samples_per_example must be an int >= 1, got "
                             f"{samples_per_example!r}")
        if timesteps not in TIMESTEP_SETS:
            raise ValueError(f"timesteps must be one of {TIMESTEP_SETS}, got {timesteps!r}")
        if model_fn is not None and not callable(model_fn):
            raise TypeError("model_fn must be a callable (model, x_t, t, **condition) -> eps")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
            raise TypeError(f"noise_seed must be an int, got {noise_seed!r}")
        self.model = model
        self.K = samples_per_example
        self.timesteps = timesteps
        self.alphas_cumprod = _alphas_of(scheduler, alphas_cumprod)
        self.noise_seed = noise_seed
        self.model_fn = model_fn
        if params == "lora":
            params = _lora_filter
            if not any("lora_" in n for n, _ in model.named_parameters()):
                raise ValueError("params='lora' but the model has no LoRA parameters (names "
                                 "containing 'lora_'); add an adapter with peft first")
        self.params = list(select_params(model, params))
        self.sample_shape = _expected_image_shape(model, sample_shape)

    @property
    def T(self) -> int:
        """The number of diffusion timesteps of the schedule.

        Example::

            task.T        # 1000 for DDPM
        """
        return self.alphas_cumprod.numel()

    def __repr__(self) -> str:
        return (f"DiffusionTask({type(self.model).__name__}, output={_output_name(self.output)}"
                f", K={self.K}, timesteps={self.timesteps}, {len(self.params)} parameters)")

    def config(self, output=None) -> dict:
        """What determines the features (recorded in feature stores).

        Example::

            task.config()   # {'output': 'loss', 'K': 10, 'timesteps': 'uniform', ...}
        """
        return {"output": _output_name(self.output if output is None else output), "K": self.K,
                "timesteps": self.timesteps, "T": self.T, "noise_seed": self.noise_seed,
                "model_fn": None if self.model_fn is None else _output_name(self.model_fn)}

    def fingerprint(self, model=None) -> dict:
        """The attributed parameters' names, shapes and a digest of their values.

        Example::

            digest = task.fingerprint()["weights_sha256"]
        """
        from .curvature import fingerprint

        return fingerprint(self.model if model is None else model, self.params)

    def with_model(self, model) -> "DiffusionTask":
        """The same task on another model with the same parameters (a checkpoint or an
        ensemble member).

        Example::

            tasks = [task.with_model(m) for m in checkpoints]
        """
        import copy

        names = dict(model.named_parameters())
        missing = [n for n in self.params if n not in names]
        if missing:
            raise ValueError(f"model lacks the task's attributed parameters {missing[:5]}")
        other = copy.copy(self)
        other.model = model
        return other

    # ------------------------------------------------------------------ data

    def check_images(self, images: torch.Tensor, arg: str = "data") -> None:
        """Refuse images of another shape than the model takes (message names ``arg``).

        Example::

            task.check_images(torch.randn(4, 1, 8, 8), "test_data")
        """
        if self.sample_shape is not None and tuple(images.shape[1:]) != self.sample_shape:
            raise ValueError(f"{arg} holds images of shape {tuple(images.shape[1:])} but the "
                             f"model takes {self.sample_shape} (C, H, W)")

    def batches(self, data, batch_size: int = 32, arg: str = "data", id_start: int = 0):
        """``(number of batches or None, iterator of (images, ids, condition) batches)``.

        ``data``: a Tensor of images (ids ``id_start + 0..n−1``), a tuple
        ``(images, ids[, condition])`` of tensors (split by ``batch_size``), or an iterable
        of such batches.

        Example::

            n_batches, it = task.batches(train_images, batch_size=64)
            for images, ids in it: ...
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(data, torch.Tensor):
            data = (data, id_start + torch.arange(data.shape[0]))
        if isinstance(data, tuple) and len(data) in (2, 3) and isinstance(data[0], torch.Tensor):
            x0, ids, cond = _unpack_batch(data, arg)
            self.check_images(x0, arg)
            n = x0.shape[0]
            if n == 0:
                raise ValueError(f"{arg} is empty")

            def split(i):
                sl = slice(i, i + batch_size)
                c = None if cond is None else (
                    {k: v[sl] for k, v in cond.items()} if isinstance(cond, dict) else cond[sl])
                return (x0[sl], ids[sl]) if c is None else (x0[sl], ids[sl], c)

            return (n + batch_size - 1) // batch_size, (split(i) for i in range(0, n, batch_size))
        try:
            total = len(data)
        except TypeError:
            total = None
        try:
            it = iter(data)
        except TypeError:
            raise TypeError(f"{arg} must be a Tensor of images, a tuple (images, ids[, condition]) "
                            f"or an iterable of such batches, got {type(data).__name__}") from None

        def checked():
            for batch in it:
                x0, ids, cond = _unpack_batch(batch, f"a batch of {arg}")
                self.check_images(x0, arg)
                yield (x0, ids) if cond is None else (x0, ids, cond)

        return total, checked()

    # --------------------------------------------------------------- gradients

    def _rows(self, batch, output, model, at=None):
        """(output_fn, row batch, segments) of one batch: the N = B*K noisy rows; the row
        values are f / K so that each image's segment-summed gradient is the K-average.
        ``at`` ([B] timesteps) replaces the K draws by one row per image at that timestep."""
        x0, ids, cond = _unpack_batch(batch)
        self.check_images(x0)
        out_choice = _check_output(self.output if output is None else output)
        K = self.K if at is None else 1
        n = _noised(x0, ids, cond, K, self.alphas_cumprod, self.timesteps, self.noise_seed, at)
        abar, model_fn = self.alphas_cumprod, self.model_fn

        def output_fn(m, rows):
            x_t, t, eps, kw = rows
            pred = _call_model(m, x_t, t, kw) if model_fn is None else model_fn(m, x_t, t, **kw)
            return output_values(out_choice, pred, eps, t, abar) / K

        segments = torch.arange(ids.numel(), device=x0.device).repeat_interleave(K)
        return output_fn, (n.x_t, n.t, n.eps, n.cond), segments

    def features(self, batch, projector, output=None, model=None, per_timestep: bool = False):
        """Projected gradients ``[B, k]`` of ``(1/K) Σ_t f`` for one batch (``[B*K, k]`` of
        each ``f(x, t)/K`` with ``per_timestep``, rows in (image, draw) order).

        Example::

            phi = task.features((x0, ids), fastattr.Projector(k=2048))
        """
        from .grads import projected_grads

        m = self.model if model is None else model
        fn, rows, seg = self._rows(batch, output, m)
        return projected_grads(m, fn, rows, projector, params=self.params,
                               segments=None if per_timestep else seg)

    def features_at(self, batch, t, projector, output=None, model=None) -> torch.Tensor:
        """Projected gradients ``[B, k]`` of f at one given timestep per image (``t [B]``,
        noise ``ε(id, t)``) instead of the task's K draws (Journey-TRAK's per-step features).

        Example::

            phi = task.features_at((x0_hat, ids), torch.full((B,), 500), projector)
        """
        from .grads import projected_grads

        m = self.model if model is None else model
        fn, rows, _ = self._rows(batch, output, m, at=t)
        return projected_grads(m, fn, rows, projector, params=self.params)

    def grads(self, batch, output=None, model=None) -> dict:
        """Explicit per-example gradients ``{name: [B, *shape]}`` of ``(1/K) Σ_t f``
        (materialised: memory ``B × p``).

        Example::

            g = task.grads((images, ids), output="loss")
        """
        from .grads import per_sample_grads

        m = self.model if model is None else model
        fn, rows, seg = self._rows(batch, output, m)
        return per_sample_grads(m, fn, rows, params=self.params, segments=seg)

    def grads_matmul(self, batch, queries: dict, output=None, model=None,
                     backend: str = "auto") -> torch.Tensor:
        """``[B, q]``: ``⟨g(x_b), queries_j⟩`` without forming ``g(x_b)`` (fused kernels).

        Example::

            q = task.grads(test_batch)                      # {name: [q, *shape]}
            dots = task.grads_matmul(train_batch, q)        # [B, q]
        """
        from .grads import grads_matmul

        m = self.model if model is None else model
        fn, rows, seg = self._rows(batch, output, m)
        return grads_matmul(m, fn, rows, queries, params=self.params, segments=seg,
                            backend=backend)

    @torch.no_grad()
    def values(self, batch, output=None, model=None) -> torch.Tensor:
        """``[B, K]``: f at each of the K (t, ε) draws of every example (no gradients).

        Example::

            losses = task.values((images, ids), output="loss").mean(1)   # [B]
        """
        m = self.model if model is None else model
        fn, rows, _ = self._rows(batch, output, m)
        return (fn(m, rows) * self.K).reshape(-1, self.K)

    @torch.no_grad()
    def sample(self, n: int, num_steps: int = 50, seed: int = 0, condition=None, model=None,
               ids=None) -> Trajectory:
        """Deterministic DDIM sampling (η = 0, "leading" step spacing ``T//S``, ᾱ = 1 after
        the last step) of ``n`` samples from Gaussian noise drawn with ``seed``; returns the
        whole ``Trajectory`` (for Journey-TRAK) with the final images.

        ``ids`` default ``QUERY_IDS + j`` (2⁴⁰ + j), apart from training ids.

        Example::

            traj = task.sample(8, num_steps=50, seed=0)
            images = traj.images                     # [8, C, H, W]
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) \
                or not 1 <= num_steps <= self.T:
            raise ValueError(f"num_steps must be an int in [1, T={self.T}], got {num_steps!r}")
        if self.sample_shape is None:
            raise ValueError("sampling needs the image shape: pass sample_shape=(C, H, W) to "
                             "the task")
        m = self.model if model is None else model
        device = next(m.parameters()).device
        ids = (1 << 40) + torch.arange(n) if ids is None else _ids_tensor(ids)
        if ids.numel() != n:
            raise ValueError(f"ids must hold n={n} sample ids, got {ids.numel()}")
        g = torch.Generator().manual_seed(int(seed))
        x = torch.randn(n, *self.sample_shape, generator=g).to(device)
        steps = (torch.arange(num_steps) * (self.T // num_steps)).flip(0)
        abar = self.alphas_cumprod.to(device)
        kwargs = _condition_kwargs(condition, n, 1)
        latents, x0s = [], []
        for i, t in enumerate(steps.tolist()):
            tt = torch.full((n,), t, dtype=torch.int64, device=device)
            eps = _call_model(m, x, tt, kwargs) if self.model_fn is None else \
                self.model_fn(m, x, tt, **kwargs)
            a = abar[t].to(x.dtype)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            latents.append(x)
            x0s.append(x0)
            a_prev = abar[steps[i + 1]].to(x.dtype) if i + 1 < num_steps else x.new_tensor(1.0)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return Trajectory(torch.stack(latents, 1), steps, torch.stack(x0s, 1), x, ids)

    def curvature_loss(self) -> DiffusionLoss:
        """The DDPM loss rows of this task's schedule and noise for ``fit_factors``.

        Example::

            factors = fit_factors(task.model, batches, task.curvature_loss(),
                                  samples_per_example=task.K)
        """
        return DiffusionLoss(self.alphas_cumprod, self.timesteps, self.noise_seed, self.model_fn)
