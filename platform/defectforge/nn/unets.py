"""UNet builders on diffusers' ``UNet2DModel``, plus the label embedding that conditions them.

Why builders and not a hand-written UNet: diffusers' ``UNet2DModel`` already is the DDPM/ADM
UNet (resnet blocks, optional attention, skip connections, sinusoidal time embedding,
``class_embed_type="identity"`` to add an external conditioning vector to the time embedding).
What a method needs to choose is its *shape*, which is what these functions decide:

* ``build_large_unet`` - deep, many downsamplings, self-attention at low resolutions and a mid
  block: a receptive field covering the whole image, so it can lay out global structure.
* ``build_patch_unet`` - few downsamplings, *no* attention and *no* mid block: every output pixel
  only sees a bounded patch of the input. Defect-Gen uses it for the late denoising steps so that
  the model learns local texture statistics and cannot memorise whole training images (few-shot
  data is easy to memorise).

Counting: ``UNet2DModel`` with N down blocks downsamples N-1 times (its last block has no
downsampler), so a UNet with ``d`` downsamplings is built from ``d + 1`` blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from defectforge.config import ConfigError

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# diffusers' UNet2DModel is imported where a UNet is built, not at the top: importing it pulls in
# every transformer model of diffusers (and the transformers package), ~3-6 s here, and every
# process that validates a config imports this module (the config union names every method).

# Defect Spectrum, Table 12: the small model's receptive field as a number of downsamplings.
RECEPTIVE_FIELDS: dict[str, int] = {"small": 2, "medium": 3, "large": 6}


def check_divisible(resolution: int, downsamplings: int, field: str) -> None:
    """Each downsampling halves the feature map; an odd size breaks the skip connections."""
    factor = 2**downsamplings
    if resolution % factor:
        raise ConfigError(
            f"{field}: {downsamplings} downsamplings need data.resolution divisible by {factor}, "
            f"got data.resolution={resolution}; lower {field} or change data.resolution"
        )


def _check_widths(widths: tuple[int, ...], levels: int, norm_num_groups: int, field: str) -> tuple[int, ...]:
    if len(widths) < levels:
        raise ConfigError(f"{field}: {levels} levels need at least {levels} widths, got {list(widths)}")
    used = tuple(int(w) for w in widths[:levels])
    bad = [w for w in used if w <= 0 or w % norm_num_groups]
    if bad:
        raise ConfigError(f"{field}: widths {bad} are not positive multiples of norm_num_groups={norm_num_groups}")
    return used


def build_large_unet(*, resolution: int, channels: int, widths: tuple[int, ...], downsamplings: int,
                     layers_per_block: int, attention_resolution: int, attention_head_dim: int,
                     norm_num_groups: int, field: str = "method.large_downsamplings") -> UNet2DModel:
    """Global-context UNet: ``downsamplings`` halvings, attention where the map is <= ``attention_resolution``.

    ``widths[i]`` is the channel count at level i (resolution / 2**i); only the first
    ``downsamplings + 1`` are used. Conditioned through ``class_labels`` (a vector of size
    ``time_embed_dim(model)``) added to the time embedding.
    """
    check_divisible(resolution, downsamplings, field)
    used = _check_widths(widths, downsamplings + 1, norm_num_groups, "method.large_widths")
    attn = [resolution // 2**i <= attention_resolution for i in range(len(used))]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    # Up block j works at the resolution of down block (levels - 1 - j): mirror the choice.
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        down_block_types=down, up_block_types=up, block_out_channels=used,
        mid_block_type="UNetMidBlock2D", layers_per_block=layers_per_block,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
        class_embed_type="identity",
    )


def build_patch_unet(*, resolution: int, channels: int, widths: tuple[int, ...], receptive_field: str,
                     layers_per_block: int, norm_num_groups: int) -> UNet2DModel:
    """Patch-level UNet: ``RECEPTIVE_FIELDS[receptive_field]`` downsamplings, no attention, no mid block.

    Attention or a mid block at the bottom would let information travel across the whole image and
    defeat the point of a bounded receptive field, so both are left out.
    """
    if receptive_field not in RECEPTIVE_FIELDS:
        raise ConfigError(f"method.receptive_field: {receptive_field!r} is not one of {sorted(RECEPTIVE_FIELDS)}")
    downsamplings = RECEPTIVE_FIELDS[receptive_field]
    check_divisible(resolution, downsamplings, "method.receptive_field")
    used = _check_widths(widths, downsamplings + 1, norm_num_groups, "method.small_widths")
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        down_block_types=("DownBlock2D",) * len(used), up_block_types=("UpBlock2D",) * len(used),
        block_out_channels=used, mid_block_type=None, add_attention=False,
        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
        class_embed_type="identity",
    )


def count_downsamplings(model: nn.Module) -> int:
    """How many times ``model`` halves its input (counted from its ``Downsample2D`` modules)."""
    from diffusers.models.downsampling import Downsample2D

    return sum(isinstance(m, Downsample2D) for m in model.modules())


def time_embed_dim(model: UNet2DModel) -> int:
    """Size of the vector ``class_labels`` must have for ``class_embed_type="identity"``."""
    return int(model.time_embedding.linear_2.out_features)


class LabelEmbedding(nn.Module):
    """Learned product embedding + learned defect-type embedding, summed into one vector.

    Why a sum of two tables: the same network serves one product (per-product mode; the product
    table then has one row) or several (multi-product mode), and each defect type keeps its own
    vector; defect id 0 is "good". The vector goes to the UNet as ``class_labels`` and is added
    to its time embedding.
    """

    def __init__(self, num_products: int, num_defects: int, dim: int) -> None:
        super().__init__()
        self.product = nn.Embedding(num_products, dim)
        self.defect = nn.Embedding(num_defects, dim)

    def forward(self, product: torch.Tensor, defect: torch.Tensor) -> torch.Tensor:
        return self.product(product) + self.defect(defect)


class UnshuffledUNet(nn.Module):
    """A UNet that works at ``1/factor`` of the input resolution through an exact pixel-unshuffle.

    Why: on a CPU the full-resolution levels of a UNet cost most of its time while a wide first
    level is what gives it capacity. ``F.pixel_unshuffle`` folds each ``factor x factor`` block of
    pixels into channels (no parameters, nothing blurred, exactly inverted by ``pixel_shuffle``),
    so the same compute buys ``factor**2`` times the channels per pixel. The large, global model
    of Defect-Gen decides layout at high noise, where fine pixel detail is not yet there, which is
    where this trade is cheapest. Called like ``UNet2DModel``: ``model(x, t, class_labels=...)``
    returns an object with ``.sample``.
    """

    def __init__(self, unet: UNet2DModel, factor: int) -> None:
        super().__init__()
        self.unet = unet
        self.factor = int(factor)

    @property
    def time_embedding(self) -> nn.Module:
        return self.unet.time_embedding

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None):
        from diffusers.models.unets.unet_2d import UNet2DOutput

        if self.factor == 1:
            return self.unet(x, t, class_labels=class_labels)
        z = torch.nn.functional.pixel_unshuffle(x, self.factor)
        out = self.unet(z, t, class_labels=class_labels).sample
        return UNet2DOutput(sample=torch.nn.functional.pixel_shuffle(out, self.factor))
