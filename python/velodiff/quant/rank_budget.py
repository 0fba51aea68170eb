"""A memory budget for SVDQuant: the largest uniform branch rank whose denoiser fits a byte limit.

The bytes of a quantized layer are exact before any quantization (codes, 16-bit scales, the rank-r 16-bit branch,
float32 smoothing and strengths, 16-bit bias), so the rank is chosen up front, on meta-device shells.

Why uniform: a per-layer allocation that drops the ranks removing the least relative weight energy
(sigma_i^2 / ||W||_F^2) per byte was tried (commit 995bb46; bench/results/quant_rank_budget_digits.md). At equal
bytes it improved the digits UNet at one budget (FD 0.389 vs 0.501 with rank 2 everywhere), tied at another,
and made digits-dit much worse (FD 1.62 vs 0.58): weight energy does not tell which layers' outputs matter, so
the rule is not safe. A uniform rank is the method as published, at the largest rank the budget allows.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


def quantized_bytes(layers: Dict[str, nn.Module], rank: int) -> int:
    """Bytes of ``layers`` (nn.Linear / nn.Conv2d) quantized by SVDQuant at ``rank`` (capped per layer at
    min(N, K)), stored with 16-bit floating parts."""
    from velodiff.quant.linear import QuantizedLinear
    total = 0
    with torch.device("meta"):
        for m in layers.values():
            n, k = m.weight.shape[0], m.weight[0].numel()
            total += QuantizedLinear(k, n, bits=4, rank=min(rank, n, k), smooth=True, bias=m.bias is not None,
                                     dtype=torch.float16).weight_bytes()
    return total


def rank_for_budget(layers: Dict[str, nn.Module], max_rank: int, fraction: float, model_fp16: int,
                    layers_fp16: int) -> int:
    """The largest rank <= ``max_rank`` (possibly 0: smoothing alone) at which the denoiser (``model_fp16`` bytes
    in fp16, ``layers_fp16`` of them in ``layers``) takes at most ``fraction`` of its fp16 bytes once ``layers`` are
    quantized. Raises ValueError naming the least reachable fraction when even rank 0 is too big."""
    budget = fraction * model_fp16 - (model_fp16 - layers_fp16)  # what the quantized layers may take
    lo, hi = 0, max_rank
    if quantized_bytes(layers, 0) > budget:
        least = (model_fp16 - layers_fp16 + quantized_bytes(layers, 0)) / model_fp16
        raise ValueError(f"memory_budget={fraction} cannot be met: with these layers quantized and no low-rank "
                         f"branch at all the denoiser is {least:.3f}x its fp16 bytes (quantize more layers: "
                         "layers='all' or include=; or raise the budget)")
    while lo < hi:  # bytes grow with the rank: bisect for the largest rank that fits
        mid = (lo + hi + 1) // 2
        if quantized_bytes(layers, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
