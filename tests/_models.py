"""Small models and data shared by the method tests (tiny shapes: the CPU CI runs them)."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0):
    """A diffusers ``UNet2DModel`` with self-attention on 8x8 single-channel images
    (two levels, 8 / 16 channels), random weights, in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=4)
    # diffusers zero-initialises some output convs; random weights make every gradient nonzero
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_images(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 1, 8, 8]`` random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def oracle_output(name: str, pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The output functions of shared/METHODS.md for one row, written out independently."""
    if name == "loss":
        return ((pred - eps) ** 2).mean()
    if name == "square":
        return (pred ** 2).mean()
    if name == "mean":
        return pred.mean()
    raise ValueError(name)


def explicit_grads(task, images, ids, output: str, model=None, cond=None) -> torch.Tensor:
    """``[B, p]`` float64: the K-averaged gradient of ``output`` per image over the task's
    (t, ε) draws, one autograd call per row (no capture, no torch.func), parameters in
    ``named_parameters`` order restricted to ``task.params``.

    The draws come from fastattr's documented protocol (``timesteps`` / ``noise``)."""
    from fastattr.diffusion import noise, timesteps

    model = task.model if model is None else model
    named = dict(model.named_parameters())
    params = [named[n] for n in task.params]
    T = task.T
    t_all = timesteps(ids, task.K, T, task.timesteps, task.noise_seed)
    abar = task.alphas_cumprod
    rows = []
    for b in range(images.shape[0]):
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for j in range(task.K):
            t = t_all[b, j:j + 1]
            eps = noise(ids[b:b + 1], t, images.shape[1:], T, task.noise_seed)
            a = abar[t].float().reshape(1, 1, 1, 1)
            x_t = a.sqrt() * images[b:b + 1] + (1 - a).sqrt() * eps
            kwargs = {} if cond is None else {k: v[b:b + 1] for k, v in cond.items()}
            pred = model(x_t, t, **kwargs)
            pred = getattr(pred, "sample", pred)
            g = torch.autograd.grad(oracle_output(output, pred, eps), params, allow_unused=True)
            total = [acc + (0 if gi is None else gi.double()) for acc, gi in zip(total, g)]
        rows.append(torch.cat([x.flatten() for x in total]) / task.K)
    return torch.stack(rows)
