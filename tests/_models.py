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
