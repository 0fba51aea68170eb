"""velodiff::attention: the CPU (and CUDA) kernels against the float64 reference (csrc/include/velodiff/attention.h)
and against torch's SDPA, then the ``velodiff`` attention backend in whole models.

The coarse bound (``error_bound``, for fp16 / bf16 and the comparisons between oracles), per output element
(b, h, i, c), from the sizes of the fp32 arithmetic:
  * the logit s_ij = scale * q_i . k_j is a D-term fp32 dot product (after one rounding of q * scale * log2 e): its
    error is about u * (sqrt(D) + 1) * S_i (rounding errors of a sum add like a random walk), with
    S_i = max_j scale * sum_d |q_id k_jd| and u = 2^-24. exp turns an absolute logit error into the same relative
    error of a weight, and the output (a ratio of two weighted sums) moves by at most twice that times max |v|;
  * the two sums over Lk keys add about u * sqrt(Lk) each, the rescale by alpha once per tile of 64 keys u each,
    exp2's polynomial, the division and the conversions a few u (8 u);
  * times 2, because the bound is held by the largest of up to 10^6 elements, not by a typical one.
  => E32 = 2 u (2 (sqrt(D) + 1) S_i + 2 sqrt(Lk) + Lk / 64 + 8) max_j |v_jc|.
fp32 outputs are held to the tighter E32' (``error_bound_fp32``), which follows the kernel's arithmetic key by key.
With p_ij the exact softmax weights, o_ic the exact output, m_i = max_j s_ij, a_ij = scale * sum_d |q_id k_jd|:
  * a relative error e_j of weight j moves out_ic by sum_j p_ij e_j (v_jc - o_ic) (first order; an error common to
    all weights cancels). e_j: the logit's fp32 dot product (q rounded times scale log2 e, then a D-term fma chain
    whose partial sums are about a_ij in size) <= 3 u a_ij at the extremes; the rounded scale and the subtraction
    s_j - m before exp2 <= 4 u (m_i - s_ij); the polynomial exp2's relative error, measured 1.32 u (the rescale
    by alpha multiplies numerator and denominator alike and cancels);
  * the fma chain of P V in key order rounds each partial sum O_ikc = sum_{j<=k} p_ij v_jc once: a random walk,
    2 u sqrt(sum_k O_ikc^2); the weight sum likewise moves out by 2 u |o_ic| sqrt(sum_k L_ik^2), L_ik =
    sum_{j<=k} p_ij; the division and the rescales of the accumulator 3 u |o_ic|.
  => E32' = u [sum_j p_ij (3 a_ij + 4 (m_i - s_ij) + 1.32) |v_jc - o_ic| + 2 sqrt(sum_k O_ikc^2)
               + (2 sqrt(sum_k L_ik^2) + 3) |o_ic|]   (masked keys have p = 0 and are left out of the sums).
  Measured worst error / E32' over the fp32 cases: 0.14-0.56 (E32 gave 0.002-0.034).
fp16 / bf16 outputs are rounded once more: |out - exact| <= u_t |exact| + E32 (+ 2^-25 for fp16's subnormals),
with u_t = 2^-11 (fp16) or 2^-8 (bf16), and "exact" the float64 attention of the very inputs (already fp16 /
bf16). The CPU kernel multiplies bf16 inputs in bf16 pairs and rounds the weights 2^(s - m) to bf16 before P V
(each by a relative 2^-8 at most; their sum, the denominator, is not rounded): that adds at most
2^-8 sum_j p_ij |v_jc| for bf16. fp32 outputs must also meet the blueprint's relative Frobenius 1e-5.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from velodiff.ops import reference as ref
from velodiff.ops.attention import attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
MODEL_HEAD_DIMS = [40, 64, 72, 80, 96, 128, 160]  # SD 1.5: 40/80/160, SDXL 64, DiT/PixArt 72, FLUX 128
U32 = 2.0 ** -24
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def make_qkv(shape, dtype, device, g, dv=None, layout="bhld", magnitude=1.0):
    """q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] drawn N(0, 1) (q, k times ``magnitude``). layout "blhd":
    each is a transposed view of a [B, L, H, D] tensor, as the models pass their projections."""
    b, h, lq, lk, d = shape
    dv = d if dv is None else dv

    def draw(length, width, mag):
        t = torch.randn(b, length, h, width, generator=g) * mag
        t = t.to(dtype).to(device)
        return t.transpose(1, 2) if layout == "blhd" else t.transpose(1, 2).contiguous()
    return draw(lq, d, magnitude), draw(lk, d, magnitude), draw(lk, dv, 1.0)


P_ROUNDING_BF16 = 2.0 ** -8  # the weights rounded to bf16 before P V (module docstring)


def weighted_abs_values(q, k, v, scale, mask=None):
    """sum_j p_ij |v_jc|, p the exact softmax weights: [B, H, Lq, Dv] float64 on the CPU."""
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * torch.matmul(qd, kd.transpose(-1, -2))
    if mask is not None:
        s = s.masked_fill(~mask.detach().cpu()[:, None, None, :], -math.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # fully masked rows: no weight
    return torch.matmul(p, vd.abs())


def error_bound(q, k, v, scale, mask=None):
    """E32 of the module docstring (plus the bf16 weights' rounding for bf16 inputs): [B, H, Lq, Dv] float64 on
    the CPU."""
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))
    d, lk = q.shape[-1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    terms = scale * torch.matmul(qd.abs(), kd.abs().transpose(-1, -2))  # [B, H, Lq, Lk]
    vmax = vd.abs()
    if mask is not None:
        keep = mask.detach().cpu()[:, None, None, :]
        terms = terms.masked_fill(~keep, 0.0)
        vmax = vmax.masked_fill(~mask.detach().cpu()[:, None, :, None], 0.0)
    s = terms.amax(dim=-1, keepdim=True)
    bound = 2 * U32 * (2 * (math.sqrt(d) + 1) * s + 2 * math.sqrt(lk) + lk / 64 + 8) * vmax.amax(dim=2, keepdim=True)
    if q.dtype == torch.bfloat16:
        bound = bound + P_ROUNDING_BF16 * weighted_abs_values(q, k, v, scale, mask)
    return bound


EXP2_REL_ERROR = 1.32 * U32  # the kernel's polynomial exp2 on [-1/2, 1/2], measured over every fp32 f there


def error_bound_fp32(q, k, v, scale, mask=None, rows=64):
    """E32' of the module docstring (fp32 inputs): [B, H, Lq, Dv] float64 on the CPU, `rows` queries at a time."""
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keep = None if mask is None else mask.detach().cpu()[:, None, None, :]
    parts = []
    for i0 in range(0, qd.shape[2], rows):
        qi = qd[:, :, i0:i0 + rows]
        s = scale * torch.matmul(qi, kd.transpose(-1, -2))  # [B, H, rows, Lk]
        a = scale * torch.matmul(qi.abs(), kd.abs().transpose(-1, -2))
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp(s - m)
        p = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-300)  # fully masked rows: p = 0, o = 0
        o = torch.matmul(p, vd)  # [B, H, rows, Dv]
        gap = torch.where(p > 0, m - s, torch.zeros_like(s))
        weight = p * (3 * a + 4 * gap + EXP2_REL_ERROR / U32)  # [B, H, rows, Lk]
        logits = (weight[..., None] * (vd[:, :, None] - o[:, :, :, None]).abs()).sum(dim=-2)
        pv = torch.cumsum(p[..., None] * vd[:, :, None], dim=-2)  # partial sums of P V, in key order
        total = torch.cumsum(p, dim=-1)  # partial sums of the weights
        if keep is not None:  # masked keys are not in the kernel's chain
            pv = pv * keep[..., None]
            total = total * keep
        pv = pv.pow(2).sum(dim=-2).sqrt()
        total = total.pow(2).sum(dim=-1, keepdim=True).sqrt()
        parts.append(U32 * (logits + 2 * pv + (2 * total + 3) * o.abs()))
    return torch.cat(parts, dim=2)


def check_against_reference(out, q, k, v, scale=None, mask=None):
    """``out`` within the module's bound of the float64 attention of (q, k, v); returns max error / bound."""
    assert out.dtype == q.dtype and out.device == q.device
    assert tuple(out.shape) == tuple(q.shape[:3]) + (v.shape[3],)
    exact = ref.attention(*(t.detach().cpu().double() for t in (q, k, v)),
                          key_padding_mask=None if mask is None else mask.cpu(), scale=scale)
    got = out.detach().cpu().double()
    assert torch.isfinite(got).all()
    if q.dtype == torch.float32:
        bound = error_bound_fp32(q, k, v, scale, mask)
    else:
        bound = OUTPUT_ROUNDING[q.dtype] * exact.abs() + error_bound(q, k, v, scale, mask)
    if q.dtype == torch.float16:
        bound = bound + 2.0 ** -25
    err = (got - exact).abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, math.inf, 0.0))
    worst = float(ratio.max())
    assert worst <= 1.0, f"max error {float(err.max()):.3g}, {worst:.3g} x the bound"
    if q.dtype == torch.float32 and exact.norm() > 0:
        assert float((got - exact).norm() / exact.norm()) <= 1e-5
    return worst


def _bits(t):
    t = t.detach().cpu().contiguous()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


TOKENS = [(1, 1), (7, 77), (77, 7), (256, 256), (1000, 77)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"q{t[0]}k{t[1]}")
@pytest.mark.parametrize("head_dim", MODEL_HEAD_DIMS)
def test_model_head_dims(device, dtype, tokens, head_dim):
    """Every model head dim x self / cross attention token counts x dtypes, models' transposed layout."""
    g = torch.Generator().manual_seed(head_dim * 1000 + tokens[0] + 7 * tokens[1])
    q, k, v = make_qkv((2, 3, tokens[0], tokens[1], head_dim), dtype, device, g, layout="blhd")
    check_against_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [40, 72, 160])
def test_thousand_tokens(device, dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = make_qkv((1, 2, 1000, 1000, head_dim), dtype, device, g, layout="blhd")
    check_against_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_4097_tokens(device, dtype):
    """One more key than a power of two: 64 full key tiles plus one key, 65 query blocks minus 63 rows."""
    g = torch.Generator().manual_seed(4097)
    q, k, v = make_qkv((1, 1, 4097, 4097, 64), dtype, device, g)
    check_against_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,v_head_dim", [(1, 1), (3, 5), (8, 8), (13, 29), (16, 16), (33, 17), (64, 40),
                                                 (40, 160), (200, 72), (512, 512)])
def test_awkward_head_dims(device, dtype, head_dim, v_head_dim):
    """Any D and Dv from 1 to 512, Dv != D, odd sizes (the tiny test models use 8 and 16, the VAE 512)."""
    g = torch.Generator().manual_seed(head_dim * 31 + v_head_dim)
    q, k, v = make_qkv((2, 2, 19, 70, head_dim), dtype, device, g, dv=v_head_dim)
    check_against_reference(attention(q, k, v), q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_torch_sdpa(device, dtype):
    """torch's SDPA (default and "math" backends, fp32 arithmetic on the same values, rounded to the dtype) as a
    second oracle: both are within the bound of the exact result, so within twice it of each other. In its own
    fp16 / bf16 arithmetic SDPA is no more accurate than our op (its bf16 path rounds an intermediate)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv((2, 4, 130, 77, 80), dtype, device, g, layout="blhd")
    ours = attention(q, k, v, scale=0.3).double().cpu()
    exact = ref.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), scale=0.3)
    bound = 2 * (OUTPUT_ROUNDING[dtype] * exact.abs() + error_bound(q, k, v, 0.3)) + 2.0 ** -24
    for backend in (SDPBackend.MATH, None):
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            theirs = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3).to(dtype)
        assert ((ours - theirs.double().cpu()).abs() <= bound).all(), backend
    if dtype == torch.float32:  # (in fp32 ours is within 1.1x of SDPA's max error, both far inside the bound)
        return
    native = F.scaled_dot_product_attention(q, k, v, scale=0.3).double().cpu()
    assert float((ours - exact).abs().max()) <= 1.01 * float((native - exact).abs().max()) + 2 * U32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_give_the_contiguous_bits(device, dtype):
    """The kernel reads through strides: transposed views, a sliced head dim (stride 2), keys broadcast over
    heads (stride 0) and a sliced token range give exactly the bits of the same values made contiguous."""
    g = torch.Generator().manual_seed(5)
    b, h, lq, lk, d = 2, 3, 45, 66, 40
    q = torch.randn(b, lq, h, 2 * d, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    k = torch.randn(b, 1, lk + 9, d, generator=g).to(dtype).to(device).expand(b, h, lk + 9, d)[:, :, 4:4 + lk]
    v = torch.randn(b, h, d, lk, generator=g).to(dtype).to(device).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = attention(q, k, v)
    same = attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(_bits(out), _bits(same))
    check_against_reference(out, q, k, v)
    # the output is [B, Lq, H, Dv] in memory: the models' transpose(1, 2).reshape is free
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lk", [1, 77, 300])
def test_key_padding_mask(device, dtype, lk):
    """A random key-padding mask per batch (PixArt's text mask), one batch fully masked: that batch's outputs
    are exactly zero (documented; SDPA gives NaN there), the others match the reference and SDPA's."""
    g = torch.Generator().manual_seed(lk)
    b = 3
    q, k, v = make_qkv((b, 2, 50, lk, 72), dtype, device, g, layout="blhd")
    mask = torch.rand(b, lk, generator=g) < 0.6
    mask[1] = False
    mask[2, 0] = True  # batch 2 attends at least one key
    mask = mask.to(device)
    out = attention(q, k, v, key_padding_mask=mask)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    check_against_reference(out, q, k, v, mask=mask)
    keep = [0, 2]
    theirs = F.scaled_dot_product_attention(q[keep].float(), k[keep].float(), v[keep].float(),
                                            attn_mask=mask[keep][:, None, None, :])
    bound = 2 * error_bound(q[keep], k[keep], v[keep], None, mask[keep]) + \
        2 * OUTPUT_ROUNDING[dtype] * theirs.abs().cpu().double()
    assert ((out[keep].double().cpu() - theirs.double().cpu()).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_equals_dropping_the_keys(device):
    """Masking keys gives the bits of attention over only the kept keys (masked keys never enter a tile)."""
    g = torch.Generator().manual_seed(9)
    q, k, v = make_qkv((1, 2, 33, 150, 64), torch.float32, device, g)
    mask = torch.rand(1, 150, generator=g) < 0.5
    kept = mask[0].nonzero()[:, 0].to(device)
    out = attention(q, k, v, key_padding_mask=mask.to(device))
    assert torch.equal(out, attention(q, k[:, :, kept], v[:, :, kept]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logit", [1e3, 1e4])
def test_large_logits(device, dtype, logit):
    """scale * q . k of size 1e3 - 1e4 (the softmax is nearly one-hot): no overflow, no NaN, within the bound
    (which grows with the logits: it is fp32's error of the logits themselves)."""
    g = torch.Generator().manual_seed(int(logit))
    d = 80
    q, k, v = make_qkv((2, 2, 40, 200, d), dtype, device, g, magnitude=math.sqrt(logit / math.sqrt(d)) * 0.5)
    out = attention(q, k, v)
    assert torch.isfinite(out).all()
    check_against_reference(out, q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e-3, 0.05, 1.0, 7.5])
def test_scale(device, scale):
    g = torch.Generator().manual_seed(17)
    q, k, v = make_qkv((1, 2, 30, 90, 96), torch.float32, device, g)
    check_against_reference(attention(q, k, v, scale=scale), q, k, v, scale=scale)


def test_thread_count_does_not_change_the_bits():
    """Tasks are (b, h, query block) and each one's arithmetic is fixed: 1 or 2 threads, the same bits."""
    g = torch.Generator().manual_seed(21)
    q, k, v = make_qkv((2, 3, 300, 200, 40), torch.float32, "cpu", g, layout="blhd")
    mask = torch.rand(2, 200, generator=g) < 0.7
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(_bits(attention(q, k, v, key_padding_mask=mask)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


# Shapes that reach every remainder of the vector paths' register blocks: query rows not a multiple of the row
# blocks (3, 6, 8, ...), key tiles ending in 1-3 vectors of 8 (and in partial vectors), channel vectors split in
# groups of 1-6 (dv 8 .. 200), head dims no multiple of 8.
ISA_SHAPES = [((1, 2, 9, 77, 40), 40), ((2, 1, 70, 130, 13), 21), ((1, 1, 5, 3, 160), 72), ((1, 1, 71, 168, 64), 88),
              ((1, 2, 67, 100, 200), 200), ((1, 1, 131, 64, 8), 8), ((1, 1, 64, 65, 96), 96)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_instruction_set_gives_the_same_bits(dtype, monkeypatch):
    """The AVX-512BF16, AVX-512 and AVX2 paths and the portable one (VELODIFF_CPU_ISA=avx512bf16 | avx512 | avx2 |
    portable; this CPU runs those it has) perform the same operations in the same order: identical outputs, also for head dims and key
    counts that are no multiple of 8 or 16. VELODIFF_ATTENTION_SCALAR=1 is the portable path too."""
    g = torch.Generator().manual_seed(23)
    for shape, dv in ISA_SHAPES:
        q, k, v = make_qkv(shape, dtype, "cpu", g, dv=dv, layout="blhd")
        mask = torch.rand(shape[0], shape[3], generator=g) < 0.8
        outs = []
        for isa in ("avx512bf16", "avx512", "avx2", "portable"):
            monkeypatch.setenv("VELODIFF_CPU_ISA", isa)
            outs.append(_bits(attention(q, k, v, key_padding_mask=mask)))
        monkeypatch.delenv("VELODIFF_CPU_ISA")
        monkeypatch.setenv("VELODIFF_ATTENTION_SCALAR", "1")
        outs.append(_bits(attention(q, k, v, key_padding_mask=mask)))
        monkeypatch.delenv("VELODIFF_ATTENTION_SCALAR")
        assert all(torch.equal(outs[0], o) for o in outs[1:]), (shape, dv)
        check_against_reference(attention(q, k, v, key_padding_mask=mask), q, k, v, mask=mask)


def test_bf16_denormals_read_as_zero():
    """bf16 inputs are multiplied as the AVX-512BF16 pair instruction does (module docstring): a denormal element
    of q, k or v counts as zero, in every path (the ISA test compares the paths)."""
    g = torch.Generator().manual_seed(26)
    q, k, v = make_qkv((1, 2, 20, 30, 40), torch.bfloat16, "cpu", g)
    denormal = torch.tensor(3e-39, dtype=torch.bfloat16)  # below 2^-126
    assert 0 < float(denormal) < 2.0 ** -126
    qd, kd, vd = (torch.where(torch.rand(t.shape, generator=g) < 0.2, denormal, t) for t in (q, k, v))
    vd[..., 0] = denormal  # a channel of denormals alone: read as they are, its outputs would be denormals
    zeroed = [torch.where(t == denormal, torch.zeros_like(t), t) for t in (qd, kd, vd)]
    out = attention(qd, kd, vd)
    assert torch.equal(_bits(out), _bits(attention(*zeroed)))
    assert torch.equal(_bits(out[..., 0]), torch.zeros_like(_bits(out[..., 0])))


def test_unknown_instruction_set_name_is_refused(monkeypatch):
    g = torch.Generator().manual_seed(24)
    q, k, v = make_qkv((1, 1, 4, 4, 8), torch.float32, "cpu", g)
    monkeypatch.setenv("VELODIFF_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="VELODIFF_CPU_ISA must be portable, avx2, avx512 or avx512bf16"):
        attention(q, k, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck(device, dtype, with_mask):
    g = torch.Generator().manual_seed(25)
    q, k, v = make_qkv((2, 2, 9, 12, 40), dtype, device, g, dv=24, layout="blhd")
    mask = (torch.rand(2, 12, generator=g) < 0.5).to(device) if with_mask else None
    torch.library.opcheck(torch.ops.velodiff.attention.default, (q, k, v, mask, 0.2))
    torch.library.opcheck(torch.ops.velodiff.attention.default, (q, k, v), {"key_padding_mask": mask})


def test_empty_batch_heads_and_queries():
    g = torch.Generator().manual_seed(27)
    for shape in [(0, 2, 5, 7, 8), (2, 0, 5, 7, 8), (2, 2, 0, 7, 8)]:
        q, k, v = make_qkv(shape, torch.float32, "cpu", g)
        out = attention(q, k, v)
        assert tuple(out.shape) == shape[:3] + (8,)


def _bad(name_fragment, exc, *args, **kwargs):
    with pytest.raises(exc, match=name_fragment):
        attention(*args, **kwargs)
    with pytest.raises(exc, match=name_fragment):  # the op's own checks, without the Python wrapper
        torch.ops.velodiff.attention(*args, **kwargs)


def test_bad_inputs_are_named():
    g = torch.Generator().manual_seed(29)
    q, k, v = make_qkv((2, 3, 5, 7, 40), torch.float32, "cpu", g)
    _bad("q must be", TypeError, q.double(), k.double(), v.double())
    _bad("q must be", TypeError, q.to(torch.int32), k, v)
    _bad("k must have q's dtype", TypeError, q, k.half(), v)
    _bad("v must have q's dtype", TypeError, q, k, v.bfloat16())
    _bad("q must be \\[B, H, Lq, D\\]", ValueError, q[0], k, v)
    _bad("k must be \\[B, H, Lk, D\\]", ValueError, q, k[0], v)
    _bad("v must be \\[B, H, Lk, Dv\\]", ValueError, q, k, v[..., None])
    _bad("k must be \\[B, H, Lk, D\\]", ValueError, q, k[:1], v)
    _bad("k must be \\[B, H, Lk, D\\]", ValueError, q, k[:, :2], v)
    _bad("k must be \\[B, H, Lk, D\\]", ValueError, q, k[..., :32], v)
    _bad("v must be \\[B, H, Lk, Dv\\]", ValueError, q, k, v[:, :, :6])
    _bad("k must have at least one key", ValueError, q, k[:, :, :0], v[:, :, :0])
    q600, k600 = torch.randn(1, 1, 3, 600), torch.randn(1, 1, 4, 600)
    _bad("q's head dim 600 is not supported.*from 1 to 512", ValueError, q600, k600, torch.randn(1, 1, 4, 8))
    _bad("v's head dim 513 is not supported", ValueError, q, k, torch.randn(2, 3, 7, 513))
    mask = torch.ones(2, 7, dtype=torch.bool)
    _bad("key_padding_mask must be bool", TypeError, q, k, v, key_padding_mask=mask.float())
    _bad("key_padding_mask must be \\[B, Lk\\]", ValueError, q, k, v, key_padding_mask=mask[:, :6])
    _bad("key_padding_mask must be \\[B, Lk\\]", ValueError, q, k, v, key_padding_mask=mask[:, None, None, :])
    for scale in (0.0, -1.0, float("nan"), float("inf"), 1e39, 1e-50):
        _bad("scale must be a finite number > 0", ValueError, q, k, v, scale=scale)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), k, v)


@pytest.mark.cuda
def test_bad_devices_are_named():
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv((2, 3, 5, 7, 40), torch.float32, "cpu", g)
    _bad("k is on", ValueError, q, k.cuda(), v)
    _bad("v is on", ValueError, q.cuda(), k.cuda(), v)
    _bad("key_padding_mask is on", ValueError, q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool).cuda())


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """The two kernels against each other on the models' shapes (each is also checked against the reference)."""
    g = torch.Generator().manual_seed(33)
    for d in MODEL_HEAD_DIMS:
        q, k, v = make_qkv((2, 4, 300, 77, d), torch.float16, "cpu", g, layout="blhd")
        cpu = attention(q, k, v).double()
        gpu = attention(q.cuda(), k.cuda(), v.cuda()).double().cpu()
        exact = ref.attention(q.double(), k.double(), v.double())
        bound = 2 * (OUTPUT_ROUNDING[torch.float16] * exact.abs() + error_bound(q, k, v, None)) + 2.0 ** -24
        assert ((cpu - gpu).abs() <= bound).all(), d


# ---- the "velodiff" attention backend in models ------------------------------------------------------------------

def test_backend_says_why_not():
    from velodiff.models.attention import attention as dispatch
    g = torch.Generator().manual_seed(35)
    q, k, v = make_qkv((2, 2, 5, 7, 8), torch.float32, "cpu", g)
    bias = torch.zeros(2, 1, 1, 7)
    bias[:, ..., 3] = -1.0
    with pytest.raises(ValueError, match="velodiff.*additive bias, not a key-padding mask.*backends that do: sdpa"):
        dispatch(q, k, v, mask=bias, backend="velodiff")
    with pytest.raises(ValueError, match="velodiff.*not a key-padding mask"):
        dispatch(q, k, v, mask=torch.ones(2, 1, 5, 7, dtype=torch.bool), backend="velodiff")
    with pytest.raises(ValueError, match="velodiff.*head dim 600 is not supported.*1 to 512"):
        dispatch(torch.randn(1, 1, 2, 600), torch.randn(1, 1, 3, 600), torch.randn(1, 1, 3, 4), backend="velodiff")
    with pytest.raises(ValueError, match="velodiff.*k must have q's dtype"):
        dispatch(q, k.half(), v, backend="velodiff")
    mask = torch.rand(2, 7, generator=g) < 0.5
    mask[:, 0] = True
    drop_bias = (~mask).float() * -10000.0  # diffusers' and PixArt's additive key-padding bias
    for m in (mask[:, None, None, :], mask, mask[:1, None, None, :], drop_bias[:, None, None, :],
              drop_bias.masked_fill(~mask, float("-inf"))):
        got = dispatch(q, k, v, mask=m, backend="velodiff")
        want = dispatch(q, k, v, mask=m if m.dim() == 4 else m[:, None, None, :], backend="math")
        assert (got - want).abs().max() < 1e-6


def test_auto_is_the_default_and_runs_velodiff_where_it_applies():
    """Layers default to "auto": the velodiff op for CPU inputs it takes without autograd (faster than SDPA on
    this CPU, bench/results/attention_cpu.md), SDPA for the rest (gradients, float64, additive masks, CUDA)."""
    from velodiff.models.attention import Attention, auto_backend
    assert Attention(16, heads=2, dim_head=8).backend == "auto"
    g = torch.Generator().manual_seed(41)
    q, k, v = make_qkv((1, 2, 5, 7, 8), torch.float32, "cpu", g)
    keep = torch.rand(1, 7, generator=g) < 0.5
    assert auto_backend(q, k, v, None) == "velodiff"
    assert auto_backend(q, k, v, keep[:, None, None, :]) == "velodiff"
    assert auto_backend(q, k, v, torch.zeros(1, 1, 1, 7)) == "sdpa"          # additive bias
    assert auto_backend(q.double(), k.double(), v.double(), None) == "sdpa"
    grad_q = q.clone().requires_grad_()
    assert auto_backend(grad_q, k, v, None) == "sdpa"
    with torch.no_grad():
        assert auto_backend(grad_q, k, v, None) == "velodiff"
    meta = [t.to("meta") for t in (q, k, v)]
    assert auto_backend(*meta, None) == "sdpa"
    # a layer under autograd still gets gradients (through SDPA)
    layer = Attention(16, heads=2, dim_head=8)
    layer(torch.randn(2, 6, 16, generator=g)).sum().backward()
    assert layer.to_q.weight.grad is not None


def _with_backend(pipe, backend, run):
    import velodiff as vd
    vd.optimize(pipe, vd.accel.AttentionBackend(backend))
    try:
        return run()
    finally:
        vd.restore(pipe)


@pytest.fixture
def counted_velodiff_backend(monkeypatch):
    """The "velodiff" backend, recording (head dim, Lq, Lk, mask given) of every call."""
    from velodiff.models import attention as models_attention
    original = models_attention.BACKENDS["velodiff"]
    calls = []

    def fn(q, k, v, mask, scale):
        calls.append((q.shape[-1], q.shape[2], k.shape[2], mask is not None))
        return original.fn(q, k, v, mask, scale)
    monkeypatch.setitem(models_attention.BACKENDS, "velodiff",
                        models_attention.AttentionBackend("velodiff", fn, original.why_not))
    return calls


def test_digits_images_with_the_velodiff_backend(counted_velodiff_backend):
    """The built-in digits pipeline (UNet self and cross attention, head dims 8 and 16) on backend "velodiff"
    gives the sdpa backend's images. Each attention output is within E32 of exact (about 1e-6 relative here),
    and so is SDPA's; 4 steps of the small UNet and the VAE carry such differences to the [0, 1] images as a few
    1e-6 (measured below 1e-6): the bound 1e-5 is one order above that, while a wrong mask, scale or head split
    moves pixels by > 1e-2."""
    import velodiff as vd
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(["a handwritten 7", "the digit three"], num_inference_steps=4,  # noqa: E731
                       generator=torch.Generator().manual_seed(0), output_type="pt").images
    with torch.no_grad():
        want = _with_backend(pipe, "sdpa", run)
        assert not counted_velodiff_backend
        got = _with_backend(pipe, "velodiff", run)
    assert counted_velodiff_backend, "no attention layer ran on the velodiff backend"
    assert float((got - want).abs().max()) < 1e-5


def test_pixart_latents_with_the_velodiff_backend(tmp_path, counted_velodiff_backend):
    """A tiny PixArt (self attention, cross attention to T5 text with its key-padding mask) on backend "velodiff"
    gives the sdpa backend's latents within 1e-5 of their scale (the same arithmetic as the digits test)."""
    from fixtures import saved_and_loaded, tiny_pixart_pipeline
    pipe = saved_and_loaded(tiny_pixart_pipeline(), str(tmp_path))[1]
    run = lambda: pipe(["a red fox", "a cat on a mat"], num_inference_steps=3,  # noqa: E731
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    with torch.no_grad():
        want = _with_backend(pipe, "sdpa", run)
        got = _with_backend(pipe, "velodiff", run)
    assert any(masked for *_, masked in counted_velodiff_backend), "the text mask never reached the op"
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
