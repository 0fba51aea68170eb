"""Typed wrapper of ``velodiff::window_attention``: HiDiffusion's MSW-MSA (Zhang et al., ECCV 2024, arXiv
2311.17528, section 3.3), self-attention inside the windows of a cyclically shifted h x w token map, computed by
index arithmetic inside the kernel (no partition or reverse copy of q, k, v or the output).

Semantics: csrc/include/velodiff/window_attention.h; :func:`velodiff.ops.reference.window_attention` is the float64
specification. :func:`velodiff.accel.highres.msw_msa.window_attention` with ``backend="velodiff"`` runs this op
(its ``grid`` of windows becomes ``window = (ceil(h / gh), ceil(w / gw))``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from velodiff.ops._native import native_op
from velodiff.ops.attention import attention_unsupported


def checked_pair(value, name: str, what: str) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """``((a, b), None)`` for a tuple / list of two ints (bools refused), else ``(None, message naming name)``;
    ``what`` names the pair's parts in the message, e.g. "(h, w)"."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in value)):
        return None, f"{name} must be a pair of integers {what}, got {value!r}"
    return (int(value[0]), int(value[1])), None


def window_attention_unsupported(q, k, v, size, window, shift=(0, 0), scale=None) -> Optional[tuple]:
    """``None`` when the op takes these arguments, else ``(exception class, message naming the argument)``."""
    problem = attention_unsupported(q, k, v, None, scale)
    if problem is not None:
        return problem
    n = q.shape[2]
    if k.shape[2] != n:
        return ValueError, f"k and v must have q's L = {n} tokens (self-attention over one map), got k " \
                           f"{list(k.shape)} and v {list(v.shape)}"
    hw, why = checked_pair(size, "size", "(h, w)")
    if why is not None:
        return ValueError, why
    h, w = hw
    if h < 1 or w < 1 or h * w != n:
        return ValueError, f"size {hw} must be positive with h * w = L = {n} tokens"
    win, why = checked_pair(window, "window", "(Wh, Ww)")
    if why is not None:
        return ValueError, why
    if win[0] < 1 or win[1] < 1:
        return ValueError, f"window {win} must have at least one row and one column"
    if win[0] > h or win[1] > w:
        return ValueError, f"window {win} is larger than the image: size (h, w) = {hw} (need Wh <= h and Ww <= w)"
    sh, why = checked_pair(shift, "shift", "(sy, sx)")
    if why is not None:
        return ValueError, why
    if sh[0] < 0 or sh[1] < 0:
        return ValueError, f"shift {sh} must be >= 0 (a cyclic shift, taken mod h, w)"
    return None


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Sequence[int], window: Sequence[int],
                     shift: Sequence[int] = (0, 0), *, scale: Optional[float] = None) -> torch.Tensor:
    """Self-attention inside the shifted windows of an h x w token map.

    Window slot (wy, wx, ly, lx) holds token ((wy*Wh + ly + sy) mod h, (wx*Ww + lx + sx) mod w) of the map; a grid
    of ceil(h / Wh) x ceil(w / Ww) windows, whose slots past the map's bottom or right edge are padding (neither
    key nor query). Every token attends exactly to the real tokens of its own window.

    Args:
        q: [B, H, L, D] float32 | float16 | bfloat16, any strides (the models' transposed [B, L, H, D] views are
            read in place). L = h * w tokens in row-major order; 1 <= D <= 512.
        k: [B, H, L, D], q's dtype, any strides.
        v: [B, H, L, Dv], q's dtype, any strides; 1 <= Dv <= 512.
        size: (h, w), h, w >= 1, h * w = L.
        window: (Wh, Ww) window rows and columns, 1 <= Wh <= h, 1 <= Ww <= w ((h, w) is global attention).
        shift: (sy, sx) >= 0, the cyclic shift, taken mod (h, w).
        scale: a finite number > 0; None means 1 / sqrt(D).
    Returns:
        [B, H, L, Dv] in q's dtype on q's device, stored as [B, L, H, Dv]. fp32 softmax and accumulation (the
        arithmetic of :func:`velodiff.ops.attention`), rounded once to q's dtype.
    """
    problem = window_attention_unsupported(q, k, v, size, window, shift, scale)
    if problem is not None:
        raise problem[0](problem[1])
    return native_op("window_attention")(q, k, v, [int(x) for x in size], [int(x) for x in window],
                                         [int(x) for x in shift], None if scale is None else float(scale))
