"""Typed wrapper of ``velodiff::sampler_update``: argument checks, then the native op."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from velodiff.ops import reference
from velodiff.ops._checks import check_tensor
from velodiff.ops._native import native_op

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_like_x(name: str, t, x: torch.Tensor, dtypes, optional: bool = True) -> None:
    """t must be a contiguous tensor with x's shape and device and a dtype in ``dtypes`` (None allowed if
    ``optional``)."""
    check_tensor(name, t, dtypes, tuple(x.shape), x.device, optional=optional, like="x")


def check_sampler_update_args(x, cond, uncond, anchor, noise, history, coef, write_slot, guidance_rescale):
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 (sampler state is kept in fp32), got {x.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous())")
    _check_like_x("cond", cond, x, MODEL_DTYPES, optional=False)
    _check_like_x("uncond", uncond, x, (cond.dtype,))
    _check_like_x("anchor", anchor, x, (torch.float32,))
    _check_like_x("noise", noise, x, (torch.float32,))
    k = 0
    if history is not None:
        if not isinstance(history, torch.Tensor):
            raise TypeError(f"history must be a torch.Tensor or None, got {type(history).__name__}")
        if history.dtype != torch.float32:
            raise TypeError(f"history must be float32, got {history.dtype}")
        if history.dim() != x.dim() + 1 or history.shape[1:] != x.shape:
            raise ValueError(f"history must have shape [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], "
                             f"got {tuple(history.shape)}")
        k = history.shape[0]
        if not 1 <= k <= reference.MAX_HISTORY:
            raise ValueError(f"history must have 1..{reference.MAX_HISTORY} slots, got {k}")
        if history.device != x.device:
            raise ValueError(f"history is on {history.device} but x is on {x.device}")
        if not history.is_contiguous():
            raise ValueError("history must be contiguous")
    if not isinstance(coef, torch.Tensor):
        raise TypeError(f"coef must be a torch.Tensor, got {type(coef).__name__}")
    if coef.dtype != torch.float32:
        raise TypeError(f"coef must be float32, got {coef.dtype}")
    n = reference.sampler_coef_count(k)
    if coef.dim() != 1 or coef.shape[0] != n:
        raise ValueError(f"coef must have shape [{n}] (11 + 3 * {k} history slots), got {tuple(coef.shape)}")
    if coef.device != x.device:
        raise ValueError(f"coef is on {coef.device} but x is on {x.device}")
    if not coef.is_contiguous():
        raise ValueError("coef must be contiguous")
    if not isinstance(write_slot, int) or isinstance(write_slot, bool):
        raise TypeError(f"write_slot must be an int, got {type(write_slot).__name__}")
    if write_slot >= k or write_slot < -1:
        raise ValueError(f"write_slot must be -1 or in [0, {k}) for {k} history slots, got {write_slot}")
    if not isinstance(guidance_rescale, (int, float)) or isinstance(guidance_rescale, bool):
        raise TypeError(f"guidance_rescale must be a float, got {type(guidance_rescale).__name__}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    if guidance_rescale > 0 and uncond is None:
        raise ValueError("guidance_rescale > 0 needs uncond (it rescales the guided prediction)")
    if guidance_rescale > 0 and x[0].numel() < 2:
        raise ValueError("guidance_rescale needs at least 2 elements per sample to take a standard deviation")


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused sampler step: CFG combine, prediction conversion, history write and the affine update.

    Shapes and dtypes (B = batch, any trailing dims):
        x, anchor, noise: [B, ...] float32; cond, uncond: [B, ...] float32 | float16 | bfloat16 (same dtype);
        history: [K, B, ...] float32, 1 <= K <= 8, written in place at ``write_slot``;
        coef: [11 + 3K] float32 on x's device (layout in csrc/include/velodiff/sampler_update.h).
    Returns:
        (x_next [B, ...] float32, y [B, ...] float32 when ``want_y`` else an empty float32 tensor).
    """
    check_sampler_update_args(x, cond, uncond, anchor, noise, history, coef, write_slot, guidance_rescale)
    return native_op("sampler_update")(x, cond, uncond, anchor, noise, history, coef, write_slot,
                                       float(guidance_rescale), bool(want_y))
