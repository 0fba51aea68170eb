"""MSW-MSA: HiDiffusion's modified shifted-window self-attention (Zhang et al., ECCV 2024, arXiv 2311.17528,
section 3.3; reference code megvii-research/HiDiffusion, ``hidiffusion.py``, ``make_diffusers_transformer_block``).

The tokens of an h x w feature map are split into a grid of windows (the paper: 2 x 2, so each window holds about
the token count the model was trained on) after a cyclic shift, and self-attention runs inside each window only:

    window (wy, wx), local (ly, lx)  <-  token ((wy*Wh + ly + s_y) mod h, (wx*Ww + lx + s_x) mod w)

with windows of Wh = ceil(h / gh) rows and Ww = ceil(w / gw) columns. As in the reference the shift is cyclic and
wrapped border tokens attend to each other (no Swin mask). Unlike the reference, which bicubic-resamples odd sizes
to 2 x window and back, sizes that the grid does not divide are padded: the last window of a row or column holds
fewer real tokens and the padding is masked out of the keys (padded queries are computed and dropped), so every
token attends exactly to the real tokens of its own window. Windows and shifts are index arithmetic: one gather
before the attention and one after it (no Python loop over windows); with ``backend="velodiff"``,
:func:`window_attention` runs the fused op :func:`velodiff.ops.window_attention` instead, whose kernel forms the
windows itself (no gather).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from velodiff.models.attention import Attention, attention, auto_backend
from velodiff.ops.window_attention import checked_pair

__all__ = ["window_attention", "window_layout", "window_size", "shift_for", "windowed_self_attention",
           "NUM_SHIFTS"]

#: the reference's shifts: k/4 of the window, k = 0..3, each drawn with probability 1/4
NUM_SHIFTS = 4


def _pair(value, name: str) -> Tuple[int, int]:
    """``value`` as (rows, columns) ints, or a ValueError naming ``name`` (the op's check, raised)."""
    pair, why = checked_pair(value, name, "(rows, columns)")
    if why is not None:
        raise ValueError(why)
    return pair


def window_size(size: Sequence[int], grid: Sequence[int]) -> Tuple[int, int]:
    """(Wh, Ww) = (ceil(h / gh), ceil(w / gw)): the window of a ``grid`` over an h x w map."""
    (h, w), (gh, gw) = size, grid
    return -(-h // gh), -(-w // gw)


def shift_for(k: int, size: Sequence[int], grid: Sequence[int]) -> Tuple[int, int]:
    """The reference's k-th shift (k in 0..3): (k * floor(Wh / 4), k * floor(Ww / 4))."""
    wh, ww = window_size(size, grid)
    return k * (wh // 4), k * (ww // 4)


def window_layout(size: Sequence[int], grid: Sequence[int], shift: Sequence[int],
                  device: Optional[torch.device] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The gather of :func:`window_attention`: (index [nW * Lw] int64 token index for each window slot,
    window-major; valid [nW, Lw] bool (False on padding) or None when the grid divides the map; inverse [h * w]
    int64, the slot of each token).

    nW = nh * nw windows of Lw = Wh * Ww slots, nh = ceil(h / Wh) (<= gh: a grid finer than the map has fewer
    windows, never an empty one)."""
    (h, w), (gh, gw) = _pair(tuple(size), "size"), _pair(tuple(grid), "grid")
    sy, sx = _pair(tuple(shift), "shift")
    wh, ww = window_size((h, w), (gh, gw))
    nh, nw = -(-h // wh), -(-w // ww)
    ys = torch.arange(nh * wh, device=device)
    xs = torch.arange(nw * ww, device=device)
    valid_y, valid_x = ys < h, xs < w
    src_y = torch.where(valid_y, (ys + sy) % h, 0).view(nh, 1, wh, 1)
    src_x = torch.where(valid_x, (xs + sx) % w, 0).view(1, nw, 1, ww)
    index = (src_y * w + src_x).reshape(-1)                                   # [nh, nw, Wh, Ww] flattened
    valid = (valid_y.view(nh, 1, wh, 1) & valid_x.view(1, nw, 1, ww)).reshape(nh * nw, wh * ww)
    slots = torch.arange(index.numel(), device=device)
    keep = valid.reshape(-1)
    inverse = torch.empty(h * w, dtype=torch.long, device=device)
    inverse[index[keep]] = slots[keep]                                       # each token fills exactly one slot
    return index, (None if bool(keep.all()) else valid), inverse


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: Sequence[int],
                     grid: Sequence[int] = (2, 2), shift: Sequence[int] = (0, 0), *, scale: Optional[float] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Self-attention inside shifted windows. q, k [B, H, L, D], v [B, H, L, Dv] over an h x w token grid
    (``size`` = (h, w), L = h * w, row-major) -> [B, H, L, Dv] in q's dtype.

    ``grid`` = (gh, gw) windows (each at least 1), ``shift`` = (s_y, s_x) the cyclic shift (taken mod h, w),
    ``scale`` the softmax scale (default D**-0.5), ``backend`` the :func:`velodiff.models.attention.attention`
    backend run on the windows; ``"velodiff"`` (and ``"auto"`` where it picks velodiff) runs
    :func:`velodiff.ops.window_attention` instead, which forms
    the windows inside its kernel (no gather; fp32 / fp16 / bf16, head dims 1..512). A 1 x 1 grid is global
    attention (any shift: attention does not depend on the order of the tokens)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, L, D] tensor, got "
                             f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k and v must share [B, H, L] (and q, k their head dim): q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    h, w = _pair(tuple(size) if isinstance(size, (tuple, list)) else size, "size")
    gh, gw = _pair(tuple(grid) if isinstance(grid, (tuple, list)) else grid, "grid")
    _pair(tuple(shift) if isinstance(shift, (tuple, list)) else shift, "shift")
    if h < 1 or w < 1 or h * w != q.shape[2]:
        raise ValueError(f"size {(h, w)} must be positive with h * w = L = {q.shape[2]} tokens")
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must have at least one window per axis, got {(gh, gw)}")
    wh, ww = window_size((h, w), (gh, gw))
    if backend == "auto":
        backend = auto_backend(q, k, v, None)
    if backend == "velodiff":  # the fused op: windows and shift by index arithmetic in the kernel, no gather
        return _fused_window_attention(q, k, v, (h, w), (wh, ww), shift, scale)
    index, valid, inverse = window_layout((h, w), (gh, gw), shift, q.device)
    b, heads, _, _ = q.shape
    slots = wh * ww                        # Lw
    n_win = index.numel() // slots         # nW = ceil(h / Wh) * ceil(w / Ww)

    def to_windows(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B * nW, H, Lw, d]
        t = t.index_select(2, index).view(b, heads, n_win, slots, t.shape[-1])
        return t.transpose(1, 2).reshape(b * n_win, heads, slots, t.shape[-1])

    mask = None
    if valid is not None:  # keys on padding dropped: [B * nW, 1, 1, Lw], True = keep
        mask = valid[None, :, None, None, :].expand(b, n_win, 1, 1, slots).reshape(b * n_win, 1, 1, slots)
    out = attention(to_windows(q), to_windows(k), to_windows(v), mask=mask, scale=scale, backend=backend)
    out = out.view(b, n_win, heads, slots, out.shape[-1]).transpose(1, 2).reshape(b, heads, n_win * slots, -1)
    return out.index_select(2, inverse)


def _fused_window_attention(q, k, v, size, window, shift, scale):
    """velodiff::window_attention with msw_msa's arguments (the shift reduced mod (h, w)); an input the op does not
    take is refused as the attention dispatcher refuses one (a ValueError naming the backend)."""
    from velodiff.ops.window_attention import window_attention as fused, window_attention_unsupported
    (h, w), (sy, sx) = size, (int(shift[0]), int(shift[1]))
    shift = (sy % h, sx % w)
    problem = window_attention_unsupported(q, k, v, size, window, shift, scale)
    if problem is not None:
        raise ValueError(f"attention backend 'velodiff' does not support this input: {problem[1]}")
    return fused(q, k, v, size, window, shift, scale=scale)


def windowed_self_attention(attn: Attention, hidden_states: torch.Tensor, size: Sequence[int],
                            grid: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """``attn`` (a self-attention :class:`~velodiff.models.attention.Attention`) on hidden_states [B, L, C] with
    :func:`window_attention` in place of global attention -> [B, L, C]. The projections are per token, so
    projecting first and windowing after equals the reference's windowing of the normed hidden states."""
    q = attn._heads(attn.to_q(hidden_states))
    k = attn._heads(attn.to_k(hidden_states))
    v = attn._heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.upcast_attention and q.dtype in (torch.float16, torch.bfloat16):
        out = window_attention(q.float(), k.float(), v.float(), size, grid, shift, backend=attn.backend).to(q.dtype)
    else:
        out = window_attention(q, k, v, size, grid, shift, backend=attn.backend)
    out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * attn.dim_head)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor if attn.rescale_output_factor != 1.0 else out
