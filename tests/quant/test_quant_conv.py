"""QuantizedConv2d (im2col + the quantized GEMM) and whole-UNet quantization with layers="all"."""
import pytest
import torch
import torch.nn.functional as F

import velodiff as vd
from fixtures import digits_unet_inputs
from velodiff.quant import QuantConfig, QuantizedConv2d, QuantizedLinear
from velodiff.quant.conv import conv_patches, conv_geometry
from velodiff.quant.svdquant import LayerStats, quantize_layer

GEOMETRIES = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
              dict(kernel_size=3, stride=2, padding=0), dict(kernel_size=(3, 1), padding=(1, 0), dilation=2)]


def _conv_layer(method, geometry, cin=12, cout=20, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, **geometry)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, 11, 9, generator=g)
    rows = conv_patches(x, conv_geometry(conv))
    q = quantize_layer(conv.weight.reshape(cout, -1), conv.bias, method, LayerStats(rows.abs().amax(0), rows[:64]),
                       rank=8, alphas=(0.5,))
    return conv, QuantizedConv2d.from_linear(q, conv), q, x


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_is_the_linear_layer_over_patches(geometry):
    conv, qconv, qlin, x = _conv_layer("svdquant", geometry)
    y = qconv(x)
    ref_shape = conv(x).shape
    assert y.shape == ref_shape
    patches = conv_patches(x, conv_geometry(conv))
    manual = qlin(patches).reshape(2, -1, conv.out_channels).transpose(1, 2).reshape(ref_shape)
    assert torch.equal(y, manual)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method,bound", [("w8a8", 0.03), ("svdquant", 0.25), ("naive-w4a4", 0.35)])
def test_conv_close_to_float_conv(geometry, method, bound):
    conv, qconv, _, x = _conv_layer(method, geometry)
    with torch.no_grad():
        ref = conv(x)
    rel = float((qconv(x) - ref).norm() / ref.norm())
    assert rel < bound, rel


def test_conv_rejects_bad_input():
    _, qconv, _, _ = _conv_layer("w8a8", GEOMETRIES[0])
    with pytest.raises(ValueError, match=r"\[B, 12, H, W\]"):
        qconv(torch.randn(2, 5, 8, 8))


@pytest.fixture(scope="module")
def all_layers(tmp_path_factory):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    report = vd.quant.quantize(pipe, QuantConfig("svdquant", rank=8, layers="all", calibration_images=2,
                                                 calibration_steps=3, alphas=(0.5,)), progress=False)
    out = vd.quant.save_quantized(pipe, str(tmp_path_factory.mktemp("all") / "q"), dtype=torch.float32)
    return pipe, report, out


def test_all_layers_quantizes_convolutions(all_layers):
    pipe, report, _ = all_layers
    convs = {n for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedConv2d)}
    linears = {n for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedLinear)}
    assert "down_blocks.0.resnets.0.conv1" in convs and "down_blocks.0.downsamplers.0.conv" in convs
    assert any("attn2.to_k" in n for n in linears) and any(n.endswith("time_emb_proj") for n in linears)
    assert not isinstance(pipe.unet.conv_in, QuantizedLinear) and not isinstance(pipe.unet.conv_out, QuantizedLinear)
    # SD 1.x proj_in / proj_out are 1x1 convs applied to tokens: quantized as linear layers
    proj = pipe.unet.mid_block.attentions[0].proj_in
    assert type(proj) is QuantizedLinear and proj.token_conv
    assert report["layers"] == len(linears) and report["layer_bytes_after"] < report["layer_bytes_before"]


def test_all_layers_round_trip_and_quality(all_layers):
    pipe, _, out = all_layers
    loaded = vd.Pipeline.from_pretrained(out)
    x, t, e = digits_unet_inputs()
    assert torch.equal(loaded.unet(x, t, e), pipe.unet(x, t, e))
    original = vd.Pipeline.from_pretrained("digits").unet(x, t, e)
    assert float((pipe.unet(x, t, e) - original).norm() / original.norm()) < 0.5


def test_conv_checkpoint_into_wrong_geometry_is_refused(all_layers, tmp_path):
    _, _, out = all_layers
    import os
    from velodiff.quant import QuantizedCheckpointError
    from velodiff.quant.checkpoint import QUANTIZED_FILE
    fresh = vd.Pipeline.from_pretrained("digits").unet
    fresh.down_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(32, 32, 3, padding=2, dilation=2)
    with pytest.raises(QuantizedCheckpointError, match="down_blocks.0.resnets.0.conv1"):
        vd.quant.load_quantized(fresh, os.path.join(out, "unet", QUANTIZED_FILE))


def test_all_layers_optimize_restore_is_exact():
    pipe = vd.Pipeline.from_pretrained("digits")
    x, t, e = digits_unet_inputs()
    before = pipe.unet(x, t, e)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    conv_type = type(pipe.unet.mid_block.attentions[0].proj_in)  # a packed conv on the CPU (cpu_fast)
    assert issubclass(conv_type, torch.nn.Conv2d)
    vd.optimize(pipe, QuantConfig("naive-w4a4", rank=0, layers="all"))
    assert not torch.equal(pipe.unet(x, t, e), before)
    vd.restore(pipe)
    assert type(pipe.unet.mid_block.attentions[0].proj_in) is conv_type
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe.unet(x, t, e), before)
