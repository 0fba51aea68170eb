"""``QuantizedConv2d``: a convolution run as im2col + the quantized GEMM (``quantize_act`` + ``qgemm``).

The weight [Cout, Cin, kh, kw] is flattened to [Cout, Cin * kh * kw] in F.unfold's patch order (channel major,
then kernel row, then kernel column), so every patch is one row of activations and the layer is exactly a
:class:`QuantizedLinear` over patches (same buffers, same quantizers, same LoRA handling). Only ordinary
convolutions: groups 1, zero padding given as numbers.

forward(x [B, Cin, H, W] in T) -> [B, Cout, Ho, Wo] in T.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from velodiff.quant.linear import QuantizedLinear


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_is_supported(conv: nn.Module) -> bool:
    """Whether ``conv`` is an nn.Conv2d this layer can replace (groups 1, numeric zero padding)."""
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def conv_geometry(conv: nn.Conv2d) -> dict:
    return {"in_channels": conv.in_channels, "kernel_size": list(_pair(conv.kernel_size)),
            "stride": list(_pair(conv.stride)), "padding": list(_pair(conv.padding)),
            "dilation": list(_pair(conv.dilation))}


def conv_patches(x: torch.Tensor, geometry: dict) -> torch.Tensor:
    """[B, C, H, W] -> the im2col rows [B * L, C * kh * kw] (L = Ho * Wo output positions)."""
    cols = F.unfold(x, geometry["kernel_size"], dilation=geometry["dilation"], padding=geometry["padding"],
                    stride=geometry["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class QuantizedConv2d(QuantizedLinear):
    """A Conv2d over im2col patches with quantized weights (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 **kwargs):
        kh, kw = _pair(kernel_size)
        super().__init__(in_channels * kh * kw, out_channels, **kwargs)
        self.geometry = {"in_channels": in_channels, "kernel_size": [kh, kw], "stride": list(_pair(stride)),
                         "padding": list(_pair(padding)), "dilation": list(_pair(dilation))}

    @classmethod
    def from_linear(cls, layer: QuantizedLinear, conv: nn.Conv2d) -> "QuantizedConv2d":
        """The conv twin of ``layer`` (quantized from ``conv.weight.reshape(Cout, -1)``), sharing its buffers."""
        g = conv_geometry(conv)
        with torch.device("meta"):
            out = cls(g["in_channels"], layer.out_features, g["kernel_size"], g["stride"], g["padding"],
                      g["dilation"], bits=layer.bits, rank=0, smooth=False, bias=False, method=layer.method,
                      fused_activation=layer.fused_activation)
        out._buffers = dict(layer._buffers)
        out.base_rank = layer.base_rank
        return out

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{g['in_channels']}, {self.out_features}, kernel_size={tuple(g['kernel_size'])}, "
                f"stride={tuple(g['stride'])}, padding={tuple(g['padding'])}, " + super().extra_repr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        if x.dim() != 4 or x.shape[1] != g["in_channels"]:
            raise ValueError(f"QuantizedConv2d expects [B, {g['in_channels']}, H, W] inputs, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g["kernel_size"], g["stride"], g["padding"], g["dilation"]
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        y = super().forward(conv_patches(x.to(self.dtype), g))  # [B * Ho * Wo, Cout]
        return y.reshape(b, ho * wo, self.out_features).transpose(1, 2).reshape(b, self.out_features, ho, wo)


class SplitConv2d(nn.Module):
    """Split shortcut quantization (Li et al., Q-Diffusion, 2023, sec. 4.2): a convolution whose input concatenates
    two tensors of different ranges along channels (a UNet up block's hidden states and skip), computed as the sum
    of two quantized convolutions, one per part, so each part gets its own activation scales:
    conv(cat([h, s])) = conv_first(h) + conv_second(s) (the bias in ``first``).

    forward(x [B, split + C2, H, W]) -> [B, Cout, Ho, Wo].
    """

    def __init__(self, first: Optional[nn.Module], second: Optional[nn.Module], split: int):
        super().__init__()
        self.first, self.second, self.split = first, second, int(split)

    def extra_repr(self) -> str:
        return f"split={self.split}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x[:, :self.split]) + self.second(x[:, self.split:])

    def weight_bytes(self, float_bytes: int = None) -> int:
        return self.first.weight_bytes(float_bytes) + self.second.weight_bytes(float_bytes)
