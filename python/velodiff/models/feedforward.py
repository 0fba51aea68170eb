"""Transformer feed-forward (diffusers' ``FeedForward`` names: ``net.0.proj``, ``net.2``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("geglu", "gelu", "gelu-approximate")


class GELU(nn.Module):
    """``proj`` then GELU (exact, or the tanh approximation). A ``proj`` that applies the activation itself (a
    quantized layer whose GEMM epilogue computes it: ``fused_activation`` = "gelu" / "gelu_tanh") is used as is."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    @property
    def activation_name(self) -> str:
        """The activation as velodiff's ops name it (``"gelu"`` or ``"gelu_tanh"``)."""
        return "gelu_tanh" if self.approximate == "tanh" else "gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.proj, "fused_activation", "none") == self.activation_name:
            return self.proj(x)
        return F.gelu(self.proj(x), approximate=self.approximate)


class GEGLU(nn.Module):
    """Shazeer 2020: ``proj`` to 2*dim_out, split into (h, gate), return h * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """[..., dim] -> [..., dim_out or dim]: activation projection (``net.0``), dropout (``net.1``), ``net.2``."""

    def __init__(self, dim: int, dim_out: int = None, mult: int = 4, activation_fn: str = "geglu",
                 inner_dim: int = None, bias: bool = True):
        super().__init__()
        inner = inner_dim or int(dim * mult)
        if activation_fn == "geglu":
            act = GEGLU(dim, inner, bias=bias)
        elif activation_fn == "gelu":
            act = GELU(dim, inner, bias=bias)
        elif activation_fn == "gelu-approximate":
            act = GELU(dim, inner, approximate="tanh", bias=bias)
        else:
            raise ValueError(f"activation_fn must be one of {ACTIVATIONS}, got {activation_fn!r}")
        self.net = nn.ModuleList([act, nn.Dropout(0.0), nn.Linear(inner, dim_out or dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x
