"""Typed wrapper of ``velodiff::attention``: exact softmax attention, flash-style (keys in tiles, online softmax,
fp32 accumulation), with torch SDPA's layout and any strides.

Semantics: csrc/include/velodiff/attention.h; :func:`velodiff.ops.reference.attention` is the float64
specification. Every head dim from 1 to 512 runs natively, without padding (SD 1.5's 40 / 80 / 160, SDXL's 64,
DiT / PixArt's 72, FLUX's 128, the VAE's 512).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from velodiff.ops._checks import qkv_unsupported
from velodiff.ops._native import native_op

ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 512  # kAttentionMaxHeadDim in csrc/include/velodiff/attention.h
SUPPORTED_HEAD_DIMS = f"any head dim from 1 to {MAX_HEAD_DIM} (e.g. 40, 64, 72, 80, 96, 128, 160)"


def attention_unsupported(q, k, v, key_padding_mask=None, scale=None) -> Optional[tuple]:
    """``None`` when the op takes these arguments, else ``(exception class, message naming the argument)``.

    Shared by :func:`attention` (which raises it) and the ``velodiff`` attention backend (which reports why it
    refuses an input)."""
    basic = qkv_unsupported(q, k, v, ATTENTION_DTYPES, ("[B, H, Lq, D]", "[B, H, Lk, D]", "[B, H, Lk, Dv]"))
    if basic is not None:
        return basic
    b, h, _, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        return ValueError, f"q's head dim {d} is not supported: the kernel takes {SUPPORTED_HEAD_DIMS}"
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        return ValueError, f"k must be [B, H, Lk, D] = [{b}, {h}, Lk, {d}] (q's batch, heads and head dim), " \
                           f"got {list(k.shape)}"
    lk = k.shape[2]
    if lk < 1:
        return ValueError, f"k must have at least one key (Lk >= 1), got shape {list(k.shape)}"
    if tuple(v.shape[:3]) != (b, h, lk):
        return ValueError, f"v must be [B, H, Lk, Dv] = [{b}, {h}, {lk}, Dv] (k's batch, heads and keys), " \
                           f"got {list(v.shape)}"
    if not 1 <= v.shape[3] <= MAX_HEAD_DIM:
        return ValueError, f"v's head dim {v.shape[3]} is not supported: the kernel takes {SUPPORTED_HEAD_DIMS}"
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            return TypeError, f"key_padding_mask must be a torch.Tensor or None, got {type(m).__name__}"
        if m.dtype != torch.bool:
            return TypeError, f"key_padding_mask must be bool (True = attend), got {m.dtype}"
        if tuple(m.shape) != (b, lk):
            return ValueError, f"key_padding_mask must be [B, Lk] = [{b}, {lk}], got {list(m.shape)}"
        if m.device != q.device:
            return ValueError, f"key_padding_mask is on {m.device} but q is on {q.device}"
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or not 0 < scale < 3.4e38 or float(torch.tensor(scale, dtype=torch.float32)) == 0.0:
            return ValueError, f"scale must be a finite number > 0 (in float32 range) or None, got {scale!r}"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Exact softmax attention ``softmax(scale * q k^T) v`` per batch and head.

    Args:
        q: [B, H, Lq, D] float32 | float16 | bfloat16, any strides (e.g. ``x.view(B, L, H, D).transpose(1, 2)``:
            read through its strides, not copied). 1 <= D <= 512.
        k: [B, H, Lk, D], q's dtype, any strides; Lk >= 1 (Lk != Lq for cross-attention).
        v: [B, H, Lk, Dv], q's dtype, any strides; 1 <= Dv <= 512.
        key_padding_mask: bool [B, Lk] or None; True = the key is attended (PixArt's text mask). A query whose
            keys are all masked gives zeros (torch's SDPA gives NaN).
        scale: a finite number > 0; None means 1 / sqrt(D).
    Returns:
        [B, H, Lq, Dv] in q's dtype on q's device, stored as [B, Lq, H, Dv] (so ``out.transpose(1, 2)`` is
        contiguous). Computed with fp32 accumulation and rounded once to q's dtype.
    """
    problem = attention_unsupported(q, k, v, key_padding_mask, scale)
    if problem is not None:
        raise problem[0](problem[1])
    return native_op("attention")(q, k, v, key_padding_mask, None if scale is None else float(scale))
