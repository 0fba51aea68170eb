"""Timestep embeddings (diffusers' names): sinusoidal projection and its MLP."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim] (fp32), as in DDPM / diffusers ``get_timestep_embedding``:
    freq_i = exp(-log(max_period) * i / (half - downscale_freq_shift)), emb = [sin(t f), cos(t f)] (or cos first)."""
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = scale * timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """No parameters: [N] timesteps -> [N, num_channels] sinusoidal features."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift,
                                  self.scale)


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2``: [N, in_channels] -> [N, out_dim or time_embed_dim]."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int = None, cond_proj_dim: int = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim else None
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        return self.linear_2(self.act(self.linear_1(sample)))
