"""velodiff::fp8_attention: the CPU (and CUDA) kernel against the float64 reference (csrc/include/velodiff/fp8.h),
a closed form where every p is 1, masks, strides, dtypes, awkward shapes, opcheck and bad input.

The kernels' Q, K and V codes are the reference's bit for bit (the quantize_fp8 rule); their logits are fp32 sums
in another order than the reference's float64, so a p whose 448 p lies within rounding of an e4m3 midpoint can get
the neighbouring code: such a flip moves the output by at most step / 448 * max |v| / l (step <= 32: at most
0.072 max |v|), and is rare. The tests ask every element within that bound and nearly all within the tight one."""
import math

import pytest
import torch

from velodiff.ops import fp8_attention
from velodiff.ops import reference as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF_ULP = {torch.float32: 2 ** -24, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}


def qkv(b, h, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g) * 1.5
    v = torch.randn(b, h, lk, dv, generator=g) + 0.3
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_against_reference(got, want, v, what=""):
    """Every element within one P-code flip; 99.5 % within fp32 summation error plus the output's rounding."""
    got, want = got.cpu().double(), want.double()
    vmax = float(v.double().abs().max())
    err = (got - want).abs()
    assert bool((err <= 32 / 448 * vmax + 1e-6).all()), what
    tight = 1e-5 * vmax + 2 * HALF_ULP[v.dtype] * want.abs()  # fp32 sums, then one rounding to the output dtype
    frac = float((err <= tight).double().mean())
    assert frac >= 0.995, f"{what}: only {frac:.4f} of the outputs within the tight bound"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 3, 37, 53, 40, 24), (1, 2, 5, 300, 72, 72),
                                   (2, 1, 64, 77, 160, 160), (1, 1, 3, 9, 512, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_the_reference(device, shape, dtype):
    q, k, v = qkv(*shape, dtype=dtype, seed=sum(shape))
    got = fp8_attention(q.to(device), k.to(device), v.to(device))
    assert got.dtype == dtype and got.shape == (*shape[:3], shape[5]) and got.device.type == device
    check_against_reference(got, ref.fp8_attention(q, k, v), v, str((shape, dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_equal_logits_give_the_mean_of_the_decoded_values(device):
    """Identical keys: every logit is the row max, every p is exactly 1 (code 448), so the output is the mean over
    the keys of V's decoded codes times their channel scales, in closed form."""
    q, _, v = qkv(2, 2, 7, 33, 24, 16, seed=3)
    k = torch.randn(1, 1, 1, 24).expand(2, 2, 33, 24).contiguous()
    got = fp8_attention(q.to(device), k.to(device), v.to(device)).cpu().double()
    codes, scales = ref.quantize_fp8(v.transpose(-1, -2).reshape(-1, 33))
    decoded = (codes.double() * scales.double()[:, None]).reshape(2, 2, 16, 33)
    want = decoded.mean(-1)[:, :, None, :].expand(2, 2, 7, 16)
    assert torch.allclose(got, want, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_masks_and_fully_masked_rows(device):
    q, k, v = qkv(3, 2, 11, 40, 32, 32, seed=4)
    mask = torch.rand(3, 40, generator=torch.Generator().manual_seed(5)) > 0.4
    mask[2] = False
    got = fp8_attention(q.to(device), k.to(device), v.to(device), mask.to(device)).cpu()
    assert bool((got[2] == 0).all())
    check_against_reference(got[:2], ref.fp8_attention(q, k, v, mask[:, None, None, :])[:2], v, "masked")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_and_scale(device):
    """Views as the models pass them ([B, L, H, D] memory) read through their strides."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 45, 4, 40, generator=g)
    ctx = torch.randn(2, 9, 4, 40, generator=g)
    q, k, v = x.transpose(1, 2), ctx.transpose(1, 2), (ctx * 2).transpose(1, 2)
    got = fp8_attention(q.to(device), k.to(device), v.to(device), scale=0.3)
    check_against_reference(got, ref.fp8_attention(q, k, v, scale=0.3), v, "strided")


def test_close_to_exact_attention_and_the_quantization_shows():
    q, k, v = qkv(2, 4, 64, 64, 64, 64, seed=7)
    got = fp8_attention(q, k, v).double()
    exact = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8, -1) @ v.double()
    err = float((got - exact).norm() / exact.norm())
    assert 1e-3 < err < 0.06, err  # e4m3's 3 mantissa bits on Q, K, P and V: a few per cent, never zero


def test_opcheck():
    q, k, v = qkv(2, 2, 5, 6, 8, 4, dtype=torch.bfloat16)
    mask = torch.tensor([[True] * 6, [True, False] * 3])
    torch.library.opcheck(torch.ops.velodiff.fp8_attention.default, (q, k, v, mask, 0.5))
    torch.library.opcheck(torch.ops.velodiff.fp8_attention.default, (q, k, v, None, None))


def test_bad_arguments_name_the_argument():
    q, k, v = qkv(1, 2, 3, 4, 8, 8)
    with pytest.raises(TypeError, match="k must"):
        fp8_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="v must be"):
        fp8_attention(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        fp8_attention(q, k, v, torch.ones(1, 4))
    with pytest.raises(ValueError, match="scale"):
        fp8_attention(q, k, v, scale=math.inf)
    with pytest.raises(ValueError, match="fp8_attention: k must be"):
        torch.ops.velodiff.fp8_attention(q, k[:, :1], v, None, None)
