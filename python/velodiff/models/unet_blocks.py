"""Down, mid and up blocks of the SD 1.x / 2.x / XL UNets (diffusers' block and parameter names).

Every block takes feature maps [B, C, H, W] and the time embedding ``temb`` [B, temb_channels]; cross-attention
blocks also take ``encoder_hidden_states`` [B, Lk, cross_attention_dim]. Down blocks return the new map and the
tuple of skip connections they produced; up blocks consume skips from the end of such a tuple.

Partial forwards (the UNet caches of :mod:`velodiff.accel.cache`) run blocks one layer at a time: down and up blocks
have ``layer(i, ...)`` (resnet ``i`` and its attention; up blocks concatenate their skip first) and
``downsample`` / ``upsample``, and their ``forward`` is exactly those calls in order, so a layer-by-layer run computes
what ``forward`` does, bit for bit. ``num_skips``: the skip connections a down block produces.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .transformer_2d import Transformer2DModel

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _per_layer(value: Union[int, Sequence[int]], n: int, name: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or have {n} entries, got {value}")
    return value


def _transformer(channels: int, heads: int, layers: int, cross_attention_dim: int, groups: int,
                 use_linear_projection: bool, only_cross_attention: bool, upcast_attention: bool) -> Transformer2DModel:
    if channels % heads:
        raise ValueError(f"block channels {channels} are not divisible by the number of heads {heads} "
                         "(diffusers' attention_head_dim)")
    return Transformer2DModel(heads, channels // heads, in_channels=channels, num_layers=layers,
                              cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                              use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
                              upcast_attention=upcast_attention)


class DownBlock2D(nn.Module):
    """``resnets`` (num_layers) then an optional stride-2 ``downsamplers.0``. [B, Cin, H, W] ->
    ([B, Cout, ceil(H/2), ceil(W/2)] or [B, Cout, H, W], skips)."""

    has_cross_attention = False

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 resnet_eps: float = 1e-6, resnet_groups: int = 32, output_scale_factor: float = 1.0,
                 add_downsample: bool = True, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          eps=resnet_eps, groups=resnet_groups, output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, padding=downsample_padding)])
                             if add_downsample else None)

    @property
    def num_skips(self) -> int:
        return len(self.resnets) + (self.downsamplers is not None)

    def layer(self, i: int, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states=None,
              encoder_attention_mask=None) -> torch.Tensor:
        """Layer ``i`` alone: ``resnets.i``; its output is the block's skip ``i``."""
        return self.resnets[i](hidden_states, temb)

    def downsample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.downsamplers[0](hidden_states)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, encoder_hidden_states=None,
                encoder_attention_mask=None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        skips = []
        for i in range(len(self.resnets)):
            hidden_states = self.layer(i, hidden_states, temb)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsample(hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class CrossAttnDownBlock2D(nn.Module):
    """(``resnets.i`` -> ``attentions.i``) x num_layers, then an optional ``downsamplers.0``."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int = 1,
                 transformer_layers_per_block: Union[int, Sequence[int]] = 1, resnet_eps: float = 1e-6,
                 resnet_groups: int = 32, num_attention_heads: int = 1, cross_attention_dim: int = 1280,
                 output_scale_factor: float = 1.0, downsample_padding: int = 1, add_downsample: bool = True,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=temb_channels,
                          eps=resnet_eps, groups=resnet_groups, output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        self.attentions = nn.ModuleList([
            _transformer(out_channels, num_attention_heads, layers[i], cross_attention_dim, resnet_groups,
                         use_linear_projection, only_cross_attention, upcast_attention)
            for i in range(num_layers)])
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, out_channels, padding=downsample_padding)])
                             if add_downsample else None)

    @property
    def num_skips(self) -> int:
        return len(self.resnets) + (self.downsamplers is not None)

    def layer(self, i: int, hidden_states: torch.Tensor, temb: torch.Tensor,
              encoder_hidden_states: Optional[torch.Tensor] = None,
              encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layer ``i`` alone: ``resnets.i`` then ``attentions.i``; its output is the block's skip ``i``."""
        return self.attentions[i](self.resnets[i](hidden_states, temb), encoder_hidden_states, encoder_attention_mask)

    def downsample(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.downsamplers[0](hidden_states)

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
        skips = []
        for i in range(len(self.resnets)):
            hidden_states = self.layer(i, hidden_states, temb, encoder_hidden_states, encoder_attention_mask)
            skips.append(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsample(hidden_states)
            skips.append(hidden_states)
        return hidden_states, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """``resnets.0``, then (``attentions.i`` -> ``resnets.i+1``) x num_layers; keeps shape [B, C, H, W]."""

    has_cross_attention = True

    def __init__(self, in_channels: int, temb_channels: int, num_layers: int = 1,
                 transformer_layers_per_block: Union[int, Sequence[int]] = 1, resnet_eps: float = 1e-6,
                 resnet_groups: int = 32, num_attention_heads: int = 1, output_scale_factor: float = 1.0,
                 cross_attention_dim: int = 1280, use_linear_projection: bool = False,
                 only_cross_attention: bool = False, upcast_attention: bool = False):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels, in_channels, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
                          output_scale_factor=output_scale_factor)
            for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList([
            _transformer(in_channels, num_attention_heads, layers[i], cross_attention_dim, resnet_groups,
                         use_linear_projection, only_cross_attention, upcast_attention)
            for i in range(num_layers)])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = resnet(attn(hidden_states, encoder_hidden_states, encoder_attention_mask), temb)
        return hidden_states


def _mark_concat_split(resnets: nn.ModuleList, prev_output_channel: int, out_channels: int) -> None:
    """Record on each up-block resnet where its input, cat([hidden_states, skip], channels), switches from the
    hidden states to the skip (``concat_split`` channels come first): the quantizer's split shortcut option
    (Q-Diffusion) quantizes the two parts of conv1's and conv_shortcut's input separately."""
    for i, resnet in enumerate(resnets):
        resnet.concat_split = prev_output_channel if i == 0 else out_channels


class UpBlock2D(nn.Module):
    """(concat a skip -> ``resnets.i``) x num_layers, then an optional nearest-2x ``upsamplers.0`` (to
    ``upsample_size`` when given, so odd skip sizes line up)."""

    has_cross_attention = False

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int = 1, resnet_eps: float = 1e-6, resnet_groups: int = 32,
                 output_scale_factor: float = 1.0, add_upsample: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels), out_channels,
                          temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
                          output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        _mark_concat_split(self.resnets, prev_output_channel, out_channels)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def layer(self, i: int, hidden_states: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor,
              encoder_hidden_states=None, encoder_attention_mask=None) -> torch.Tensor:
        """Layer ``i`` alone: concatenate ``skip`` to ``hidden_states`` (channels), then ``resnets.i``."""
        return self.resnets[i](torch.cat([hidden_states, skip], dim=1), temb)

    def upsample(self, hidden_states: torch.Tensor, upsample_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.upsamplers[0](hidden_states, upsample_size)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: Tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states=None, encoder_attention_mask=None,
                upsample_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        skips = list(res_hidden_states_tuple)
        for i in range(len(self.resnets)):
            hidden_states = self.layer(i, hidden_states, skips.pop(), temb)
        if self.upsamplers is not None:
            hidden_states = self.upsample(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """(concat a skip -> ``resnets.i`` -> ``attentions.i``) x num_layers, then an optional ``upsamplers.0``."""

    has_cross_attention = True

    def __init__(self, in_channels: int, out_channels: int, prev_output_channel: int, temb_channels: int,
                 num_layers: int = 1, transformer_layers_per_block: Union[int, Sequence[int]] = 1,
                 resnet_eps: float = 1e-6, resnet_groups: int = 32, num_attention_heads: int = 1,
                 cross_attention_dim: int = 1280, output_scale_factor: float = 1.0, add_upsample: bool = True,
                 use_linear_projection: bool = False, only_cross_attention: bool = False,
                 upcast_attention: bool = False):
        super().__init__()
        layers = _per_layer(transformer_layers_per_block, num_layers, "transformer_layers_per_block")
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels), out_channels,
                          temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
                          output_scale_factor=output_scale_factor)
            for i in range(num_layers)])
        _mark_concat_split(self.resnets, prev_output_channel, out_channels)
        self.attentions = nn.ModuleList([
            _transformer(out_channels, num_attention_heads, layers[i], cross_attention_dim, resnet_groups,
                         use_linear_projection, only_cross_attention, upcast_attention)
            for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, out_channels)]) if add_upsample else None

    def layer(self, i: int, hidden_states: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor,
              encoder_hidden_states: Optional[torch.Tensor] = None,
              encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layer ``i`` alone: concatenate ``skip`` to ``hidden_states`` (channels), ``resnets.i``, ``attentions.i``."""
        hidden_states = self.resnets[i](torch.cat([hidden_states, skip], dim=1), temb)
        return self.attentions[i](hidden_states, encoder_hidden_states, encoder_attention_mask)

    def upsample(self, hidden_states: torch.Tensor, upsample_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.upsamplers[0](hidden_states, upsample_size)

    def forward(self, hidden_states: torch.Tensor, res_hidden_states_tuple: Tuple[torch.Tensor, ...],
                temb: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None,
                upsample_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        skips = list(res_hidden_states_tuple)
        for i in range(len(self.resnets)):
            hidden_states = self.layer(i, hidden_states, skips.pop(), temb, encoder_hidden_states,
                                       encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self.upsample(hidden_states, upsample_size)
        return hidden_states
