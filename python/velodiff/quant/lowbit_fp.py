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

Execution: weights in any 4-bit format (e1m2, e2m1, e3m0, int4) or in e4m3 / e5m2 are stored packed (4-bit indices
into a 16-entry e4m3 decode table, :func:`format_table`, or FP8 codes; one float32 scale per output channel), and
with e4m3 / e5m2 activations run on ``velodiff::fp8_gemm`` (W4A8 and W8A8, csrc/include/velodiff/fp8.h); they also
save to quantized checkpoints. Other combinations (W4A4-FP, 2-, 3-, 5- to 7-bit formats, int8) are fake-quantized:
the weight decoded (or stored on its grid in the model dtype), the activations put on their grid per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from velodiff.ops import reference
from velodiff.ops._native import native_op
from velodiff.ops.reference import QACTIVATIONS, _activation
from velodiff.quant.fp8 import KeepsCodeDtypes

#: the quantizer methods built on this module: float formats searched per layer, or INT formats of the same widths
LOWBIT_METHODS = ("lowbit-fp", "lowbit-int")


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


def row_scales(t: torch.Tensor, fmt: FpFormat, clip: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scales [rows], the same with 1 where a scale is 0) of t [rows, K]: clip * max |row| / fmt.max (float32)."""
    scale = clip * t.float().abs().amax(dim=1) / fmt.max
    return scale, torch.where(scale == 0, torch.ones_like(scale), scale)


def grid_rows(t: torch.Tensor, fmt: FpFormat, clip: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization: (grid values [rows, K] float32, scales [rows]), t ~= grid * scale[:, None]; rows of
    zeros get scale 0 and grid 0."""
    scale, safe = row_scales(t, fmt, clip)
    return round_to_format(t.float() / safe[:, None], fmt), scale


def quantize_rows(t: torch.Tensor, fmt: FpFormat, clip: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row fake quantization: (values on the grid times their scale [rows, K] float32, scales [rows]); with
    e4m3 / e5m2 the values of velodiff::quantize_fp8's codes times its scales."""
    grid, scale = grid_rows(t, fmt, clip)
    return grid * torch.where(scale == 0, torch.ones_like(scale), scale)[:, None], scale


def magnitudes(fmt: FpFormat) -> torch.Tensor:
    """The non-negative values of a float or INT format, ascending (float64; 8 of them for every 4-bit format)."""
    if fmt.is_int:
        return torch.arange(2 ** fmt.man_bits, dtype=torch.float64, device="cpu")
    m = torch.arange(2 ** fmt.man_bits, dtype=torch.float64, device="cpu")
    values = [m * 2.0 ** (fmt.min_normal_exponent - fmt.man_bits)]  # subnormals (exponent field 0), zero first
    values += [(1 + m / 2 ** fmt.man_bits) * 2.0 ** (e - fmt.bias) for e in range(1, 2 ** fmt.exp_bits)]
    v = torch.cat(values)
    return v[v <= fmt.max]


def has_kernel(fmt: FpFormat) -> bool:
    """Whether weights of ``fmt`` are stored packed and run on fp8_gemm: every 4-bit format, e4m3 and e5m2."""
    return fmt.bits == 4 or fmt.name in reference.FP8_DTYPES


def format_table(fmt: FpFormat) -> torch.Tensor:
    """The decode table of a 4-bit format for ``velodiff::fp8_gemm``: float8_e4m3fn [16], entry i < 8 the i-th
    smallest magnitude, entry 8 + i its negative (every 4-bit format's values are exact in e4m3)."""
    if fmt.bits != 4:
        raise ValueError(f"a decode table is for 4-bit formats, got {fmt.name}")
    mags = magnitudes(fmt).float()
    table = reference.encode_fp8(torch.cat([mags, -mags]), "e4m3")
    assert torch.equal(table.float().abs(), torch.cat([mags, mags])), fmt.name  # exact by construction
    return table


def table_indices(grid: torch.Tensor, fmt: FpFormat) -> torch.Tensor:
    """Grid values of a 4-bit format [rows, K] -> their indices in :func:`format_table` (int64 in [0, 15])."""
    mags = magnitudes(fmt).float().to(grid.device)
    a = grid.abs()
    idx = torch.searchsorted(mags, a).clamp(max=len(mags) - 1)
    if not torch.equal(mags[idx], a):
        raise ValueError(f"values off the {fmt.name} grid")
    return idx + 8 * torch.signbit(grid).long()


def search_format(w: torch.Tensor, x: Optional[torch.Tensor], bits: int, clips: Sequence[float],
                  formats: Optional[Sequence[FpFormat]] = None,
                  target: Optional[torch.Tensor] = None) -> Tuple[FpFormat, float]:
    """The (format, clip) of ``bits``-bit float formats and clipping ratios that minimises the layer's output error
    ||x W^T - x Q(W)^T||^2 on calibration rows ``x`` [S, K] (the weight error when ``x`` is None), or
    ||target - x Q(W)^T||^2 with a ``target`` [S, N] (TFMQ-DM's reconstruction of the full-precision output)."""
    best = None
    for fmt in formats or formats_of(bits):
        for clip in clips:
            q, _ = quantize_rows(w, fmt, clip)
            if x is None:
                err = float((q - w.float()).square().sum())
            elif target is None:
                err = float(((q - w.float()) @ x.float().T).square().sum())
            else:
                err = float((x.float() @ q.T - target.float()).square().sum())
            if best is None or err < best[0]:
                best = (err, fmt, clip)
    return best[1], best[2]


def learn_rounding(w: torch.Tensor, x: torch.Tensor, fmt: FpFormat, clip: float, iters: int = 500,
                   lr: float = 1e-2, reg: float = 0.01, seed: int = 0,
                   target: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """AdaRound on the float grid: each weight goes to the grid value below or above it (not only the nearest),
    chosen to minimise ||x W^T - x Q(W)^T||^2 over calibration rows ``x`` [S, K]. A soft choice h = rectified
    sigmoid(V) in [0, 1] per weight (Nagel et al. 2020, eq. 23) is learned with Adam under the regulariser
    reg * sum(1 - |2h - 1|^beta), beta annealed from 20 to 2 (their eq. 24-25), then rounded to 0 / 1.
    ``target`` [S, N]: the output to reconstruct instead of x W^T (TFMQ-DM: the full-precision output when ``x``
    comes through quantized layers). Returns (grid values [N, K] float32, scales [N]) as :func:`grid_rows` does,
    the weight ~= grid * scales."""
    w = w.float()
    scale, safe = row_scales(w, fmt, clip)
    safe = safe[:, None]
    v = (w / safe).clamp(-fmt.max, fmt.max)
    step = grid_step(v, fmt)
    lower = torch.floor(v / step) * step
    upper = (lower + step).clamp(max=fmt.max)
    frac = ((v - lower) / step).clamp(1e-4, 1 - 1e-4)
    zeta, gamma = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound eq. 23)
    param = nn.Parameter(-torch.log((zeta - gamma) / (frac - gamma) - 1))  # h(param) = frac at the start
    opt = torch.optim.Adam([param], lr=lr)
    xf = x.float()
    target = xf @ w.T if target is None else target.float()  # the full-precision output to reconstruct

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
        return lower + hard * (upper - lower), scale


class LowbitFpLinear(KeepsCodeDtypes, nn.Module):
    """A linear layer with weights in a low-bit ``w_format`` (one scale per output channel) and activations put on
    an ``a_format`` grid per token at every call (None: not quantized).

    Buffers (N = out_features, K = in_features, T = the model dtype):
        packed weight formats (:func:`has_kernel`):
            qweight   uint8 [N, ceil(K / 2)] 4-bit indices into w_table, or FP8 codes [N, K] (e4m3 / e5m2)
            w_table   float8_e4m3fn [16] (4-bit formats; :func:`format_table`), else absent
            wscales   float32 [N]: weight = decode(qweight) * wscales[:, None]
        other formats:
            weight    T [N, K]: the grid values times their scales (fake quantization)
        bias          T [N] or None
    With a packed weight and e4m3 / e5m2 activations the layer runs ``velodiff::quantize_fp8`` + ``fp8_gemm``
    (W4A8, W8A8); otherwise it multiplies the decoded weight with the fake-quantized activations.
    """

    _FIXED_BUFFERS = ("qweight", "wscales", "w_table")

    def __init__(self, in_features: int, out_features: int, w_format: FpFormat, a_format: Optional[FpFormat],
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None, learned_rounding: bool = False,
                 method: str = "lowbit-fp", fused_activation: str = "none"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_format, self.a_format, self.learned_rounding = w_format, a_format, learned_rounding
        self.method, self._dtype = method, dtype
        n, k = out_features, in_features
        if not has_kernel(w_format):
            self.register_buffer("weight", torch.zeros(n, k, dtype=dtype, device=device))
            for name in self._FIXED_BUFFERS:
                self.register_buffer(name, None)
        elif w_format.bits == 4:
            self.register_buffer("qweight", torch.zeros(n, (k + 1) // 2, dtype=torch.uint8, device=device))
            self.register_buffer("w_table", format_table(w_format).to(device=device))
        else:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=reference.FP8_DTYPES[w_format.name],
                                                        device=device))
            self.register_buffer("w_table", None)
        if has_kernel(w_format):
            self.register_buffer("wscales", torch.zeros(n, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=dtype, device=device) if bias else None)
        self.fused_activation = fused_activation

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w={self.w_format.name}, "
                f"a={self.a_format.name if self.a_format else 'none'}, learned_rounding={self.learned_rounding}, "
                f"kernel={self.uses_kernel}")

    @property
    def uses_kernel(self) -> bool:
        """Whether forward runs fp8_gemm (a packed weight and e4m3 / e5m2 activations)."""
        return self.qweight is not None and self.a_format is not None and self.a_format.name in reference.FP8_DTYPES

    @torch.no_grad()
    def set_weight(self, grid: torch.Tensor, scales: torch.Tensor) -> None:
        """Store a weight given as grid values of w_format [N, K] (float32, unscaled) and scales [N]."""
        if self.qweight is None:
            self.weight = (grid * scales[:, None]).to(self.weight.dtype)
        elif self.w_table is not None:
            self.qweight = reference.pack_nibbles(table_indices(grid, self.w_format)).to(self.qweight.device)
        else:
            self.qweight = reference.encode_fp8(grid, self.w_format.name).to(self.qweight.device)
        if self.qweight is not None:
            self.wscales = scales.float().to(self.wscales.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight [N, K]."""
        if self.qweight is None:
            return self.weight.float()
        codes = self.qweight if self.w_table is None else \
            self.w_table[reference.unpack_nibbles(self.qweight, self.in_features)]
        return codes.float() * self.wscales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LowbitFpLinear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead, dtype = x.shape[:-1], self.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if self.uses_kernel:
            a, ascales = native_op("quantize_fp8")(x2.contiguous(), self.a_format.name)
            y = native_op("fp8_gemm")(a, ascales, self.qweight, self.wscales, self.bias, dtype,
                                      QACTIVATIONS[self.fused_activation], self.w_table)
            return y.reshape(*lead, self.out_features)
        if self.a_format is not None:
            x2 = quantize_rows(x2, self.a_format)[0].to(dtype)
        y = nn.functional.linear(x2, self.dequantized_weight().to(dtype), self.bias)
        if self.fused_activation != "none":
            y = _activation(y, QACTIVATIONS[self.fused_activation])
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self, float_bytes: int = None) -> int:
        """What the layer stores: w_format.bits per weight, a scale per row (4 bytes packed; 2 for the fake
        formats, as a 16-bit checkpoint would), the decode table, the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * (float_bytes or self.bias.element_size())
        if self.qweight is None:
            return math.ceil(self.weight.numel() * self.w_format.bits / 8) + 2 * self.out_features + bias
        table = 0 if self.w_table is None else self.w_table.numel()
        return self.qweight.numel() + 4 * self.out_features + table + bias


def quantize_linear(linear: nn.Linear, w_bits: int, a_format: Optional[FpFormat], x: Optional[torch.Tensor],
                    clips: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5), learn: bool = False,
                    iters: int = 500, int_weights: bool = False,
                    target: Optional[torch.Tensor] = None) -> LowbitFpLinear:
    """``linear`` as a LowbitFpLinear: the w_bits format and clip searched on calibration rows ``x`` (float formats,
    or the INT format of that width with ``int_weights``), then rounding learned when ``learn``; both reconstruct
    ``target`` [S, N] (without the bias) when given, else x W^T."""
    w = linear.weight.detach().reshape(linear.out_features, -1).float()
    formats = (FpFormat(0, w_bits - 1),) if int_weights else None
    fmt, clip = search_format(w, x, w_bits, clips, formats, target)
    if learn and x is not None:
        with torch.enable_grad():
            grid, scales = learn_rounding(w, x, fmt, clip, iters=iters, target=target)
    else:
        grid, scales = grid_rows(w, fmt, clip)
    layer = LowbitFpLinear(linear.in_features, linear.out_features, fmt, a_format, bias=linear.bias is not None,
                           dtype=linear.weight.dtype, device=linear.weight.device, learned_rounding=learn,
                           method="lowbit-int" if int_weights else "lowbit-fp")
    layer.set_weight(grid, scales)
    if linear.bias is not None:
        layer.bias = linear.bias.detach().clone()
    return layer
