"""velodiff::window_attention (HiDiffusion's MSW-MSA, csrc/include/velodiff/window_attention.h): the CPU (and CUDA)
kernels against the float64 reference over square, non-square and not divisible maps, shifts, dtypes and head dims;
exactness of the index arithmetic (each window equals velodiff::attention on that window's tokens, bit for bit);
the msw_msa wiring (backend "velodiff" runs the op and agrees with the gather + SDPA path); bad input.

Tolerance: a window is one exact attention problem over its R x C real tokens, computed with velodiff::attention's
arithmetic, so each window's outputs are held to tests/ops/test_attention.py's bounds for that problem (its module
docstring derives them): fp32 to E32' (which follows the kernel's arithmetic key by key) and the relative Frobenius
1e-5, fp16 / bf16 to one output rounding u_t |exact| plus E32 (plus 2^-25 for fp16's subnormals). Comparisons with
SDPA (another arithmetic) use twice the coarse bound, as test_attention.py does.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from test_attention import OUTPUT_ROUNDING, U32, _bits, error_bound, error_bound_fp32, make_qkv
from velodiff.ops import attention, reference as ref, window_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def window_tokens(size, window, shift):
    """The token indices of every window, written out from the header's slot formula with Python integers (a third
    enumeration, independent of the reference's tensors and of msw_msa.window_layout)."""
    (h, w), (wh, ww) = size, window
    sy, sx = shift[0] % h, shift[1] % w
    windows = []
    for wy in range(-(-h // wh)):
        for wx in range(-(-w // ww)):
            windows.append(torch.tensor([((wy * wh + ly + sy) % h) * w + (wx * ww + lx + sx) % w
                                         for ly in range(wh) if wy * wh + ly < h
                                         for lx in range(ww) if wx * ww + lx < w]))
    return windows


def qkv_map(b, heads, size, d, dtype, device, seed, dv=None):
    """q, k, v over an h x w map as the models pass them: transposed views of [B, L, H, D] projections."""
    g = torch.Generator().manual_seed(seed)
    n = size[0] * size[1]
    return make_qkv((b, heads, n, n, d), dtype, device, g, dv=dv, layout="blhd")


def window_bound(q, k, v, size, window, shift, scale=None, coarse=False):
    """The per-element bound of the module docstring, [B, H, L, Dv] float64 on the CPU: each window's tokens get
    the bound of exact attention over that window."""
    exact = ref.window_attention(*(t.detach().cpu().double() for t in (q, k, v)), size, window, shift, scale)
    bound = torch.full_like(exact, math.nan)
    for tokens in window_tokens(size, window, shift):
        qw, kw, vw = (t.detach().cpu()[:, :, tokens] for t in (q, k, v))
        if q.dtype == torch.float32 and not coarse:
            bound[:, :, tokens] = error_bound_fp32(qw, kw, vw, scale)
        else:
            bound[:, :, tokens] = OUTPUT_ROUNDING[q.dtype] * exact[:, :, tokens].abs() + error_bound(qw, kw, vw, scale)
    assert not torch.isnan(bound).any(), "the windows do not cover the map"
    if q.dtype == torch.float16:
        bound = bound + 2.0 ** -25
    return exact, bound


def check_against_reference(out, q, k, v, size, window, shift, scale=None):
    """``out`` within the module's bound of the float64 reference; returns max error / bound."""
    assert out.dtype == q.dtype and out.device == q.device
    assert tuple(out.shape) == tuple(q.shape[:3]) + (v.shape[3],)
    exact, bound = window_bound(q, k, v, size, window, shift, scale)
    got = out.detach().cpu().double()
    assert torch.isfinite(got).all()
    err = (got - exact).abs()
    worst = float((err / bound).max())
    assert worst <= 1.0, f"max error {float(err.max()):.3g}, {worst:.3g} x the bound"
    if q.dtype == torch.float32:
        assert float((got - exact).norm() / exact.norm()) <= 1e-5
    return worst


# (size, window): square and divisible; non-square; HiDiffusion's 2 x 2 grid on sizes it does not divide (13 x 7:
# windows 7 x 4, edge windows 6 x 4, 7 x 3, 6 x 3); a 3 x 2 grid on 13 x 7 (windows 5 x 4, edge rows of 3); a
# remainder of one row and column; a one-row map; one window = the whole map; 1 x 1 windows; a tall thin window.
SIZES_WINDOWS = [((8, 8), (4, 4)), ((6, 10), (3, 5)), ((13, 7), (7, 4)), ((13, 7), (5, 4)), ((9, 9), (4, 4)),
                 ((1, 7), (1, 3)), ((5, 3), (5, 3)), ((4, 6), (1, 1)), ((7, 12), (7, 2))]


def shifts_for(size, window):
    """(0, 0), HiDiffusion's k/4-of-the-window shifts for k = 1, 3, and one beyond the map (taken mod h, w)."""
    (h, w), (wh, ww) = size, window
    return [(0, 0), (wh // 4, ww // 4), (3 * (wh // 4), 3 * (ww // 4)), (h + 2, 2 * w + 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, window", SIZES_WINDOWS, ids=lambda x: "x".join(map(str, x)))
def test_matches_reference(device, dtype, size, window):
    for i, shift in enumerate(shifts_for(size, window)):
        q, k, v = qkv_map(2, 3, size, 40, dtype, device, seed=100 * size[0] + 10 * size[1] + i)
        out = window_attention(q, k, v, size, window, shift)
        check_against_reference(out, q, k, v, size, window, shift)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim, v_head_dim", [(40, 40), (64, 64), (80, 80), (160, 160), (7, 7), (1, 1),
                                                  (7, 13), (64, 40), (512, 512)])
def test_head_dims(device, dtype, head_dim, v_head_dim):
    """SD 1.5's 40 / 80 / 160, SDXL's 64, odd and mixed sizes, 1 and 512, on 13 x 7 with a 2 x 2 grid, shifted."""
    size, window, shift = (13, 7), (7, 4), (3, 1)
    q, k, v = qkv_map(2, 2, size, head_dim, dtype, device, seed=head_dim * 7 + v_head_dim, dv=v_head_dim)
    check_against_reference(window_attention(q, k, v, size, window, shift), q, k, v, size, window, shift)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("size, window, shift", [((24, 20), (12, 10), (3, 2)), ((25, 21), (13, 11), (6, 8)),
                                                 ((30, 17), (30, 17), (7, 5))])
def test_windows_of_many_query_blocks_and_key_tiles(device, dtype, size, window, shift):
    """Windows of 120 - 510 tokens: several query blocks and key tiles of 64 per window, edge windows with their
    own counts (25 x 21: 143, 130, 132 and 120 tokens)."""
    q, k, v = qkv_map(1, 2, size, 64, dtype, device, seed=size[0] * size[1])
    check_against_reference(window_attention(q, k, v, size, window, shift), q, k, v, size, window, shift)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 0.3, 7.5])
def test_scale(device, scale):
    size, window, shift = (9, 11), (5, 6), (2, 9)
    q, k, v = qkv_map(1, 2, size, 48, torch.float32, device, seed=int(scale * 1000))
    out = window_attention(q, k, v, size, window, shift, scale=scale)
    check_against_reference(out, q, k, v, size, window, shift, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size, window, shift", [((13, 7), (7, 4), (3, 1)), ((13, 7), (5, 4), (0, 0)),
                                                 ((25, 21), (13, 11), (6, 8)), ((4, 6), (1, 1), (1, 5)),
                                                 ((10, 9), (10, 2), (4, 0))])
def test_each_window_is_attention_on_its_tokens(dtype, size, window, shift):
    """CPU: the output at a window's tokens has exactly the bits of velodiff::attention run on those tokens gathered
    in window order (the same tile routine over the same key list), for every window: the windows, the shift and
    the edge padding are exactly the header's index arithmetic."""
    q, k, v = qkv_map(2, 3, size, 40, dtype, "cpu", seed=size[0] + 31 * size[1], dv=24)
    out = window_attention(q, k, v, size, window, shift)
    for tokens in window_tokens(size, window, shift):
        want = attention(q[:, :, tokens], k[:, :, tokens], v[:, :, tokens])
        assert torch.equal(_bits(out[:, :, tokens]), _bits(want)), tokens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(8, 8), (6, 10), (7, 9), (12, 11)])
def test_whole_map_window_is_global_attention(device, dtype, size):
    """window = size: global attention. Without a shift the keys are the tokens in their own order, so the CPU
    kernel gives velodiff::attention's bits (12 x 11: 132 tokens, three query blocks against keys the kernel packs
    once per window and thread; the others one block, packed per tile as attention does); a shift only reorders
    the keys (within the bound of the reference)."""
    q, k, v = qkv_map(2, 4, size, 40, dtype, device, seed=size[0] * size[1])
    out = window_attention(q, k, v, size, size)
    if device == "cpu":
        assert torch.equal(_bits(out), _bits(attention(q, k, v)))
    for shift in ((0, 0), (3, 2)):
        out = window_attention(q, k, v, size, size, shift)
        check_against_reference(out, q, k, v, size, size, shift)
        exact = ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
        _, bound = window_bound(q, k, v, size, size, shift)
        assert ((out.double().cpu() - exact).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_by_one_windows_return_v(device, dtype):
    """1 x 1 windows: each token attends to itself alone, softmax weight exactly 1, so out = v exactly (a wrong
    token anywhere would show)."""
    size = (5, 7)
    q, k, v = qkv_map(2, 3, size, 16, dtype, device, seed=57, dv=9)
    for shift in ((0, 0), (2, 3)):
        out = window_attention(q, k, v, size, (1, 1), shift)
        assert torch.equal(out, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_the_contiguous_bits(device, dtype):
    """The kernel reads through strides: transposed views, a sliced head dim (stride 2), keys broadcast over heads
    (stride 0) and a sliced token range give exactly the bits of the same values made contiguous."""
    g = torch.Generator().manual_seed(5)
    size, window, shift = (13, 7), (7, 4), (5, 2)
    b, h, n, d = 2, 3, 91, 40
    q = torch.randn(b, n, h, 2 * d, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    k = torch.randn(b, 1, n + 9, d, generator=g).to(dtype).to(device).expand(b, h, n + 9, d)[:, :, 4:4 + n]
    v = torch.randn(b, h, d, n, generator=g).to(dtype).to(device).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = window_attention(q, k, v, size, window, shift)
    same = window_attention(q.contiguous(), k.contiguous(), v.contiguous(), size, window, shift)
    assert torch.equal(_bits(out), _bits(same))
    check_against_reference(out, q, k, v, size, window, shift)
    assert out.transpose(1, 2).is_contiguous()  # [B, L, H, Dv] memory, as velodiff::attention's output


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_gives_the_same_bits(dtype, monkeypatch):
    """The AVX-512BF16, AVX-512 and AVX2 paths and the portable one (VELODIFF_CPU_ISA): identical outputs, also for head dims
    and window sizes that are no multiple of 8 or 16, and windows of more than one query block (packed keys)."""
    for size, window, shift, d, dv in [((13, 7), (7, 4), (3, 1), 40, 40), ((25, 21), (13, 11), (6, 8), 13, 21),
                                       ((5, 9), (2, 9), (1, 4), 160, 72), ((20, 18), (10, 9), (5, 4), 64, 88)]:
        q, k, v = qkv_map(1, 2, size, d, dtype, "cpu", seed=d + dv, dv=dv)
        outs = []
        for isa in ("avx512bf16", "avx512", "avx2", "portable"):
            monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
            outs.append(_bits(window_attention(q, k, v, size, window, shift)))
        assert all(torch.equal(outs[0], o) for o in outs[1:]), size


def test_thread_count_does_not_change_the_bits():
    """Tasks are (b, h, window, query block) and each one's arithmetic is fixed: 1 or 2 threads, the same bits."""
    size, window, shift = (30, 26), (15, 13), (3, 9)
    q, k, v = qkv_map(2, 3, size, 40, torch.float32, "cpu", seed=21)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(_bits(window_attention(q, k, v, size, window, shift)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    q, k, v = qkv_map(2, 2, (5, 3), 40, dtype, device, seed=25, dv=24)
    op = torch.ops.velodiff.window_attention.default
    torch.library.opcheck(op, (q, k, v, [5, 3], [3, 2], [1, 2], 0.2))
    torch.library.opcheck(op, (q, k, v, [5, 3], [5, 3]))


def test_empty_batch_and_heads():
    for b, h in [(0, 2), (2, 0)]:
        q, k, v = qkv_map(b, h, (3, 4), 8, torch.float32, "cpu", seed=27)
        out = window_attention(q, k, v, (3, 4), (2, 2), (1, 1))
        assert tuple(out.shape) == (b, h, 12, 8)


def _bad(fragment, exc, q, k, v, size, window, shift=(0, 0), scale=None, native=True):
    with pytest.raises(exc, match=fragment):
        window_attention(q, k, v, size, window, shift, scale=scale)
    if native:  # the op's own checks, without the Python wrapper
        with pytest.raises(exc, match=fragment):
            torch.ops.velodiff.window_attention(q, k, v, list(size), list(window), list(shift), scale)


def test_bad_inputs_are_named():
    q, k, v = qkv_map(2, 3, (6, 6), 40, torch.float32, "cpu", seed=29)
    _bad("window .* is larger than the image: size \\(h, w\\) = .6, 6", ValueError, q, k, v, (6, 6), (7, 3))
    _bad("window .* is larger than the image: size \\(h, w\\) = .6, 6", ValueError, q, k, v, (6, 6), (2, 9))
    _bad("window .* at least one row and one column", ValueError, q, k, v, (6, 6), (0, 3))
    _bad("size .* h \\* w = L = 36", ValueError, q, k, v, (5, 6), (2, 2))
    _bad("size .* h \\* w = L = 36", ValueError, q, k, v, (-6, -6), (2, 2))
    _bad("shift .* must be >= 0", ValueError, q, k, v, (6, 6), (2, 2), (-1, 0))
    _bad("shift .* must be >= 0", ValueError, q, k, v, (6, 6), (2, 2), (0, -7))
    _bad("size must be", ValueError, q, k, v, (6, 6, 1), (2, 2))
    _bad("window must be", ValueError, q, k, v, (6, 6), (2,))
    _bad("shift must be", ValueError, q, k, v, (6, 6), (2, 2), (1, 1, 1))
    _bad("k and v must have q's L = 36 tokens", ValueError, q, k[:, :, :30], v[:, :, :30], (6, 6), (2, 2))
    _bad("q must be", TypeError, q.double(), k.double(), v.double(), (6, 6), (2, 2))
    _bad("k must have q's dtype", TypeError, q, k.half(), v, (6, 6), (2, 2))
    _bad("v must be \\[B, H, Lk, Dv\\]", ValueError, q, k, v[:, :, :35], (6, 6), (2, 2))
    _bad("q must be \\[B, H, Lq, D\\]", ValueError, q[0], k, v, (6, 6), (2, 2))
    _bad("q's head dim 600 is not supported", ValueError, torch.randn(1, 1, 4, 600), torch.randn(1, 1, 4, 600),
         torch.randn(1, 1, 4, 8), (2, 2), (1, 1))
    for scale in (0.0, -1.0, float("nan"), 1e39):
        _bad("scale must be a finite number > 0", ValueError, q, k, v, (6, 6), (2, 2), scale=scale)
    for bad in ((2.0, 2), (True, 2), 2):  # not a pair of integers (the schema's int[] would take some of these)
        _bad("window must be a pair of integers", ValueError, q, k, v, (6, 6), bad, native=False)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """The two kernels against each other at HiDiffusion-like shapes (each is also checked against the reference)."""
    for size, window, shift, d in [((13, 7), (7, 4), (3, 1), 40), ((24, 40), (12, 20), (6, 10), 64)]:
        q, k, v = qkv_map(2, 4, size, d, torch.float16, "cpu", seed=d)
        cpu = window_attention(q, k, v, size, window, shift).double()
        gpu = window_attention(q.cuda(), k.cuda(), v.cuda(), size, window, shift).double().cpu()
        _, bound = window_bound(q, k, v, size, window, shift, coarse=True)
        assert ((cpu - gpu).abs() <= 2 * bound + U32).all(), size


# ---- msw_msa: backend "velodiff" runs the op ---------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(2, 2), (3, 2)])
@pytest.mark.parametrize("k_shift", range(4))
def test_msw_msa_velodiff_backend_agrees_with_the_gather_path(grid, k_shift, monkeypatch):
    """msw_msa.window_attention on a 13 x 7 map (no grid divides it), HiDiffusion's four shifts: backend
    "velodiff" gives the op's bits with window = (ceil(h / gh), ceil(w / gw)) without building the gather
    (window_layout is not called), and agrees with the gather + SDPA path within twice the coarse bound (two
    arithmetics, each within the bound of exact)."""
    from velodiff.accel.highres import msw_msa
    size = (13, 7)
    shift = msw_msa.shift_for(k_shift, size, grid)
    q, k, v = qkv_map(2, 3, size, 40, torch.float32, "cpu", seed=10 * k_shift + grid[0])
    gathered = msw_msa.window_attention(q, k, v, size, grid, shift, backend="sdpa")

    def no_gather(*args, **kwargs):
        raise AssertionError("the velodiff backend built the gather")
    monkeypatch.setattr(msw_msa, "window_layout", no_gather)
    fused = msw_msa.window_attention(q, k, v, size, grid, shift, backend="velodiff")
    window = msw_msa.window_size(size, grid)
    assert torch.equal(fused, window_attention(q, k, v, size, window, shift))
    _, bound = window_bound(q, k, v, size, window, shift, coarse=True)
    assert ((fused.double() - gathered.double()).abs() <= 2 * bound + U32).all()
    check_against_reference(fused, q, k, v, size, window, shift)


def test_msw_msa_velodiff_backend_takes_any_shift_and_refuses_float64():
    """Negative and oversized shifts are reduced mod (h, w) before the op (msw_msa's contract); an input the op
    does not take is a ValueError naming the backend, as the attention dispatcher gives."""
    from velodiff.accel.highres import msw_msa
    q, k, v = qkv_map(1, 2, (6, 5), 8, torch.float32, "cpu", seed=3)
    got = msw_msa.window_attention(q, k, v, (6, 5), (2, 2), (-2, 11), backend="velodiff")
    assert torch.equal(got, window_attention(q, k, v, (6, 5), (3, 3), (4, 1)))
    with pytest.raises(ValueError, match="backend 'velodiff' does not support this input: q must be"):
        msw_msa.window_attention(q.double(), k.double(), v.double(), (6, 5), (2, 2), backend="velodiff")


def test_windows_match_msw_msa_layout():
    """The header's windows are msw_msa's: the reference op on a grid's window equals msw_msa's gather path on
    float64 inputs (SDPA in float64), padded and shifted."""
    from velodiff.accel.highres import msw_msa
    for size, grid in [((13, 7), (2, 2)), ((13, 7), (3, 2)), ((9, 7), (3, 2)), ((4, 6), (4, 4))]:
        for k_shift in range(4):
            shift = msw_msa.shift_for(k_shift, size, grid)
            q, k, v = qkv_map(1, 2, size, 8, torch.float64, "cpu", seed=k_shift)
            want = msw_msa.window_attention(q, k, v, size, grid, shift, backend="sdpa")
            got = ref.window_attention(q, k, v, size, msw_msa.window_size(size, grid), shift)
            assert torch.allclose(got, want, rtol=0, atol=1e-12), (size, grid, shift)


def test_reference_against_plain_sdpa_per_window():
    """The reference's loop against SDPA on each window's gathered tokens (float64): the windows agree."""
    size, window, shift = (13, 7), (5, 4), (4, 3)
    q, k, v = qkv_map(2, 2, size, 16, torch.float64, "cpu", seed=77)
    got = ref.window_attention(q, k, v, size, window, shift)
    for tokens in window_tokens(size, window, shift):
        want = F.scaled_dot_product_attention(q[:, :, tokens], k[:, :, tokens], v[:, :, tokens])
        assert torch.allclose(got[:, :, tokens], want, rtol=0, atol=1e-12)


def test_hidiffusion_digits_images_with_the_velodiff_backend(monkeypatch):
    """The built-in digits pipeline with HiDiffusion (MSW-MSA on, a non-square 24 x 40 image) on attention backend
    "velodiff": its windowed layers (a 12 x 20 map, 6 x 10 windows, four shifts) run the fused op (counted) and the
    images are the sdpa backend's within 1e-5 (test_attention.py's digits bound: each attention output is within
    E32 of exact; measured 4e-6 here, while dropping the shift, a window one row short or global attention in
    place of the windows moved pixels by 0.09-0.3)."""
    import velodiff as vd
    from velodiff.accel.highres import msw_msa
    from velodiff.accel.highres.hidiffusion import HiDiffusion
    from fixtures import quiet_pipeline
    calls = []
    fused = msw_msa._fused_window_attention

    def counted(q, k, v, size, window, shift, scale):
        calls.append((tuple(size), tuple(window)))
        return fused(q, k, v, size, window, shift, scale)
    monkeypatch.setattr(msw_msa, "_fused_window_attention", counted)
    pipe = quiet_pipeline("digits")

    def run(backend):
        vd.optimize(pipe, HiDiffusion(), vd.accel.AttentionBackend(backend))
        try:
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            return pipe(["a 3", "a 7"], num_inference_steps=4, generator=gens, output_type="pt", height=24,
                        width=40).images
        finally:
            vd.restore(pipe)
    with torch.no_grad():
        want = run("sdpa")
        assert not calls
        got = run("velodiff")
    assert calls, "no windowed layer ran the fused op"
    assert float((got - want).abs().max()) < 1e-5
