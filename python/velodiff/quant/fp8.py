"""``Fp8Linear``: an ``nn.Linear`` replacement with FP8 weights (format: csrc/include/velodiff/fp8.h).

Buffers (N = out_features, K = in_features, T = the model dtype):

    qweight   float8_e4m3fn | float8_e5m2 [N, K]   weight codes, one scale per output channel
    wscales   float32 [N]                          weight ~= qweight.float() * wscales[:, None]
    bias      T [N] or None

Two modes (the quantizer methods of the same names):

    "fp8"               W8A8: the activations are quantized per token at run time (``velodiff::quantize_fp8``,
                        scale = max |x| / 448) and multiplied in FP8 (``velodiff::fp8_gemm``, fp32 accumulation,
                        bias and a fused activation in its epilogue): torchao's ``fp8dqrow`` arithmetic.
    "fp8-weight-only"   the weight is decoded to T and multiplied with the unquantized activations (F.linear):
                        FP8 as a storage format, half the bytes of a 16-bit weight.

Weight quantization: scales = max_k |W[n, k]| / 448 (optionally the ``clip_percentile`` of |W[n]| instead of its
maximum, so that a few outliers do not coarsen the whole row; the values beyond it saturate), codes by the
rounding rule of fp8.h.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from velodiff.ops import reference
from velodiff.ops._native import native_op

FP8_METHODS = ("fp8", "fp8-weight-only")


class KeepsCodeDtypes:
    """Mixin of quantized linear layers whose codes, decode tables and float32 scales (the buffers named in
    ``_FIXED_BUFFERS``) keep their dtype: ``.to(dtype)`` / ``.half()`` change the model dtype (the bias, the output)
    only (torch counts float8 as a floating dtype and would convert the codes); devices move every buffer."""

    _FIXED_BUFFERS: Tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self._FIXED_BUFFERS if getattr(self, name, None) is not None}
        out = super()._apply(fn, recurse)
        for name, t in kept.items():
            setattr(self, name, t.to(getattr(self, name).device))
        probe = fn(torch.zeros((), dtype=self._dtype))
        if probe.is_floating_point():
            self._dtype = probe.dtype
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype: the bias's, the output's."""
        return self.bias.dtype if self.bias is not None else self._dtype


class Fp8Linear(KeepsCodeDtypes, nn.Module):
    """A linear layer with FP8 weights (see the module docstring for the buffers and the two modes)."""

    _FIXED_BUFFERS = ("qweight", "wscales")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, method: str = "fp8", format: str = "e4m3", fused_activation: str = "none"):
        super().__init__()
        if method not in FP8_METHODS:
            raise ValueError(f"method must be one of {FP8_METHODS}, got {method!r}")
        if format not in reference.FP8_DTYPES:
            raise ValueError(f"format must be 'e4m3' or 'e5m2', got {format!r}")
        if fused_activation not in reference.QACTIVATIONS:
            raise ValueError(f"fused_activation must be one of {tuple(reference.QACTIVATIONS)}, got "
                             f"{fused_activation!r}")
        self.in_features, self.out_features, self.method, self.format = in_features, out_features, method, format
        #: activation computed in the GEMM epilogue (the module after this one then skips its own)
        self.fused_activation = fused_activation
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=reference.FP8_DTYPES[format],
                                                    device=device))
        self.register_buffer("wscales", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._dtype = dtype

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, method: str = "fp8", format: str = "e4m3",
                    clip_percentile: Optional[float] = None) -> "Fp8Linear":
        """Quantize ``linear``'s weight per output channel (max-abs scales, or the ``clip_percentile`` (0-100] of
        each row's |w|); the bias is kept in the weight's dtype."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=w.dtype,
                    device=w.device, method=method, format=format)
        layer.qweight, layer.wscales = quantize_weight(w.float(), format, clip_percentile)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"format={self.format}, fused_activation={self.fused_activation}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        dtype = self.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype).contiguous()
        if self.method == "fp8-weight-only":
            y = nn.functional.linear(x2, self.dequantized_weight().to(dtype), self.bias)
            y = reference._activation(y, reference.QACTIVATIONS[self.fused_activation])
        else:
            a, ascales = native_op("quantize_fp8")(x2, self.format)
            y = native_op("fp8_gemm")(a, ascales, self.qweight, self.wscales, self.bias, dtype,
                                      reference.QACTIVATIONS[self.fused_activation])
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight [N, K]."""
        return self.qweight.float() * self.wscales[:, None]

    def weight_bytes(self, float_bytes: int = None) -> int:
        """Bytes of every buffer: one per weight, 4 per scale, the bias at its width (or ``float_bytes``)."""
        bias = 0 if self.bias is None else self.bias.numel() * (float_bytes or self.bias.element_size())
        return self.qweight.numel() + 4 * self.wscales.numel() + bias


def quantize_weight(w: torch.Tensor, format: str = "e4m3", clip_percentile: Optional[float] = None):
    """W [N, K] float32 -> (codes [N, K] FP8, scales float32 [N]): per output channel, max-abs (or the
    ``clip_percentile`` of |W[n]|) over the format's largest value; the rule of velodiff::quantize_fp8, which gives
    the same codes and scales as this reference when there is no clipping."""
    if clip_percentile is None:
        return reference.quantize_fp8(w.float(), format)
    if not 0 < clip_percentile <= 100:
        raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile!r}")
    absw = w.float().abs()
    limit = torch.quantile(absw, clip_percentile / 100.0, dim=1) if absw.shape[1] else absw.new_zeros(absw.shape[0])
    return reference.quantize_fp8(w, format, amax=limit)
