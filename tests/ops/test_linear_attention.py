"""velodiff::linear_attention: the CPU (and CUDA) kernels against the float64 reference
(csrc/include/velodiff/linear_attention.h), against LinFusion's and SANA's own formulations, bits across the
kernel's paths, strides and thread counts, and its argument checks.

The bound (``error_bound``), per output element (b, h, i, c), from the kernel's fp32 arithmetic. With f = phi(q_i),
g_j = phi(k_j), v'_j = [v_j, 1], the state S'_dc = sum_j g_jd v'_jc (column Dv is z'), the weights w_j = f . g_j >= 0,
Z = f . z' + eps' and the exact output o_c = sum_j w_j v_jc / Z (u = 2^-24):
  * phi: fp16 / bf16 inputs widen exactly; phi(x) = x + 1 rounds once (u), exp(x) is the kernel's polynomial (1.41 u,
    measured over every fp32 x in [-87, 0]; header), relu is exact. A relative error e of every f_d and g_jd moves
    each w_j by at most 2 e w_j, and o_c by sum_j (w_j / Z) 2 e |v_jc - o_c| <= 2 e (f . A_c / Z + |o_c|), with
    A_dc = sum_j g_jd |v'_jc|;
  * the state: each state element is an fp32 fma chain over the keys (in chunks, whose partials are then added);
    each step rounds the running sum once, and the rounding errors add like a random walk: u sqrt(sum_k P_kdc^2)
    with P_kdc = sum_{j<=k} g_jd v'_jc, the running sums in key order (a chunked order has smaller running sums).
    Errors of S'_dc move o_c by f . dS'_c / Z, errors of z' by |o_c| f . dz' / Z;
  * the two dot products over d (phi(q_i) . S'_c and phi(q_i) . z', fma chains from 0): u sqrt(sum_k Q_kc^2) / Z with
    Q_kc = sum_{d<=k} f_d S'_dc for the numerator, |o_c| times the same with z' for the denominator;
  * eps' = Nk eps rounded to fp32, the addition of eps' and the division: 3 u |o_c|;
  * times 2, because the bound is held by the largest of up to 10^6 elements, not by a typical one.
  => E32 = 2 [2 e (f . A_c / Z + |o_c|) + u ((f . R_c + |o_c| f . R_z) / Z + (Q_c + |o_c| Q_z) / Z + 3 |o_c|)]
     with R_dc = sqrt(sum_k P_kdc^2), R_z its column Dv, Q_c = sqrt(sum_k Q_kc^2), Q_z its denominator twin.
fp16 / bf16 outputs are rounded once more: |out - exact| <= u_t |exact| + E32 (+ 2^-25 for fp16's subnormals), with
u_t = 2^-11 (fp16) or 2^-8 (bf16), "exact" the float64 result of the very inputs. fp32 outputs must also meet the
blueprint's relative Frobenius 1e-5. Each check returns its worst error / bound, so that a bound grown loose shows.
"""
import math

import pytest
import torch

from velodiff.ops import reference as ref
from velodiff.ops.linear_attention import DEFAULT_EPS, linear_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
KINDS = ["linfusion", "relu"]
U32 = 2.0 ** -24
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
PHI_REL_ERROR = {"linfusion": 1.41 * U32, "relu": 0.0}  # exp's measured 1.41 u (x + 1: u); relu is exact
BLOCK_ELEMENTS = 1 << 22  # float64 temporaries of the bound are cut into blocks of at most this many elements


def make_qkv(shape, dtype, device, g, dv=None, layout="bhnd", q_mag=1.0, k_mag=1.0, v_mag=1.0, q_shift=0.0):
    """q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] drawn N(0, 1) times the magnitudes (q also shifted by
    ``q_shift``). layout "bnhd": transposed views of [B, N, H, D] tensors, as the models pass their projections."""
    b, h, nq, nk, d = shape
    dv = d if dv is None else dv

    def draw(length, width, mag, shift=0.0):
        t = torch.randn(b, length, h, width, generator=g) * mag + shift
        t = t.to(dtype).to(device)
        return t.transpose(1, 2) if layout == "bnhd" else t.transpose(1, 2).contiguous()
    return draw(nq, d, q_mag, q_shift), draw(nk, d, k_mag), draw(nk, dv, v_mag)


def phi64(x, kind):
    return torch.nn.functional.elu(x) + 1.0 if kind == "linfusion" else torch.relu(x)


def _prefix_rms(a, b):
    """sqrt(sum_k (sum_{j<=k} a_j b_j^T)^2) for a [N, D], b [N, C] (float64): [D, C], in blocks of rows."""
    n, d = a.shape
    c = b.shape[1]
    rows = max(1, BLOCK_ELEMENTS // (d * c))
    carry = a.new_zeros(d, c)
    total = a.new_zeros(d, c)
    for s in range(0, n, rows):
        run = torch.cumsum(a[s:s + rows, :, None] * b[s:s + rows, None, :], dim=0) + carry
        total += run.pow(2).sum(dim=0)
        carry = run[-1]
    return total.sqrt()


def _dot_prefix_rms(f, s):
    """sqrt(sum_k (sum_{d<=k} f_id s_dc)^2) for f [N, D], s [D, C] (float64): [N, C], in blocks of rows."""
    n, d = f.shape
    c = s.shape[1]
    rows = max(1, BLOCK_ELEMENTS // (d * c))
    parts = []
    for i in range(0, n, rows):
        run = torch.cumsum(f[i:i + rows, :, None] * s[None], dim=1)
        parts.append(run.pow(2).sum(dim=1).sqrt())
    return torch.cat(parts)


def error_bound_fp32(q, k, v, kind, eps=None):
    """E32 of the module docstring: [B, H, Nq, Dv] float64 on the CPU."""
    eps = DEFAULT_EPS[kind] if eps is None else eps
    nk = k.shape[2]
    eps_sum = eps * nk if kind == "linfusion" else eps
    fq, fk = (phi64(t.detach().cpu().double(), kind) for t in (q, k))
    vd = v.detach().cpu().double()
    bsz, heads, nq, _ = q.shape
    dv = v.shape[3]
    bound = torch.empty(bsz, heads, nq, dv, dtype=torch.float64)
    e_phi = PHI_REL_ERROR[kind]
    for b in range(bsz):
        for h in range(heads):
            g, f = fk[b, h], fq[b, h]
            vp = torch.cat([vd[b, h], torch.ones(nk, 1, dtype=torch.float64)], dim=1)  # [Nk, Dv + 1]
            state = g.T @ vp  # [D, Dv + 1]
            z = f @ state[:, dv] + eps_sum  # [Nq]
            out = (f @ state[:, :dv]) / z[:, None]
            a = g.T @ vp.abs()
            r = _prefix_rms(g, vp)
            qr = _dot_prefix_rms(f, state)
            phi_part = 2 * e_phi * ((f @ a[:, :dv]) / z[:, None] + out.abs())
            state_part = (f @ r[:, :dv] + out.abs() * (f @ r[:, dv:])) / z[:, None]
            dot_part = (qr[:, :dv] + out.abs() * qr[:, dv:]) / z[:, None]
            bound[b, h] = 2 * (phi_part + U32 * (state_part + dot_part + 3 * out.abs()))
    return bound


def check_against_reference(out, q, k, v, kind, eps=None):
    """``out`` within the module's bound of the float64 result of (q, k, v); returns max error / bound."""
    assert out.dtype == q.dtype and out.device == q.device
    assert tuple(out.shape) == tuple(q.shape[:3]) + (v.shape[3],)
    exact = ref.linear_attention(*(t.detach().cpu().double() for t in (q, k, v)), kind, eps)
    got = out.detach().cpu().double()
    assert torch.isfinite(got).all()
    bound = OUTPUT_ROUNDING[q.dtype] * exact.abs() + error_bound_fp32(q, k, v, kind, eps)
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


# (B, H, Nq, Nk, D, Dv): odd token counts (1, 7, 333), Nq != Nk both ways, the models' head dims (SANA 32, LinFusion
# SD 1.5 40 / 80 / 160, SD 2.1 / XL 64), Dv != D
SHAPES = [
    (2, 3, 1, 1, 32, 32),
    (1, 2, 7, 7, 40, 40),
    (2, 2, 333, 333, 64, 64),
    (1, 2, 333, 7, 80, 80),
    (2, 1, 7, 333, 160, 160),
    (1, 3, 77, 200, 40, 72),
    (2, 2, 50, 1, 64, 24),
    (1, 1, 129, 130, 32, 33),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}q{}k{}d{}dv{}".format(*s))
def test_shapes_within_bound(device, dtype, kind, shape):
    b, h, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(nq * 1000 + nk + 7 * d + dv)
    q, k, v = make_qkv((b, h, nq, nk, d), dtype, device, g, dv=dv, layout="bnhd")
    check_against_reference(linear_attention(q, k, v, kind=kind), q, k, v, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim,v_head_dim", [(1, 1), (3, 5), (8, 8), (13, 29), (33, 17), (200, 72), (512, 512)])
def test_any_head_dim_1_to_512(device, dtype, kind, head_dim, v_head_dim):
    """Any D and Dv from 1 to 512 (rows of the state that fill no register block, widths that are no multiple of 8)."""
    g = torch.Generator().manual_seed(head_dim * 31 + v_head_dim)
    q, k, v = make_qkv((2, 2, 19, 70, head_dim), dtype, device, g, dv=v_head_dim)
    check_against_reference(linear_attention(q, k, v, kind=kind), q, k, v, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_keys_split_into_chunks(device, dtype, kind):
    """Enough keys for the state pass to split them (B * H = 2: chunks of >= 1024 keys, added in order), an odd count
    so that the last chunk is short."""
    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv((1, 2, 300, 5001, 64), dtype, device, g, layout="bnhd")
    check_against_reference(linear_attention(q, k, v, kind=kind), q, k, v, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_large_activations_do_not_overflow_in_fp16(device, kind):
    """|v| ~ 1e3 over 16384 keys in fp16 (the overflow SANA / EfficientViT users meet with an fp16 state): the sums of
    the state reach ~1e7, far above fp16's 65504, yet the fp32 state gives a finite output within the bound."""
    g = torch.Generator().manual_seed(16384)
    n = 16384
    q, k, v = make_qkv((1, 1, n, n, 32), torch.float16, device, g, v_mag=1e3)
    v = (v.float() + 1e3).to(torch.float16)  # a common offset: the state's sums grow with Nk, not with sqrt(Nk)
    fk = phi64(k.cpu().double()[0, 0], kind)
    state = fk.T @ v.cpu().double()[0, 0]
    assert float(state.abs().max()) > 65504 * 10, "the case must overflow an fp16 state"
    out = linear_attention(q, k, v, kind=kind)
    assert torch.isfinite(out).all()
    check_against_reference(out, q, k, v, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_strided_inputs_give_the_contiguous_bits(device, dtype, kind):
    """The kernels read through strides: transposed views, a sliced head dim (stride 2), keys broadcast over heads
    (stride 0) and a sliced token range give exactly the bits of the same values made contiguous."""
    g = torch.Generator().manual_seed(11)
    b, h, nq, nk, d = 2, 3, 45, 66, 40
    q = torch.randn(b, nq, h, 2 * d, generator=g).to(dtype).to(device).transpose(1, 2)[..., ::2]
    k = torch.randn(b, 1, nk + 9, d, generator=g).to(dtype).to(device).expand(b, h, nk + 9, d)[:, :, 4:4 + nk]
    v = torch.randn(b, h, d, nk, generator=g).to(dtype).to(device).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = linear_attention(q, k, v, kind=kind)
    same = linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), kind=kind)
    assert torch.equal(_bits(out), _bits(same))
    check_against_reference(out, q, k, v, kind)
    # the output is [B, Nq, H, Dv] in memory: the models' transpose(1, 2).reshape is free
    assert out.transpose(1, 2).is_contiguous()


def test_thread_count_does_not_change_the_bits():
    """Chunks and tasks depend on the sizes only: 1 or 2 threads, the same bits, also with the keys split."""
    g = torch.Generator().manual_seed(21)
    q, k, v = make_qkv((1, 2, 300, 4100, 40), torch.float32, "cpu", g, layout="bnhd")
    threads = torch.get_num_threads()
    for kind in KINDS:
        results = []
        try:
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                results.append(_bits(linear_attention(q, k, v, kind=kind)))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(r, results[0]) for r in results[1:]), kind


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_portable_path_gives_the_same_bits(dtype, kind, monkeypatch):
    """The AVX2 path and the portable one (VELODIFF_LINEAR_ATTENTION_SCALAR=1) perform the same operations in the same
    order: identical outputs, also for head dims and widths that are no multiple of 8 and with the keys split.
    Inputs of both signs and of size up to ~90 (phi's exp branch down to its cut-off at -87)."""
    g = torch.Generator().manual_seed(23)
    for shape, dv in [((1, 2, 9, 77, 40), 40), ((2, 1, 70, 130, 13), 21), ((1, 1, 5, 3, 160), 72),
                      ((1, 1, 65, 2100, 64), 64)]:
        q, k, v = make_qkv(shape, dtype, "cpu", g, dv=dv, layout="bnhd", q_mag=30.0, k_mag=30.0)
        outs = []
        for scalar in ("0", "1"):
            monkeypatch.setenv("VELODIFF_LINEAR_ATTENTION_SCALAR", scalar)
            outs.append(_bits(linear_attention(q, k, v, kind=kind)))
        assert torch.equal(outs[0], outs[1]), shape


def _small_weights(kind, dtype, device, g, den, nq=40, nk=300, d=40):
    """Inputs whose denominators are about ``den`` (LinFusion's mean form phi(q) . mean phi(k); relu's sum form
    phi(q) . sum phi(k)), so that an eps of that size changes the output by far more than the bound.
    linfusion: q ~ log(den / (1.1 D)) (phi(q) = exp(q) is then ~den / (1.1 D) per channel; mean phi(k) ~ 1.1);
    relu: q = -|x| except channel 0, of size ~den / sum_j |k_j0| (k's channel 0 made positive)."""
    q, k, v = make_qkv((2, 2, nq, nk, d), torch.float64, "cpu", g)
    if kind == "linfusion":
        q = q * 0.5 + math.log(den / (1.1 * d))
    else:
        q = -q.abs()
        k[..., 0] = k[..., 0].abs()
        q[..., 0] = den * (0.5 + torch.rand(q.shape[:3], generator=g, dtype=torch.float64)) / k[..., 0].sum(
            dim=2, keepdim=True)
    return q.to(dtype).to(device), k.to(dtype).to(device), v.to(dtype).to(device)


# eps values per (kind, dtype): the default (None) and explicit ones; for relu in fp16 the default's denominators
# (~1e-8) are below fp16's range, so there the explicit 1e-2 is the one that is told apart
EPS_CASES = {"linfusion": [None, 3e-5, 1e-2], "relu": [None, 3e-9, 1e-15]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_eps_default_and_explicit(device, dtype, kind):
    """Where the denominator is of the size of eps, the output follows eps: the default (1e-4 on LinFusion's mean
    denominator, i.e. Nk * 1e-4 on the sum, with Nq != Nk; 1e-8 for relu) and explicit values match the reference
    with that eps, and the reference with eps x 4 lies outside the bound (so this test tells eps values apart)."""
    g = torch.Generator().manual_seed(41)
    cases = EPS_CASES[kind] + ([1e-2] if kind == "relu" and dtype == torch.float16 else [])
    for eps in cases:
        e = DEFAULT_EPS[kind] if eps is None else eps
        if kind == "relu" and dtype == torch.float16 and e < 1e-4:
            den = 1e-2  # checked against the reference only: eps is below the representable denominators
        else:
            den = max(e, 1e-8)
        q, k, v = _small_weights(kind, dtype, device, g, den)
        out = linear_attention(q, k, v, kind=kind, eps=eps)
        check_against_reference(out, q, k, v, kind, eps)
        if den == e:
            with pytest.raises(AssertionError, match="x the bound"):
                check_against_reference(out, q, k, v, kind, e * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_relu_query_without_positive_channels_gives_zeros(device):
    """phi(q_i) = 0 (every channel <= 0): numerator 0 over denominator eps, an exact zero row (no NaN)."""
    g = torch.Generator().manual_seed(43)
    q, k, v = make_qkv((1, 2, 10, 50, 32), torch.float32, device, g)
    q[:, :, 3] = -q[:, :, 3].abs()
    out = linear_attention(q, k, v, kind="relu")
    assert torch.equal(out[:, :, 3].cpu(), torch.zeros(1, 2, 32))
    check_against_reference(out, q, k, v, "relu")


def _linfusion_forward(q, k, v):
    """LinFusion's GeneralizedLinearAttention.forward after the projections, written from its formulation (phi = elu
    + 1 on q and k; z = phi(q) mean_j phi(k_j) + 1e-4; state = (phi(K)^T / sqrt(N)) (V / sqrt(N)) with N its
    sequence length; out = phi(q) state / z), for self-attention (Nq = Nk = N), float64, [B, H, N, D] layout."""
    n = q.shape[2]
    fq, fk = torch.nn.functional.elu(q) + 1.0, torch.nn.functional.elu(k) + 1.0
    z = fq @ fk.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    state = (fk.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)
    return fq @ state / z


def _sana_lite_la(q, k, v, eps):
    """SANA's LiteLA.attn_matmul, written from its formulation: relu on q and k, v padded with a row of ones in the
    [B, H, Dv + 1, N] layout, vk = v' relu(k), out' = vk relu(q), out = out'[:Dv] / (out'[Dv] + eps); float64,
    inputs and output in the [B, H, N, D] layout."""
    fq, fk = torch.relu(q).transpose(-1, -2), torch.relu(k)  # [B, H, D, Nq], [B, H, Nk, D]
    vt = torch.nn.functional.pad(v.transpose(-1, -2), (0, 0, 0, 1), value=1.0)  # [B, H, Dv + 1, Nk]
    out = (vt @ fk) @ fq  # [B, H, Dv + 1, Nq]
    return (out[:, :, :-1] / (out[:, :, -1:] + eps)).transpose(-1, -2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_peers_formulation(device, kind):
    """The reference equals LinFusion's forward (kind "linfusion", eps 1e-4) and SANA's LiteLA (kind "relu", eps 1e-8 as
    SanaMSBlock passes it, and 1e-15, LiteLA's default) to float64 rounding, and the op meets the bound against both
    (also where eps matters)."""
    g = torch.Generator().manual_seed(47)
    for q, k, v in (make_qkv((2, 2, 200, 200, 40), torch.float64, "cpu", g),
                    _small_weights(kind, torch.float64, "cpu", g, DEFAULT_EPS[kind], nq=200, nk=200)):
        for eps in ((1e-4,) if kind == "linfusion" else (1e-8, 1e-15)):
            theirs = _linfusion_forward(q, k, v) if kind == "linfusion" else _sana_lite_la(q, k, v, eps)
            ours = ref.linear_attention(q, k, v, kind, eps)
            assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-14 * float(v.abs().max()))
            q32, k32, v32 = (t.float().to(device) for t in (q, k, v))
            out = linear_attention(q32, k32, v32, kind=kind, eps=eps)
            check_against_reference(out, q32, k32, v32, kind, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(device, dtype, kind):
    g = torch.Generator().manual_seed(25)
    q, k, v = make_qkv((2, 2, 9, 12, 40), dtype, device, g, dv=24, layout="bnhd")
    torch.library.opcheck(torch.ops.velodiff.linear_attention.default, (q, k, v, kind, 0.2))
    torch.library.opcheck(torch.ops.velodiff.linear_attention.default, (q, k, v), {"kind": kind})


def test_empty_batch_and_heads():
    g = torch.Generator().manual_seed(27)
    for shape in [(0, 2, 5, 7, 8), (2, 0, 5, 7, 8)]:
        q, k, v = make_qkv(shape, torch.float32, "cpu", g)
        out = linear_attention(q, k, v)
        assert tuple(out.shape) == shape[:3] + (8,)


def _bad(name_fragment, exc, *args, **kwargs):
    with pytest.raises(exc, match=name_fragment):
        linear_attention(*args, **kwargs)
    with pytest.raises(exc, match=name_fragment):  # the op's own checks, without the Python wrapper
        torch.ops.velodiff.linear_attention(*args, **kwargs)


def test_bad_inputs_are_named():
    g = torch.Generator().manual_seed(29)
    q, k, v = make_qkv((2, 3, 5, 7, 40), torch.float32, "cpu", g)
    _bad("q must be", TypeError, q.double(), k.double(), v.double())
    _bad("q must be", TypeError, q.to(torch.int32), k, v)
    _bad("k must have q's dtype", TypeError, q, k.half(), v)
    _bad("v must have q's dtype", TypeError, q, k, v.bfloat16())
    _bad("q must be \\[B, H, Nq, D\\]", ValueError, q[0], k, v)
    _bad("k must be \\[B, H, Nk, D\\]", ValueError, q, k[0], v)
    _bad("v must be \\[B, H, Nk, Dv\\]", ValueError, q, k, v[..., None])
    _bad("k must be \\[B, H, Nk, D\\]", ValueError, q, k[:1], v)
    _bad("k must be \\[B, H, Nk, D\\]", ValueError, q, k[:, :2], v)
    _bad("k must be \\[B, H, Nk, D\\]", ValueError, q, k[..., :32], v)
    _bad("v must be \\[B, H, Nk, Dv\\]", ValueError, q, k, v[:, :, :6])
    _bad("k must have at least one key", ValueError, q, k[:, :, :0], v[:, :, :0])
    _bad("q must have at least one query", ValueError, q[:, :, :0], k, v)
    q600, k600 = torch.randn(1, 1, 3, 600), torch.randn(1, 1, 4, 600)
    _bad("q's head dim 600 is not supported.*from 1 to 512", ValueError, q600, k600, torch.randn(1, 1, 4, 8))
    _bad("v's head dim 513 is not supported", ValueError, q, k, torch.randn(2, 3, 7, 513))
    _bad("v's head dim 0 is not supported", ValueError, q, k, torch.randn(2, 3, 7, 0))
    _bad("kind must be 'linfusion' or 'relu'", ValueError, q, k, v, kind="softmax")
    _bad("kind must be 'linfusion' or 'relu'", ValueError, q, k, v, kind="ReLU")
    for eps in (0.0, -1e-4, float("nan"), float("inf"), 1e39, 1e-50):
        for kind in KINDS:
            _bad("eps must be a finite number > 0", ValueError, q, k, v, kind=kind, eps=eps)
    _bad("eps must be a finite number > 0.*Nk \\* eps", ValueError, q, k, v, kind="linfusion", eps=1e38)
    linear_attention(q, k, v, kind="relu", eps=1e38)  # the sum-normalised kind adds eps itself: in range
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        linear_attention(q.numpy(), k, v)
    with pytest.raises(ValueError, match="kind must be"):
        linear_attention(q, k, v, kind=None)
    with pytest.raises(TypeError):  # kind and eps are keyword-only
        linear_attention(q, k, v, "relu")


@pytest.mark.cuda
def test_bad_devices_are_named():
    g = torch.Generator().manual_seed(31)
    q, k, v = make_qkv((2, 3, 5, 7, 40), torch.float32, "cpu", g)
    _bad("k is on", ValueError, q, k.cuda(), v)
    _bad("v is on", ValueError, q.cuda(), k.cuda(), v)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    """The two kernels against each other on the models' shapes, with the keys split on both (each is also checked
    against the reference): within twice the bound of each other."""
    g = torch.Generator().manual_seed(33)
    for d in (32, 40, 64, 80, 160):
        q, k, v = make_qkv((1, 2, 300, 3000, d), torch.float16, "cpu", g, layout="bnhd")
        cpu = linear_attention(q, k, v, kind=kind).double()
        gpu = linear_attention(q.cuda(), k.cuda(), v.cuda(), kind=kind).double().cpu()
        exact = ref.linear_attention(q.double(), k.double(), v.double(), kind)
        bound = 2 * (OUTPUT_ROUNDING[torch.float16] * exact.abs() + error_bound_fp32(q, k, v, kind)) + 2.0 ** -24
        assert ((cpu - gpu).abs() <= bound).all(), d
