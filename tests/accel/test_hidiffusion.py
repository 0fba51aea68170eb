"""HiDiffusion (``hidiffusion``): MSW-MSA's windowed attention against an independent implementation, the RAU-Net
switch at the planned step (every sampler, Heun's two evaluations, split CFG), any size, img2img, state scoped to
one call, restore, tiny SD / SDXL pipelines, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from velodiff.accel.highres.msw_msa import shift_for, window_attention


def plain_window_attention(q, k, v, size, grid, shift):
    """An independent MSW-MSA: roll the [B, H, h, w, D] map by -shift (torch.roll), cut it into windows of
    ceil(h/gh) x ceil(w/gw) tokens (the last row / column of windows smaller when the grid does not divide the map),
    SDPA on each window's real tokens alone, put every window back and roll by +shift."""
    b, heads, n, d = q.shape
    h, w = size
    wh, ww = math.ceil(h / grid[0]), math.ceil(w / grid[1])
    maps = [t.reshape(b, heads, h, w, t.shape[-1]).roll((-shift[0], -shift[1]), dims=(2, 3)) for t in (q, k, v)]
    out = torch.empty(b, heads, h, w, v.shape[-1], dtype=q.dtype)
    for y0 in range(0, h, wh):
        for x0 in range(0, w, ww):
            qw, kw, vw = (m[:, :, y0:y0 + wh, x0:x0 + ww].reshape(b, heads, -1, m.shape[-1]) for m in maps)
            ys, xs = min(wh, h - y0), min(ww, w - x0)
            out[:, :, y0:y0 + ys, x0:x0 + xs] = F.scaled_dot_product_attention(qw, kw, vw).view(b, heads, ys, xs, -1)
    return out.roll((shift[0], shift[1]), dims=(2, 3)).reshape(b, heads, n, -1)


def qkv(b, heads, n, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, dv if (dv and i == 2) else d, generator=g).to(dtype) for i in range(3)]


# square, non-square, and sizes the 2x2 grid does not divide; odd grids; grids finer than the map
SIZES_GRIDS = [((8, 8), (2, 2)), ((6, 10), (2, 2)), ((7, 9), (2, 2)), ((5, 5), (2, 2)), ((16, 12), (2, 2)),
               ((9, 7), (3, 2)), ((4, 6), (4, 4)), ((1, 7), (2, 2)), ((3, 3), (5, 1))]


@pytest.mark.parametrize("size, grid", SIZES_GRIDS)
@pytest.mark.parametrize("k_shift", range(4))
def test_window_attention_matches_roll_partition_reverse(size, grid, k_shift):
    q, k, v = qkv(2, 3, size[0] * size[1], 8, torch.float64, seed=k_shift)
    shift = shift_for(k_shift, size, grid)
    got = window_attention(q, k, v, size, grid, shift)
    want = plain_window_attention(q, k, v, size, grid, shift)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()


@pytest.mark.parametrize("shift", [(3, 1), (-2, 11), (0, 0)])
def test_any_shift_is_cyclic(shift):
    """Shifts beyond the map wrap around (mod h, w); a shift of a whole period changes nothing."""
    size, grid = (6, 5), (2, 2)
    q, k, v = qkv(1, 2, 30, 4, torch.float64)
    got = window_attention(q, k, v, size, grid, shift)
    assert torch.allclose(got, plain_window_attention(q, k, v, size, grid, (shift[0] % 6, shift[1] % 5)),
                          rtol=0, atol=1e-12)
    assert torch.equal(got, window_attention(q, k, v, size, grid, (shift[0] + 6, shift[1] - 10)))


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9)])
def test_window_attention_dtypes(dtype, rtol, size):
    """fp32 / bf16 inputs against the float64 reference (relative Frobenius error, the blueprint's bounds); v may
    have its own head dim."""
    q, k, v = qkv(2, 2, size[0] * size[1], 16, torch.float64, dv=12)
    shift = shift_for(1, size, (2, 2))
    want = plain_window_attention(q, k, v, size, (2, 2), shift)
    got = window_attention(q.to(dtype), k.to(dtype), v.to(dtype), size, (2, 2), shift)
    assert got.dtype == dtype and got.shape == want.shape
    assert float((got.double() - want).norm() / want.norm()) < rtol


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9)])
def test_one_window_is_global_attention(size):
    q, k, v = qkv(2, 4, size[0] * size[1], 8, torch.float32)
    want = F.scaled_dot_product_attention(q, k, v)
    for shift in ((0, 0), (3, 2)):
        got = window_attention(q, k, v, size, (1, 1), shift)
        assert float((got - want).norm() / want.norm()) < 1e-6


def test_windows_are_local():
    """A change in one token reaches the tokens of its window only (a 2x2 grid, no shift, on 6x8)."""
    q, k, v = qkv(1, 1, 48, 4, torch.float64)
    base = window_attention(q, k, v, (6, 8), (2, 2), (0, 0))
    v2 = v.clone()
    v2[0, 0, 0] += 1.0  # token (0, 0): window rows 0-2, columns 0-3
    changed = (window_attention(q, k, v2, (6, 8), (2, 2), (0, 0)) - base).abs().sum(-1)[0, 0].view(6, 8) > 0
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=(5, 5)), "h \\* w = L"),
    (dict(size=(0, 36)), "positive"),
    (dict(size=8), "size must be a pair"),
    (dict(grid=(0, 2)), "grid must have at least one window"),
    (dict(grid=(2.0, 2)), "grid must be a pair of integers"),
    (dict(shift=(1,)), "shift must be a pair"),
])
def test_window_attention_bad_input(kwargs, message):
    q, k, v = qkv(1, 2, 36, 4, torch.float32)
    args = dict(size=(6, 6), grid=(2, 2), shift=(0, 0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        window_attention(q, k, v, **args)


def test_window_attention_bad_tensors():
    q, k, v = qkv(1, 2, 36, 4, torch.float32)
    with pytest.raises(ValueError, match="q, k and v must share"):
        window_attention(q, k[:, :, :30], v, (6, 6))
    with pytest.raises(ValueError, match="q must be a \\[B, H, L, D\\] tensor"):
        window_attention(q[0], k, v, (6, 6))
