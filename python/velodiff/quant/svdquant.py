"""Per-layer quantization math: SVDQuant (smoothing + low-rank branch + 4-bit residual), naive W4A4 and W8A8.

SVDQuant (Li et al., "SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models", ICLR
2025), for a layer y = x W^T with W [N, K]:

1. Smoothing (SmoothQuant, Xiao et al. 2023, eq. 4): x^ = x / lambda, W^ = W * lambda (per input channel k),
   lambda_k = max|x_k|^alpha / max|W_:,k|^(1 - alpha), alpha grid-searched per layer on the calibration inputs
   (the objective is the layer's output error with the low-rank branch in place, as in SVDQuant / deepcompressor).
2. Low rank (SVDQuant eq. 5): W^ = L2 L1^T + R with L2 L1^T the rank-r truncated SVD of W^ (float64). Optionally
   refined by the fixed-point iteration L <- SVD_r(W^ - Q(W^ - L)) (deepcompressor's low-rank calibration), which
   lets the branch absorb part of the residual's quantization error.
3. The residual R is quantized to int4 per (output channel, group of 64 input channels) with the rule of
   csrc/include/velodiff/qgemm.h; the branch is stored as lora_down = L1 / lambda (it multiplies the *unsmoothed*
   x) and lora_up = L2 in the model dtype.

Naive W4A4: no smoothing, no branch, W quantized as is. W8A8: the same with 8-bit codes (per group of 64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from velodiff.ops import _native, reference
from velodiff.ops import quantize_act as ops_quantize_act
from velodiff.quant.linear import QuantizedLinear

DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(0, 21))  # 0.0, 0.05, ..., 1.0


@dataclass
class LayerStats:
    """Calibration data of one linear layer's input: ``absmax`` [K] float32 over every calibration token, and
    ``sample`` [S, K] float32, a fixed-size subsample of input rows used for the search objective."""

    absmax: torch.Tensor
    sample: torch.Tensor


def _fake_quant(t: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, K] -> its quantized-dequantized float32 copy per (row, group of 64): the rule of both the weights
    (rows = output channels) and the activations (rows = tokens).

    On the CPU the codes and scales come from the native velodiff::quantize_act kernel (one fused pass; its
    codes and scales equal reference.quantize_groups' bit for bit, as tests/ops/test_qgemm.py checks), which
    makes a large layer's smoothing search ~13 % faster with identical results; on CUDA from the reference."""
    t = t.float()
    if t.device.type == "cpu" and _native.native_available():
        qx, scales, _ = ops_quantize_act(t.contiguous(), bits=bits)
        return reference.dequantize_groups(reference.unpack_codes(qx, bits), scales, t.shape[1])
    return reference.dequantize_groups(*reference.quantize_groups(t, bits), t.shape[1])


def low_rank(w: torch.Tensor, rank: int, bits: int, iters: int = 1):
    """Split W^ [N, K] (float64) into (L2 [N, r], L1 [K, r], R [N, K]) with W^ = L2 L1^T + R; ``iters`` > 1 refines
    the branch with L <- SVD_r(W^ - Q(W^ - L))."""
    target = w
    best = None
    for _ in range(max(1, iters)):
        u, s, vh = truncated_svd(target, rank)
        l2 = u * s
        l1 = vh.T
        residual = w - l2 @ l1.T
        if iters <= 1:
            return l2, l1, residual
        fq = _fake_quant(residual, bits).double()
        err = (residual - fq).norm()
        if best is not None and err >= best[0]:
            break
        best = (err, l2, l1, residual)
        target = w - fq
    return best[1], best[2], best[3]


def truncated_svd(w: torch.Tensor, rank: int):
    """(U [N, r], S [r], V^T [r, K]) of the rank-r truncated SVD of ``w`` (float64 results).

    Small layers (<= 2^20 elements): the exact float64 SVD, as deepcompressor does. Larger ones: a randomized
    range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4: Gaussian sketch of r + 16 columns, 4 power iterations,
    float32, seeded so the result is reproducible) followed by an exact SVD of the small projected matrix, which
    is ~10x cheaper than a full SVD of a 10240 x 1280 weight and recovers its top-r subspace to working accuracy
    (the grid search calls it once per smoothing strength)."""
    n, k = w.shape
    if w.numel() <= 1 << 20 or min(n, k) <= rank + 16:
        u, s, vh = torch.linalg.svd(w.double() if w.numel() <= 1 << 20 else w.float(), full_matrices=False)
        return u[:, :rank].double(), s[:rank].double(), vh[:rank].double()
    a = w.float()
    gen = torch.Generator().manual_seed(0)
    sketch = torch.randn(k, rank + 16, generator=gen).to(a.device)  # drawn on the CPU: the same on every device
    q = torch.linalg.qr(a @ sketch)[0]
    for _ in range(4):  # power iterations, re-orthonormalised each time
        q = torch.linalg.qr(a @ torch.linalg.qr(a.T @ q)[0])[0]
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub[:, :rank]).double(), s[:rank].double(), vh[:rank].double()


def quantize_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], method: str, stats: Optional[LayerStats],
                   rank: int = 32, alphas: Sequence[float] = DEFAULT_ALPHAS, lowrank_iters: int = 1,
                   dtype: Optional[torch.dtype] = None) -> QuantizedLinear:
    """Quantize one linear layer (``weight`` [N, K], ``bias`` [N] or None) into a :class:`QuantizedLinear` in
    ``dtype`` (default: the weight's). ``stats`` (calibration inputs) is required for SVDQuant's smoothing search;
    without it SVDQuant uses lambda = 1 (low rank only). ``rank`` 0 keeps the smoothing alone. The math runs in
    float64 on the weight's device (a GPU quantizes a large model in a fraction of the CPU's time)."""
    n, k = weight.shape
    dtype = dtype or weight.dtype
    device = weight.device
    w = weight.detach().double()
    if stats is not None:
        stats = LayerStats(absmax=stats.absmax.to(device), sample=stats.sample.to(device))
    bits = 8 if method == "w8a8" else 4
    if method in ("naive-w4a4", "w8a8"):
        layer = QuantizedLinear(k, n, bits=bits, rank=0, smooth=False, bias=bias is not None, dtype=dtype,
                                method=method)
        codes, scales = reference.quantize_groups(w.float(), bits)
        layer.qweight.copy_(reference.pack_codes(codes, bits))
        layer.wscales.copy_(scales.to(dtype))
    elif method == "svdquant":
        rank = min(rank, n, k)
        best = None
        candidates = alphas if stats is not None else (None,)
        search = stats is not None and len(candidates) > 1  # one candidate: nothing to compare
        if search:
            x = stats.sample.double()
            ref = x @ w.T  # the unquantized outputs, the same for every candidate
        for alpha in candidates:
            lam = (smoothing_factor(stats.absmax.double(), w, alpha) if alpha is not None
                   else torch.ones(k, dtype=torch.float64, device=device))
            l2, l1, residual = low_rank(w * lam[None, :], rank, bits, lowrank_iters)
            if stats is None:
                best = (0.0, lam, l2, l1, residual)
                break
            err = _output_error(x, ref, lam, l2, l1, residual, bits) if search else 0.0
            if best is None or err < best[0]:
                best = (err, lam, l2, l1, residual)
        _, lam, l2, l1, residual = best
        layer = QuantizedLinear(k, n, bits=4, rank=rank, smooth=True, bias=bias is not None, dtype=dtype,
                                method=method)
        codes, scales = reference.quantize_groups(residual.float(), bits)
        layer.qweight.copy_(reference.pack_codes(codes, bits))
        layer.wscales.copy_(scales.to(dtype))
        layer.smooth.copy_(lam.float())
        if rank > 0:  # a tight memory budget can leave smoothing alone
            layer.lora_down.copy_((l1 / lam[:, None]).to(dtype))  # (built on the CPU, moved at the end)
            layer.lora_up.copy_(l2.to(dtype))
    else:
        raise ValueError(f"method must be one of svdquant, naive-w4a4, w8a8; got {method!r}")
    if bias is not None:
        layer.bias.copy_(bias.detach().to(dtype))
    return layer.to(device)


def smoothing_factor(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda [K] = max|x_k|^alpha / max_n |W[n, k]|^(1 - alpha), normalised to geometric mean 1 and kept away
    from 0 (a channel that never fires gets lambda from the weight alone)."""
    wmax = w.abs().amax(0).clamp_min(1e-8)
    xmax = x_absmax.clamp_min(1e-8)
    lam = xmax.pow(alpha) / wmax.pow(1.0 - alpha)
    lam = lam / lam.log().mean().exp()
    return lam.clamp(1e-4, 1e4)


def _output_error(x: torch.Tensor, ref: torch.Tensor, lam: torch.Tensor, l2: torch.Tensor, l1: torch.Tensor,
                  residual: torch.Tensor, bits: int) -> float:
    """Squared output error of the quantized layer on the calibration rows ``x`` [S, K] against their unquantized
    outputs ``ref`` = x W^T [S, N] (activations and residual fake-quantized with the kernels' rule; the branch in
    float64)."""
    xs = x / lam[None, :]
    q = _fake_quant(xs.float(), bits).double() @ _fake_quant(residual.float(), bits).double().T
    out = q + (x @ (l1 / lam[:, None])) @ l2.T
    return float((out - ref).pow(2).sum())
