"""FP8 attention (the "fp8" backend): close to exact attention, masks respected, quantization visible."""
import pytest
import torch

from velodiff.models.attention import BACKENDS, attention
from velodiff.ops import reference as ref


def qkv(b=2, h=3, lq=37, lk=29, d=40, dv=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g),
            torch.randn(b, h, lk, dv, generator=g))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_exact_attention(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    got = attention(q, k, v, backend="fp8")
    want = attention(q.float(), k.float(), v.float(), backend="math")
    assert got.dtype == dtype and got.shape == want.shape
    err = rel(got, want)
    assert 0 < err < 0.06, err  # e4m3's 3 mantissa bits on Q, K, P and V: a few per cent


def test_p_and_v_quantization_count():
    """Each of the four quantizations changes the result: the backend is not exact attention in disguise."""
    q, k, v = qkv(seed=1)
    exact = BACKENDS["math"].fn(q, k, v, None, None)
    assert rel(ref.fp8_attention(q, k, v), exact) > 1e-3
    # with Q, K, V already on their grids (rows scaled so that their max code is 448), only P's rounding is left
    def on_grid(t):
        codes, s = ref.quantize_fp8(t.reshape(-1, t.shape[-1]))
        return (codes.float() * s[:, None]).reshape(t.shape)
    qg, kg = on_grid(q), on_grid(k)
    vg = on_grid(v.transpose(-1, -2)).transpose(-1, -2)
    logits = torch.matmul(qg.double(), kg.double().transpose(-1, -2)) * 40 ** -0.5
    p = torch.exp(logits - logits.amax(-1, keepdim=True))  # quantized before normalisation: the largest is 1
    p8 = ref.encode_fp8(p * 448, "e4m3").double() / 448
    want = torch.matmul(p8, vg.double()) / p.sum(-1, keepdim=True)
    assert torch.allclose(ref.fp8_attention(qg, kg, vg).double(), want, rtol=1e-5, atol=1e-6)


def test_masked_keys_get_no_weight():
    """Masked keys drop out of P exactly; they still count in V's per-channel scales (one per head and channel
    over all keys), so the result is close to, not equal to, attention over the kept keys alone."""
    q, k, v = qkv(seed=2)
    keep = torch.ones(2, 1, 1, 29, dtype=torch.bool)
    keep[:, :, :, 20:] = False
    masked = attention(q, k, v, mask=keep, backend="fp8")
    short = attention(q, k[:, :, :20], v[:, :, :20], backend="fp8")
    assert rel(masked, short) < 0.05
    v_big = v.clone()
    v_big[:, :, 20:] = 1e3
    assert torch.isfinite(attention(q, k, v_big, mask=keep, backend="fp8")).all()
