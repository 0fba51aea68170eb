"""Spatial transformer of the SD UNets (diffusers' ``Transformer2DModel`` continuous-input path and its
``BasicTransformerBlock``, same parameter names).

Layout note: the blocks work on tokens [B, H*W, C]. A feature map stored channels-last ([B, C, H, W] with
strides of [B, H, W, C]) becomes tokens by a free view, and the output goes back the same way, so a
channels-last UNet runs its transformers without a single layout copy.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .feedforward import FeedForward


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention (``norm1``, ``attn1``), cross-attention (``norm2``, ``attn2``) and a
    feed-forward (``norm3``, ``ff``), each added to the residual stream. [B, L, dim] -> [B, L, dim].

    ``only_cross_attention``: ``attn1`` also attends to ``encoder_hidden_states``. ``double_self_attention``:
    ``attn2`` is a second self-attention. ``attn2`` exists when ``cross_attention_dim`` is given or
    ``double_self_attention`` is set (diffusers' rule).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 cross_attention_dim: Optional[int] = None, activation_fn: str = "geglu", attention_bias: bool = False,
                 only_cross_attention: bool = False, double_self_attention: bool = False,
                 upcast_attention: bool = False, norm_elementwise_affine: bool = True, norm_eps: float = 1e-5,
                 ff_inner_dim: Optional[int] = None, ff_bias: bool = True, attention_out_bias: bool = True):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                               out_bias=attention_out_bias, upcast_attention=upcast_attention)
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(dim, cross_attention_dim=None if double_self_attention else cross_attention_dim,
                                   heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                                   out_bias=attention_out_bias, upcast_attention=upcast_attention)
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn=activation_fn, inner_dim=ff_inner_dim, bias=ff_bias)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [B, L, dim]; encoder_hidden_states [B, Lk, cross_attention_dim] or None;
        encoder_attention_mask: additive bias broadcastable to [B, heads, L, Lk] (or a [B, Lk] keep-mask)."""
        x = hidden_states
        ctx1 = encoder_hidden_states if self.only_cross_attention else None
        mask1 = encoder_attention_mask if self.only_cross_attention else None
        # each branch returns a fresh tensor, so the residual is added into it in place (one pass, no allocation)
        x = self.attn1(self.norm1(x), ctx1, mask1).add_(x)
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), encoder_hidden_states, encoder_attention_mask).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """GroupNorm -> ``proj_in`` -> ``transformer_blocks`` -> ``proj_out`` -> + input, on a feature map.

    [B, in_channels, H, W] -> [B, in_channels, H, W], same dtype. ``proj_in`` / ``proj_out`` are 1x1 convs
    (SD 1.x) or Linear (``use_linear_projection``: SD 2.x, SDXL); both are applied as one GEMM over the tokens.
    Inner width is ``num_attention_heads * attention_head_dim``.
    """

    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 88, in_channels: Optional[int] = None,
                 out_channels: Optional[int] = None, num_layers: int = 1, cross_attention_dim: Optional[int] = None,
                 norm_num_groups: int = 32, use_linear_projection: bool = False, only_cross_attention: bool = False,
                 double_self_attention: bool = False, upcast_attention: bool = False, activation_fn: str = "geglu",
                 attention_bias: bool = False, norm_eps: float = 1e-5, norm_elementwise_affine: bool = True):
        super().__init__()
        if in_channels is None:
            raise ValueError("in_channels must be given (only the continuous-input path is implemented)")
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(f"out_channels ({out_channels}) must equal in_channels ({in_channels}): the output is "
                             "added to the input")
        inner = num_attention_heads * attention_head_dim
        self.in_channels, self.inner_dim = in_channels, inner
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim,
                                  cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                                  attention_bias=attention_bias, only_cross_attention=only_cross_attention,
                                  double_self_attention=double_self_attention, upcast_attention=upcast_attention,
                                  norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps)
            for _ in range(num_layers)])
        if use_linear_projection:
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)

    @staticmethod
    def _token_linear(tokens: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """A 1x1 Conv2d applied as the equivalent Linear, or a Linear (or any module on tokens, such as a quantized
        replacement), on [B, L, Cin] -> [B, L, Cout]."""
        if hasattr(layer, "token_linear"):  # a packed 1x1 conv (velodiff.models.conv_prepack.PackedConv2d)
            return layer.token_linear(tokens)
        if isinstance(layer, nn.Conv2d):
            weight = layer.weight
            return F.linear(tokens, weight.view(weight.shape[0], weight.shape[1]), layer.bias)
        return layer(tokens)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [B, C, H, W] (any memory format; channels-last avoids two copies),
        encoder_hidden_states [B, Lk, cross_attention_dim] -> [B, C, H, W]."""
        if hidden_states.dim() != 4 or hidden_states.shape[1] != self.in_channels:
            raise ValueError(f"hidden_states must be [B, {self.in_channels}, H, W], got {tuple(hidden_states.shape)}")
        b, c, h, w = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states).permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self._token_linear(x, self.proj_in)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states, encoder_attention_mask)
        x = self._token_linear(x, self.proj_out).view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last view
        if residual.is_contiguous(memory_format=torch.channels_last):
            return x.add_(residual)
        return residual + x  # the first operand's layout wins, so an NCHW caller gets NCHW back
