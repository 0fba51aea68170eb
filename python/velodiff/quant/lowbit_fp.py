"""Low-bit floating-point quantization with a per-layer format search and learned weight rounding.

After Chen, Giannoula and Moshovos, "Low-Bitwidth Floating Point Quantization for Efficient High-Quality Diffusion
Models" (arXiv 2408.06995): a b-bit float format (sign, e exponent bits, m = b - 1 - e mantissa bits) is chosen per
layer together with its clipping range, by the error it causes on the layer's calibration inputs; the weights'
rounding (up or down onto the format's grid) is then learned by gradient descent on the same error (AdaRound,
Nagel et al. 2020, applied to a float grid). Activations are quantized per token at run time in their own format.

Formats (:class:`FpFormat`): exponent bias 2^(e-1) - 1, subnormals, round to nearest even. 8-bit formats follow
OCP FP8 (e4m3: largest 448, its all-ones code is NaN; e5m2: largest 57344, IEEE infinities), so their grid is
exactly velodiff::quantize_fp8's; narrower formats use every code for a finite value (as the OCP MX element formats
do: e2m1 is {0, 0.5, 1, 1.5, 2, 3, 4, 6}), largest 2^(2^e - 1 - bias) (2 - 2^-m). INT formats of the same width
(symmetric, [-(2^(b-1) - 1), 2^(b-1) - 1]) are the same machinery's baseline.

Execution is fake-quantized (the weight is stored on its grid in the model dtype, the activations are put on theirs
per call) until kernels exist for these formats (FP8 W8A8 has one: :mod:`velodiff.quant.fp8`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from velodiff.ops.reference import QACTIVATIONS, _activation


@dataclass(frozen=True)
class FpFormat:
    """A float format of ``1 + exp_bits + man_bits`` bits (exp_bits = 0: a symmetric integer format)."""

    exp_bits: int
    man_bits: int

    def __post_init__(self):
        if self.exp_bits < 0 or self.man_bits < 0 or self.bits < 2 or self.bits > 8:
            raise ValueError(f"a format needs 2 to 8 bits with exp_bits, man_bits >= 0; got e{self.exp_bits}"
                             f"m{self.man_bits}")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def is_int(self) -> bool:
        return self.exp_bits == 0

    @property
    def name(self) -> str:
        return f"int{self.bits}" if self.is_int else f"e{self.exp_bits}m{self.man_bits}"

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1 if self.exp_bits else 0

    @property
    def max(self) -> float:
        """The largest finite value."""
        if self.is_int:
            return float(2 ** self.man_bits - 1)
        if (self.exp_bits, self.man_bits) == (4, 3):
            return 448.0
        if (self.exp_bits, self.man_bits) == (5, 2):
            return 57344.0
        return 2.0 ** (2 ** self.exp_bits - 1 - self.bias) * (2 - 2.0 ** -self.man_bits)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.bias

    @classmethod
    def parse(cls, name: str) -> "FpFormat":
        """"e2m1", "e4m3", ... or "int4", "int8"."""
        n = name.strip().lower()
        try:
            if n.startswith("int"):
                return cls(0, int(n[3:]) - 1)
            e, m = n[1:].split("m")
            if n[0] != "e":
                raise ValueError
            return cls(int(e), int(m))
        except ValueError:
            raise ValueError(f"format must look like e2m1, e4m3 or int4, got {name!r}") from None


def formats_of(bits: int) -> Tuple[FpFormat, ...]:
    """Every float format of ``bits`` bits with at least one exponent bit (e1m2, e2m1, e3m0 for 4 bits)."""
    return tuple(FpFormat(e, bits - 1 - e) for e in range(1, bits))


def grid_step(v: torch.Tensor, fmt: FpFormat) -> torch.Tensor:
    """The spacing of ``fmt``'s grid at each |v| (unscaled): 2^(max(floor(log2 |v|), 1 - bias) - m); 1 for INT."""
    if fmt.is_int:
        return torch.ones_like(v)
    a = v.abs().clamp_min(2.0 ** (fmt.min_normal_exponent - 1))
    exponent = torch.floor(torch.log2(a)).clamp_min(fmt.min_normal_exponent)
    return torch.exp2(exponent - fmt.man_bits)


def round_to_format(v: torch.Tensor, fmt: FpFormat) -> torch.Tensor:
    """``v`` (already divided by its scale) rounded to the nearest value of ``fmt`` (ties to even), saturated at
    +-fmt.max; float32 in and out. NaN stays NaN."""
    v = v.float()
    step = grid_step(v, fmt)
    q = torch.round(v / step) * step  # torch.round: half to even, and v / step is exact (a power of two)
    return q.clamp(-fmt.max, fmt.max)


def quantize_rows(t: torch.Tensor, fmt: FpFormat, clip: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row fake quantization: (values on the grid times their scale [rows, K] float32, scales [rows]) with
    scale = clip * max |row| / fmt.max (rows of zeros keep scale 0 and stay 0)."""
    t = t.float()
    scale = clip * t.abs().amax(dim=1) / fmt.max
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return round_to_format(t / safe[:, None], fmt) * safe[:, None], scale


def search_format(w: torch.Tensor, x: Optional[torch.Tensor], bits: int, clips: Sequence[float],
                  formats: Optional[Sequence[FpFormat]] = None) -> Tuple[FpFormat, float]:
    """The (format, clip) of ``bits``-bit float formats and clipping ratios that minimises the layer's output error
    ||x W^T - x Q(W)^T||^2 on calibration rows ``x`` [S, K] (the weight error when ``x`` is None)."""
    best = None
    for fmt in formats or formats_of(bits):
        for clip in clips:
            q, _ = quantize_rows(w, fmt, clip)
            err = float(((q - w.float()) @ x.float().T).square().sum()) if x is not None else \
                float((q - w.float()).square().sum())
            if best is None or err < best[0]:
                best = (err, fmt, clip)
    return best[1], best[2]


def learn_rounding(w: torch.Tensor, x: torch.Tensor, fmt: FpFormat, clip: float, iters: int = 500,
                   lr: float = 1e-2, reg: float = 0.01, seed: int = 0) -> torch.Tensor:
    """AdaRound on the float grid: each weight goes to the grid value below or above it (not only the nearest),
    chosen to minimise ||x W^T - x Q(W)^T||^2 over calibration rows ``x`` [S, K]. A soft choice h = rectified
    sigmoid(V) in [0, 1] per weight (Nagel et al. 2020, eq. 23) is learned with Adam under the regulariser
    reg * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 (their eq. 24-25), then rounded to 0 / 1.
    Returns the quantized weight [N, K] float32 (values times scales), on the same grid and scales as
    :func:`quantize_rows`."""
    w = w.float()
    scale = clip * w.abs().amax(dim=1) / fmt.max
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)[:, None]
    v = (w / safe).clamp(-fmt.max, fmt.max)
    step = grid_step(v, fmt)
    lower = torch.floor(v / step) * step
    upper = (lower + step).clamp(max=fmt.max)
    frac = ((v - lower) / step).clamp(1e-4, 1 - 1e-4)
    zeta, gamma = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound eq. 23)
    param = nn.Parameter(-torch.log((zeta - gamma) / (frac - gamma) - 1))  # h(param) = frac at the start
    opt = torch.optim.Adam([param], lr=lr)
    xf = x.float()
    target = xf @ w.T

    def soft():
        return (torch.sigmoid(param) * (zeta - gamma) + gamma).clamp(0, 1)

    torch.manual_seed(seed)
    for i in range(iters):
        beta = 20 - (20 - 2) * i / max(1, iters - 1)
        h = soft()
        q = (lower + h * (upper - lower)) * safe
        loss = (xf @ q.T - target).square().sum() / max(1, xf.shape[0])
        loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hard = (soft() >= 0.5).float()
        return (lower + hard * (upper - lower)) * safe


class LowbitFpLinear(nn.Module):
    """A fake-quantized linear layer: weight on a ``w_format`` grid (per output channel scales, already applied),
    activations put on an ``a_format`` grid per token at every call (None: not quantized).

    Buffers: ``weight`` [N, K] in the model dtype (the grid values times their scales), ``bias`` [N] or None.
    """

    def __init__(self, in_features: int, out_features: int, w_format: FpFormat, a_format: Optional[FpFormat],
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None, learned_rounding: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_format, self.a_format, self.learned_rounding = w_format, a_format, learned_rounding
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.fused_activation = "none"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w={self.w_format.name}, "
                f"a={self.a_format.name if self.a_format else 'none'}, learned_rounding={self.learned_rounding}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_format is not None:
            lead = x.shape[:-1]
            q, _ = quantize_rows(x.reshape(-1, self.in_features), self.a_format)
            x = q.to(x.dtype).reshape(*lead, self.in_features)
        y = nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if self.fused_activation != "none":
            y = _activation(y, QACTIVATIONS[self.fused_activation])
        return y

    def weight_bytes(self, float_bytes: int = None) -> int:
        """What the layer would store: w_format.bits per weight, a 16-bit scale per row, the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * (float_bytes or self.bias.element_size())
        return math.ceil(self.weight.numel() * self.w_format.bits / 8) + 2 * self.out_features + bias


def quantize_linear(linear: nn.Linear, w_bits: int, a_format: Optional[FpFormat], x: Optional[torch.Tensor],
                    clips: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), learn: bool = False,
                    iters: int = 500, int_weights: bool = False) -> LowbitFpLinear:
    """``linear`` as a LowbitFpLinear: the w_bits format and clip searched on calibration rows ``x`` (float formats,
    or the INT format of that width with ``int_weights``), then rounding learned when ``learn``."""
    w = linear.weight.detach().reshape(linear.out_features, -1).float()
    formats = (FpFormat(0, w_bits - 1),) if int_weights else None
    fmt, clip = search_format(w, x, w_bits, clips, formats)
    if learn and x is not None:
        with torch.enable_grad():
            q = learn_rounding(w, x, fmt, clip, iters=iters)
    else:
        q, _ = quantize_rows(w, fmt, clip)
    layer = LowbitFpLinear(linear.in_features, linear.out_features, fmt, a_format, bias=linear.bias is not None,
                           dtype=linear.weight.dtype, device=linear.weight.device, learned_rounding=learn)
    layer.weight = q.to(linear.weight.dtype)
    if linear.bias is not None:
        layer.bias = linear.bias.detach().clone()
    return layer
