"""A small U-Net that segments defect vs background: the downstream "inspection model".

Why its own small model: the question the evaluation answers is "do the synthetic pairs make an
inspection model better?", so the model must be the same, cheap and from scratch for every
condition (real only / real + synthetic); a U-Net with skips is the standard choice in the
defect-generation papers' downstream experiments. Binary only: any class id > 0 is defect.

Input: float images in [0, 1], N x 3 x H x W (any H, W: padded internally to a multiple of
2**levels and cropped back). Output: defect logits, N x 1 x H x W. Pure torch, device-agnostic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two conv-bn-relu layers (the U-Net unit)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SegUNet(nn.Module):
    """U-Net with ``levels`` down-samplings and widths ``base * 2**i``.

    The input normalisation (fixed mean/std per channel, 0.5/0.25 by default) lives in the model
    so that a saved model carries it and callers only convert uint8 to [0, 1].
    """

    def __init__(self, in_channels: int = 3, base: int = 16, levels: int = 3,
                 mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        if levels < 1 or base < 1:
            raise ValueError(f"SegUNet needs levels >= 1 and base >= 1, got levels={levels}, base={base}")
        self.levels = levels
        self.register_buffer("mean", torch.full((1, in_channels, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, in_channels, 1, 1), float(std)))
        widths = [base * 2**i for i in range(levels + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.down.append(_conv_block(cin, w))
            cin = w
        self.bottleneck = _conv_block(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(levels)):
            self.up.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            self.dec.append(_conv_block(2 * widths[i], widths[i]))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"SegUNet expects N x {self.mean.shape[1]} x H x W, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        m = 2**self.levels
        ph, pw = (-h) % m, (-w) % m
        x = (x - self.mean) / self.std
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]
