"""Pure-PyTorch references of every velodiff op.

These are the specifications: the CPU and CUDA kernels must match them (see the tolerances in the blueprint).
They take the same arguments as the wrappers in :mod:`velodiff.ops` and do no argument checking.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Coefficient layout of sampler_update; mirrors csrc/include/velodiff/sampler_update.h.
COEF_W, COEF_DELTA, COEF_PX, COEF_PM = 0, 1, 2, 3
COEF_CX, COEF_CA, COEF_CD, COEF_CZ = 4, 5, 6, 7
COEF_EX, COEF_EA, COEF_ED = 8, 9, 10
COEF_HEADER = 11
MAX_HISTORY = 8


def sampler_coef_count(history_slots: int) -> int:
    """Length of one coefficient row for ``history_slots`` ring-buffer slots."""
    return COEF_HEADER + 3 * history_slots


def sampler_update(
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    anchor: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    coef: torch.Tensor,
    write_slot: int = -1,
    guidance_rescale: float = 0.0,
    want_y: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``velodiff::sampler_update`` (semantics in csrc/include/velodiff/sampler_update.h).

    Shapes: x, anchor, noise [B, ...] fp32; cond, uncond [B, ...] fp16/bf16/fp32; history [K, B, ...] fp32,
    updated in place at ``write_slot``; coef [11 + 3K] fp32. Returns (x_next [B, ...] fp32, y [B, ...] fp32
    or an empty tensor when ``want_y`` is False). ``compute_dtype=torch.float64`` gives the oracle used by the
    tests.
    """
    cd = compute_dtype
    k = 0 if history is None else history.shape[0]
    c = coef.to(cd)
    xf = x.to(cd)
    g = cond.to(cd)
    if uncond is not None:
        u = c[COEF_DELTA] * uncond.to(cd)
        guided = u + c[COEF_W] * (g - u)
        if guidance_rescale > 0:
            b = x.shape[0]
            std_c = g.reshape(b, -1).std(dim=1, unbiased=True)
            std_g = guided.reshape(b, -1).std(dim=1, unbiased=True)
            ratio = (1.0 - guidance_rescale) + guidance_rescale * std_c / std_g
            guided = guided * ratio.reshape((b,) + (1,) * (x.dim() - 1))
        g = guided
    h = history.to(cd) if history is not None else None
    q = c[COEF_HEADER:COEF_HEADER + k]
    ck = c[COEF_HEADER + k:COEF_HEADER + 2 * k]
    ek = c[COEF_HEADER + 2 * k:COEF_HEADER + 3 * k]

    def hist_sum(weights: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return torch.zeros_like(xf)
        return torch.einsum("k,k...->...", weights, h)

    d = c[COEF_PX] * xf + c[COEF_PM] * g + hist_sum(q)
    a = anchor.to(cd) if anchor is not None else torch.zeros_like(xf)
    z = noise.to(cd) if noise is not None else torch.zeros_like(xf)
    x_next = c[COEF_CX] * xf + c[COEF_CA] * a + c[COEF_CD] * d + hist_sum(ck) + c[COEF_CZ] * z
    if want_y:
        y = c[COEF_EX] * xf + c[COEF_EA] * a + c[COEF_ED] * d + hist_sum(ek)
        y = y.to(torch.float32) if cd != torch.float64 else y
    else:
        y = x.new_empty((0,))
    if history is not None and write_slot >= 0:
        history[write_slot].copy_(d.to(history.dtype))
    if cd != torch.float64:
        x_next = x_next.to(torch.float32)
    return x_next, y
