"""The fixed training recipe of the digits benchmark's diffusion model, with an on-disk cache.

``train_digits(subset_indices, seed)`` trains ``fastattr.models.digits_unet()`` on the
digits training images (``fastattr.data.digits("train")``) at the positions
``subset_indices`` (all 1500 by default) with the DDPM ε-prediction loss:

- T = 1000, DDPM's linear β schedule 1e-4..0.02 (``fastattr.diffusion.ddpm_alphas_cumprod``),
  timesteps uniform in ``[0, T)``, loss ``mean (ε_θ(x_t, t) − ε)²``;
- AdamW (β = 0.9, 0.999, weight decay 0), a linear warm-up then a cosine decay of the
  learning rate to 10 % of its peak, gradient norm clipped at 1;
- an exponential moving average of the weights (``ema``): the returned model holds it;
- everything seeded by ``seed``: the initial weights (``torch.manual_seed(seed)`` inside a
  forked RNG state, the caller's global RNG is untouched), the data order (one permutation
  of the subset per epoch) and the timesteps and noise (``torch.Generator`` seeded from
  ``seed``, drawn on the CPU, so a GPU run sees the same data stream).

Two sizes (``RECIPES``), both lr 2e-3, 50 warm-up steps, EMA 0.995:

- ``quick``: 1600 steps of batch 64 (68 epochs of the 1500 images), the demo's model:
  115 s on a 2-core CPU (0.07 s a step); its DDIM samples are recognisable digits;
- ``full``: 4000 steps of batch 128 (341 epochs), a better-fit model: about 7 minutes on a
  2-core CPU (0.11 s a step).

``steps=`` overrides the step count (the learning-rate schedule follows it).

Trained models are cached under ``cache_dir`` (default ``$FASTATTR_CACHE`` or
``~/.cache/fastattr``) in ``digits/<size>-<key>.safetensors``, the key a digest of the recipe,
the subset, the seed, the requested checkpoints and the device type; files are written
atomically (a temporary file, then ``os.replace``), so concurrent workers never read a
partial file, and the next call with the same arguments loads instead of training.

Example::

    from fastattr.train import train_digits
    model = train_digits()                                  # quick recipe, all 1500 images
    half = train_digits(subset_indices=range(0, 1500, 2), seed=3)
    model, ckpts = train_digits(checkpoints=4)             # for TracIn
    TracIn(task, checkpoints=ckpts.models, learning_rates=ckpts.learning_rates)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from . import distributed

__all__ = ["Recipe", "RECIPES", "Checkpoints", "train_digits", "default_cache_dir",
           "cache_path", "lr_at"]

# bump when the training loop changes in a way that changes the weights (invalidates caches)
RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training hyper-parameters of the digits UNet.

    Attributes:
        steps: optimiser steps.
        batch_size: images per step (drawn without replacement, a new permutation per epoch).
        lr: peak learning rate of AdamW.
        warmup: steps of linear warm-up (from ``lr / warmup``).
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        weight_decay: AdamW's decoupled weight decay.
        ema: decay of the weights' moving average (0: none, the raw weights are returned).
        grad_clip: the gradient's global norm is clipped to this (0: no clipping).
        T: diffusion timesteps (DDPM linear schedule, β 1e-4..0.02).

    Example::

        Recipe(**{**dataclasses.asdict(RECIPES["quick"]), "steps": 300})
    """

    steps: int
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    ema: float = 0.995
    grad_clip: float = 1.0
    T: int = 1000


RECIPES = {
    "quick": Recipe(steps=1600, batch_size=64),
    "full": Recipe(steps=4000, batch_size=128),
}


class Checkpoints(NamedTuple):
    """Intermediate models of a training run, for TracIn / ReTrac: ``models`` (eval mode,
    raw weights, not the moving average), the ``steps`` they were taken after and the
    ``learning_rates``: the mean learning rate of the steps since the previous checkpoint
    (TracIn's η_c, the step size each checkpoint stands for).

    Example::

        model, ckpts = train_digits(checkpoints=4)
        TracIn(task, checkpoints=ckpts.models, learning_rates=ckpts.learning_rates)
    """

    models: list
    steps: list
    learning_rates: list


def default_cache_dir() -> Path:
    """``$FASTATTR_CACHE``, else ``~/.cache/fastattr``.

    Example::

        default_cache_dir() / "digits"
    """
    env = os.environ.get("FASTATTR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastattr"


def lr_at(recipe: Recipe, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine
    decay to ``lr * min_lr_ratio`` at the last step.

    Example::

        [lr_at(RECIPES["quick"], s) for s in (0, 49, 999)]
    """
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    span = max(recipe.steps - recipe.warmup - 1, 1)
    progress = min((step - recipe.warmup) / span, 1.0)
    floor = recipe.lr * recipe.min_lr_ratio
    return floor + (recipe.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _resolve_recipe(size, steps) -> tuple:
    if isinstance(size, Recipe):
        name, recipe = "custom", size
    elif size in RECIPES:
        name, recipe = size, RECIPES[size]
    else:
        raise ValueError(f"size must be one of {tuple(RECIPES)} or a Recipe, got {size!r}")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        recipe = dataclasses.replace(recipe, steps=steps, warmup=min(recipe.warmup, steps))
    return name, recipe


def _subset(subset_indices, n_train: int) -> torch.Tensor:
    if subset_indices is None:
        return torch.arange(n_train, dtype=torch.int64)
    if isinstance(subset_indices, torch.Tensor):
        index = subset_indices.detach().cpu().reshape(-1)
    else:
        index = torch.as_tensor([int(i) for i in subset_indices], dtype=torch.int64)
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"subset_indices must hold integers, got {index.dtype}")
    index = torch.sort(index.to(torch.int64)).values
    if index.numel() == 0:
        raise ValueError("subset_indices is empty")
    if int(index[0]) < 0 or int(index[-1]) >= n_train:
        raise IndexError(f"subset_indices must lie in [0, {n_train}) (positions in the "
                         "digits training split)")
    if torch.unique(index).numel() != index.numel():
        raise ValueError("subset_indices holds repeated positions")
    return index


def _checkpoint_steps(checkpoints, steps: int) -> list:
    """The steps after which checkpoints are taken: ``C`` evenly spaced (the last is the
    final step), or an explicit list."""
    if checkpoints is None or checkpoints == 0:
        return []
    if isinstance(checkpoints, bool):
        raise TypeError("checkpoints must be an int (how many) or a list of steps")
    if isinstance(checkpoints, int):
        if checkpoints < 0:
            raise ValueError(f"checkpoints must be >= 0, got {checkpoints}")
        return sorted({max(1, round(steps * (c + 1) / checkpoints)) for c in range(checkpoints)})
    out = sorted({int(s) for s in checkpoints})
    if out and (out[0] < 1 or out[-1] > steps):
        raise ValueError(f"checkpoint steps must lie in [1, {steps}], got {out}")
    return out


def cache_path(cache_dir, name: str, recipe: Recipe, subset: torch.Tensor, seed: int,
               ckpt_steps: list, device_type: str) -> Path:
    """The cache file of one training run (see the module docstring).

    Example::

        cache_path(default_cache_dir(), "quick", RECIPES["quick"], torch.arange(1500), 0,
                   [], "cpu")
    """
    subset_digest = hashlib.sha256(subset.numpy().astype("<i8").tobytes()).hexdigest()
    key = json.dumps({"version": RECIPE_VERSION, "model": "digits_unet",
                      "recipe": dataclasses.asdict(recipe), "subset": subset_digest,
                      "seed": int(seed), "checkpoints": ckpt_steps, "device": device_type},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir) / "digits" / f"{name}-{digest}.safetensors"


def _new_model(seed: int):
    from .models import digits_unet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return digits_unet()


def _save(path: Path, ema_state: dict, ckpt_states: list, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in ema_state.items()}
    for c, state in enumerate(ckpt_states):
        tensors.update({f"ckpt{c}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"fastattr": json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a cache is shared like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load(path: Path, seed: int, device) -> tuple:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fastattr"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def build(prefix):
        model = _new_model(seed)
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                               if k.startswith(prefix)})
        return model.to(device).eval()

    models = [build(f"ckpt{c}.") for c in range(len(meta["checkpoint_steps"]))]
    return build("model."), meta, models


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _train(recipe: Recipe, images: torch.Tensor, seed: int, device: torch.device,
           ckpt_steps: list, desc: str, progress: bool) -> tuple:
    """The training loop: ``(final state dict, checkpoint state dicts, their mean lrs)``,
    all on the CPU."""
    from .diffusion import ddpm_alphas_cumprod

    n = images.shape[0]
    abar = ddpm_alphas_cumprod(recipe.T).to(torch.float32)
    model = _new_model(seed).to(device).train()
    # no buffers in the UNet: the state dict is its parameters (views sharing their storage)
    live = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema_float = [ema[k] for k, _ in live]
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.999),
                            weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.empty(0, dtype=torch.int64)
    ckpt_states, ckpt_lrs, lr_sum, lr_count = [], [], 0.0, 0
    bar = _progress_bar(recipe.steps, desc, progress)
    for step in range(recipe.steps):
        while order.numel() < recipe.batch_size:  # one permutation of the subset per epoch
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        batch, order = order[:recipe.batch_size], order[recipe.batch_size:]
        x0 = images[batch]
        t = torch.randint(0, recipe.T, (x0.shape[0],), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        lr = lr_at(recipe, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = (model(x_t.to(device), t.to(device)).sample - eps.to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        if recipe.ema > 0:
            with torch.no_grad():
                decay = min(recipe.ema, (1 + step) / (10 + step))  # short warm-up of the mean
                torch._foreach_lerp_(ema_float, [v for _, v in live], 1 - decay)
        lr_sum, lr_count = lr_sum + lr, lr_count + 1
        if step + 1 in ckpt_steps:
            ckpt_states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
            ckpt_lrs.append(lr_sum / lr_count)
            lr_sum, lr_count = 0.0, 0
        if bar is not None:
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    if bar is not None:
        bar.close()
    final = ema if recipe.ema > 0 else model.state_dict()
    return ({k: v.detach().cpu().clone() for k, v in final.items()}, ckpt_states, ckpt_lrs)


def train_digits(subset_indices=None, seed: int = 0, size="quick", steps=None,
                 device="cpu", progress: bool = True, checkpoints=None, cache_dir=None,
                 use_cache: bool = True):
    """Train the digits UNet with the fixed recipe (see the module docstring), or load the
    identical run from the cache.

    Args:
        subset_indices: positions in ``fastattr.data.digits("train")`` (= train ids) to
            train on, any order (sorted first; repeats refused); None: all 1500.
        seed: seeds the initial weights, the data order, the timesteps and the noise.
        size: "quick", "full" (``RECIPES``) or a ``Recipe``.
        steps: override the recipe's step count.
        device: where to train ("cpu", "cuda", a ``torch.device``).
        progress: a progress bar while training.
        checkpoints: None / 0 (return the model only), an int C (C evenly spaced
            checkpoints, the last at the final step) or a list of steps: then returns
            ``(model, Checkpoints)``.
        cache_dir: the cache root (default ``default_cache_dir()``);
            use_cache: False trains without reading or writing the cache.

    Returns the trained model (the weights' moving average, eval mode, on ``device``), or
    ``(model, Checkpoints)`` with ``checkpoints``. Module-level and picklable: usable
    directly as the LDS harness's ``train_fn(subset_indices, seed) -> model``.

    Example::

        model = train_digits(seed=1)                           # ~2 min on 2 CPU cores
        model = train_digits(range(750), seed=0, size="full", device="cuda")
    """
    from .data import N_TRAIN, digits

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    name, recipe = _resolve_recipe(size, steps)
    subset = _subset(subset_indices, N_TRAIN)
    ckpt_steps = _checkpoint_steps(checkpoints, recipe.steps)
    device = torch.device(device)
    path = cache_path(cache_dir if cache_dir is not None else default_cache_dir(), name,
                      recipe, subset, seed, ckpt_steps, device.type)

    def result(model, meta, ckpt_models):
        if checkpoints is None or checkpoints == 0:
            return model
        return model, Checkpoints(ckpt_models, list(meta["checkpoint_steps"]),
                                  list(meta["checkpoint_lrs"]))

    def run():
        if use_cache and path.exists():
            try:
                return result(*_load(path, seed, device))
            except Exception:  # a corrupt or foreign file: train again and replace it
                pass

        images = digits("train").images[subset]
        final, ckpt_states, ckpt_lrs = _train(recipe, images, seed, device, ckpt_steps,
                                              f"training digits UNet ({name}, {len(subset)} "
                                              "images)", progress)
        model = _new_model(seed)
        model.load_state_dict(final)
        model = model.to(device).eval()
        meta = {"recipe": dataclasses.asdict(recipe), "size": name, "seed": seed,
                "n_train": len(subset), "checkpoint_steps": ckpt_steps, "checkpoint_lrs": ckpt_lrs,
                "version": RECIPE_VERSION}
        ckpt_models = []
        for state in ckpt_states:
            m = _new_model(seed)
            m.load_state_dict(state)
            ckpt_models.append(m.to(device).eval())
        if use_cache:
            _save(path, final, ckpt_states, meta)
        return result(model, meta, ckpt_models)

    if use_cache:
        # under torch.distributed rank 0 trains (or loads) first, the other ranks then
        # load its cached file instead of training the same model again
        with distributed.main_first():
            return run()
    return run()
