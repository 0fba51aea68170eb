"""Convolutional blocks shared by the UNet and the VAE (diffusers' names)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with an optional time-embedding bias; [B, Cin, H, W] -> [B, Cout, H, W].

    Parameters ``norm1``, ``conv1``, ``time_emb_proj`` (when ``temb_channels``), ``norm2``, ``conv2`` and
    ``conv_shortcut`` (1x1, when Cin != Cout). ``output_scale_factor`` divides the sum (1 for SD).
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, temb_channels: Optional[int] = 512,
                 groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6,
                 output_scale_factor: float = 1.0, conv_shortcut_bias: bool = True):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=conv_shortcut_bias)
                              if in_channels != out_channels else None)
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = skip + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 ``conv`` (padding 1, or an asymmetric (0,1,0,1) pad with padding 0 as the VAE uses)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``output_size``) then a 3x3 ``conv``."""

    def __init__(self, channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling lacks bf16 kernels on some builds
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if output_size is None else \
            F.interpolate(x, size=output_size, mode="nearest")
        return self.conv(x.to(dtype))
