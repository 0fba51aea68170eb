"""oneDNN conv prepacking: same results as nn.Conv2d, repacks when weights change, reversible."""
import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from velodiff.models.conv_prepack import PackedConv2d, prepack_convs, unprepack_convs  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 1, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_packed_conv_matches_conv(k, stride, pad, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 24, k, stride=stride, padding=pad)
    packed = torch.nn.Sequential(copy.deepcopy(conv))
    assert prepack_convs(packed) == 1 and type(packed[0]) is PackedConv2d
    with torch.no_grad():
        for shape in [(2, 16, 9, 7), (1, 16, 4, 4), (3, 16, 13, 13)]:  # packed for the first, reused for all
            x = torch.randn(shape)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            assert rel(packed(x), conv(x)) <= 1e-5


def test_repacks_after_weight_change_and_unpacks():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    m = torch.nn.Sequential(copy.deepcopy(conv))
    prepack_convs(m)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        m(x)
        new = torch.nn.Conv2d(8, 8, 3, padding=1)
        m[0].load_state_dict(new.state_dict())  # in-place copy into the same storage
        assert rel(m(x), new(x)) <= 1e-5
    assert unprepack_convs(m) == 1 and type(m[0]) is torch.nn.Conv2d and "_packed" not in m[0].__dict__
    assert list(m.state_dict()) == ["0.weight", "0.bias"]


def test_autograd_takes_the_plain_path():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    m = torch.nn.Sequential(copy.deepcopy(conv))
    prepack_convs(m)
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m[0].weight.grad is not None


def test_prepacked_channels_last_unet_matches_diffusers():
    from diffusers import UNet2DConditionModel as DUNet

    from velodiff.models.unet import UNet2DConditionModel
    cfg = dict(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=12, attention_head_dim=2,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               norm_num_groups=4)
    torch.manual_seed(0)
    theirs = DUNet(**cfg).eval()
    ours = UNet2DConditionModel.from_config(dict(theirs.config)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.to(memory_format=torch.channels_last)
    assert prepack_convs(ours) > 0
    assert set(ours.state_dict()) == set(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    for shape in [(2, 4, 16, 16), (1, 4, 11, 7)]:
        x, ctx = torch.randn(shape, generator=g), torch.randn(shape[0], 5, 12, generator=g)
        with torch.no_grad():
            assert rel(ours(x, 321, ctx), theirs(x, 321, ctx).sample) <= 1e-5


def test_packed_conv_follows_input_shape_changes():
    """The packed weight is keyed on the input shape as well: alternating sizes give the plain conv's results."""
    from velodiff.models.conv_prepack import prepack_convs
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(16, 32, 3, padding=1).eval()
    packed = torch.nn.Conv2d(16, 32, 3, padding=1).eval()
    packed.load_state_dict(plain.state_dict())
    prepack_convs(packed)
    with torch.no_grad():
        for shape in [(2, 16, 8, 8), (1, 16, 13, 5), (2, 16, 8, 8), (3, 16, 32, 32)]:
            x = torch.randn(shape).to(memory_format=torch.channels_last)
            ref = plain(x)
            out = packed(x)
            assert float((out - ref).norm() / ref.norm()) <= 1e-5


# ---- PackedLinear (bf16) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,out_features,bias", [((7, 33), 19, True), ((2, 77, 64), 128, False),
                                                     ((3, 5, 4, 40), 40, True), ((1, 1), 300, True)])
def test_packed_linear_gives_linear_bits_in_bf16(shape, out_features, bias):
    """oneDNN's bf16 GEMM on the packed weight: the bits of nn.Linear, for 2-4-D inputs, odd sizes, with and
    without bias; the packed weight follows the row count."""
    from velodiff.models.conv_prepack import PackedLinear, prepack_linears
    torch.manual_seed(0)
    plain = torch.nn.Linear(shape[-1], out_features, bias=bias).to(torch.bfloat16)
    packed = copy.deepcopy(plain)
    assert prepack_linears(torch.nn.Sequential(packed)) == 1 and type(packed) is PackedLinear
    with torch.no_grad():
        for rows_scale in (1, 3):  # a second row count repacks
            x = torch.randn((rows_scale * shape[0],) + shape[1:]).to(torch.bfloat16)
            assert torch.equal(packed(x), plain(x))


@pytest.mark.parametrize("rows,k,n", [(5, 24, 12), (77, 320, 320), (2048, 64, 300), (1, 1000, 7)])
def test_packed_linear_fp32_within_fp32_rounding(rows, k, n):
    """In fp32 oneDNN sums in another order than MKL: every element within the bound of fp32 summation of the
    float64 product (k + 2 roundings of the absolute terms)."""
    from velodiff.models.conv_prepack import prepack_linears
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(k, n))
    prepack_linears(model)
    x = torch.randn(rows, k)
    with torch.no_grad():
        y = model(x)
        w, b = model[0].weight.double(), model[0].bias.double()
        exact = x.double() @ w.T + b
        mag = x.double().abs() @ w.abs().T + b.abs()
    assert hasattr(model[0], "_packed")  # the packed path ran
    assert bool(((y.double() - exact).abs() <= (k + 2) * 2.0 ** -24 * mag).all())


def test_packed_linear_other_inputs_take_the_plain_path():
    """fp16, mixed-dtype, autograd and empty inputs run nn.Linear itself; unprepack restores the class."""
    from velodiff.models.conv_prepack import PackedLinear, prepack_linears, unprepack_linears
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(24, 12))
    ref = copy.deepcopy(model)
    prepack_linears(model)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert model(torch.randn(0, 24)).shape == (0, 12)
        half = copy.deepcopy(model).half()
        assert torch.equal(half(x.half()), ref.half()(x.half()))
        with pytest.raises(RuntimeError):
            model(x.bfloat16())  # nn.Linear's own error for a dtype mismatch
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and not hasattr(model[0], "_packed")
    assert unprepack_linears(model) == 1 and type(model[0]) is torch.nn.Linear
    assert isinstance(PackedLinear(2, 2), torch.nn.Linear)


def test_packed_modules_run_on_weights_made_in_inference_mode():
    """A model built or copied under torch.inference_mode has inference-tensor weights (no version counter): the
    packed conv and linear run on them and give the plain modules' bits; a replaced weight repacks."""
    from velodiff.models.conv_prepack import prepack_convs, prepack_linears
    torch.manual_seed(2)
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Linear(6, 20)).to(torch.bfloat16)
    x = torch.randn(2, 8, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        packed = copy.deepcopy(plain)
        assert packed[0].weight.is_inference()
        assert prepack_convs(packed) == 1 and prepack_linears(packed) == 1
        assert torch.equal(packed[0](x), plain[0](x))
        h = plain[0](x).contiguous()
        assert torch.equal(packed[1](h), plain[1](h))
        packed[1].weight = torch.nn.Parameter(torch.randn(20, 6).to(torch.bfloat16))
        plain[1].weight = torch.nn.Parameter(packed[1].weight.clone())
        assert torch.equal(packed[1](h), plain[1](h))


def test_packed_1x1_conv_runs_tokens_as_a_packed_linear():
    """A UNet transformer's proj_in / proj_out (1x1 convs applied to tokens): token_linear is oneDNN's packed GEMM,
    nn.Linear's bits in bf16 and within fp32 rounding in fp32; other inputs take F.linear."""
    from velodiff.models.conv_prepack import prepack_convs
    torch.manual_seed(4)
    conv = torch.nn.Sequential(torch.nn.Conv2d(48, 40, 1))
    prepack_convs(conv)
    weight = conv[0].weight.view(40, 48)
    with torch.no_grad():
        tokens = torch.randn(2, 77, 48)
        y = conv[0].token_linear(tokens)
        exact = tokens.double() @ weight.double().T + conv[0].bias.double()
        mag = tokens.double().abs() @ weight.double().abs().T + conv[0].bias.double().abs()
        assert "_token_packed" in conv[0].__dict__
        assert bool(((y.double() - exact).abs() <= 50 * 2.0 ** -24 * mag).all())
        conv16 = copy.deepcopy(conv).to(torch.bfloat16)  # a used packed module copies (without its packs)
        assert "_token_packed" not in conv16[0].__dict__
        t16 = tokens.to(torch.bfloat16)
        assert torch.equal(conv16[0].token_linear(t16),
                           torch.nn.functional.linear(t16, conv16[0].weight.view(40, 48), conv16[0].bias))
        half = copy.deepcopy(conv).half()
        assert torch.equal(half[0].token_linear(tokens.half()),
                           torch.nn.functional.linear(tokens.half(), half[0].weight.view(40, 48), half[0].bias))
