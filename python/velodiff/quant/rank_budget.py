"""A memory budget for SVDQuant: per-layer ranks of the 16-bit low-rank branch under a byte limit.

Every rank of a layer's branch costs the same bytes (a column of lora_down [K] and of lora_up [N] in 16 bits,
plus its float32 strength) but removes a different share of the layer's (smoothed) weight: rank i takes sigma_i^2
out of ||W^||_F^2 (Eckart-Young), and what is left is quantized to int4, whose error grows with the residual's
magnitude. Given each layer's singular values from the SVDQuant search, :func:`allocate_ranks` drops the rank slots
with the smallest relative energy sigma_i^2 / ||W^||_F^2 per byte until the branches fit; because sigma decreases
with i, what a layer loses is always its last ranks, so the result is a rank per layer.
"""
from __future__ import annotations

import heapq
from typing import Dict, Tuple

import torch
from torch import nn


def branch_slot_bytes(layer: nn.Module) -> int:
    """Bytes one rank of the branch adds to ``layer``'s quantized form (nn.Linear or nn.Conv2d, as im2col)."""
    n, k = layer.weight.shape[0], layer.weight[0].numel()
    return 2 * (n + k) + 4


def allocate_ranks(slots: Dict[str, Tuple[torch.Tensor, float, int]], excess: float) -> Dict[str, int]:
    """Ranks per layer after removing at least ``excess`` bytes of branch.

    slots: name -> (sigma [r] singular values of the layer's branch, descending; energy = ||W^||_F^2; bytes per
    rank). Returns name -> rank in [0, r]. Raises ValueError if removing every rank is still not enough."""
    ranks = {name: len(sigma) for name, (sigma, _, _) in slots.items()}
    heap = []  # (relative energy per byte of the layer's last remaining rank, name)
    for name, (sigma, energy, cost) in slots.items():
        if ranks[name]:
            heap.append((float(sigma[-1]) ** 2 / max(energy, 1e-300) / cost, name))
    heapq.heapify(heap)
    removed = 0
    while removed < excess:
        if not heap:
            raise ValueError(f"the branch budget cannot be met: {excess - removed:.0f} bytes over with rank 0 "
                             "everywhere")
        _, name = heapq.heappop(heap)
        sigma, energy, cost = slots[name]
        ranks[name] -= 1
        removed += cost
        if ranks[name]:
            heapq.heappush(heap, (float(sigma[ranks[name] - 1]) ** 2 / max(energy, 1e-300) / cost, name))
    return ranks


def check_budget_feasible(layers: Dict[str, nn.Module], budget: float, fraction: float, model_fp16: int) -> None:
    """Raise ValueError (before any work) if the quantized layers cannot fit ``budget`` bytes even without
    branches; ``fraction`` and ``model_fp16`` only word the message."""
    from velodiff.quant.linear import QuantizedLinear
    floor = 0
    with torch.device("meta"):
        for m in layers.values():
            n, k = m.weight.shape[0], m.weight[0].numel()
            floor += QuantizedLinear(k, n, bits=4, rank=0, smooth=True, bias=m.bias is not None,
                                     dtype=torch.float16).weight_bytes()
    if floor > budget:
        least = (model_fp16 * fraction - budget + floor) / model_fp16
        raise ValueError(f"memory_budget={fraction} cannot be met: with these layers quantized and no low-rank "
                         f"branch at all the denoiser is {least:.3f}x its fp16 bytes (quantize more layers: "
                         "layers='all' or include=; or raise the budget)")
