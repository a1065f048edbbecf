"""Small diffusers UNets used by the built-in benchmark and the microbenchmarks.

diffusers is an optional dependency (``pip install diffusers``); it is imported only when a
model is built, never by ``import fastattr``.
"""

from __future__ import annotations

__all__ = ["digits_unet", "cifar_unet"]


def _unet2d():
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:  # pragma: no cover - exercised only without diffusers
        raise ImportError(
            f"building a UNet needs diffusers ({exc}); install it with `pip install diffusers`"
        ) from exc
    return UNet2DModel


def digits_unet():
    """The 8x8 single-channel UNet of the digits benchmark (about 0.7M parameters).

    Two resolutions (8x8 with 32 channels, 4x4 with 64 channels and self-attention), one
    ResNet block per level, GroupNorm with 8 groups, a sinusoidal time embedding with its MLP.

    Example::

        model = fastattr.models.digits_unet()
        eps = model(x_t, t).sample        # x_t: [N, 1, 8, 8], t: [N]
    """
    return _unet2d()(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )


def cifar_unet():
    """A 32x32 RGB UNet of the size of DDPM's CIFAR-10 model (about 36M parameters).

    Four resolutions with (128, 256, 256, 256) channels, two ResNet blocks per level and
    self-attention at 16x16, as in Ho et al. (2020).

    Example::

        model = fastattr.models.cifar_unet()
    """
    return _unet2d()(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=None,
    )
