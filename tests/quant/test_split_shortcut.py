"""Q-Diffusion's split shortcut quantization (QuantConfig.split_shortcut): the UNet up blocks' conv1 /
conv_shortcut, whose input concatenates hidden states and a skip of different ranges, quantized as one convolution
per part, each with its own activation scales."""
import os

import pytest
import torch
from torch import nn

import velodiff as vd
from fixtures import run_cli
from velodiff.quant import QuantConfig, _int_layer, _split_conv
from velodiff.quant.conv import QuantizedConv2d, SplitConv2d


def _conv(cin=40, cout=16, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1).eval()


def test_split_keeps_the_small_part_that_a_shared_group_scale_loses():
    """Split at 24 channels of 40: im2col column 216 lies inside an activation group of 64 (216 % 64 = 24), so
    without the split one scale covers both parts there. With a small-range first part whose weights matter (as the
    hidden states beside a large skip), the split error is a fraction of the shared-scale error."""
    conv = _conv()
    with torch.no_grad():
        conv.weight[:, :24] *= 300.0
    x = torch.randn(2, 40, 6, 6, generator=torch.Generator().manual_seed(1))
    x[:, :24] *= 0.01
    x[:, 24:] *= 3.0
    config = QuantConfig("w8a8", rank=0)
    shared = QuantizedConv2d.from_linear(_int_layer(conv.weight.reshape(16, -1), conv.bias, None, config, 0), conv)
    split = _split_conv(conv, 24, None, config, 0)
    with torch.no_grad():
        want = conv(x).double()
        err = {name: float((m(x).double() - want).norm() / want.norm()) for name, m in
               (("shared", shared), ("split", split))}
    assert err["split"] < 0.3 * err["shared"], err
    assert err["split"] < 0.01, err  # int8 on both parts: well under 1 %


def test_split_parts_are_the_weight_halves():
    conv = _conv(seed=2)
    split = _split_conv(conv, 24, None, QuantConfig("w8a8", rank=0), 0)
    assert isinstance(split, SplitConv2d) and split.first.geometry["in_channels"] == 24
    assert split.second.geometry["in_channels"] == 16 and split.second.bias is None
    assert torch.equal(split.first.bias, conv.bias.detach())
    with torch.no_grad():
        x = torch.randn(1, 40, 5, 5)
        assert torch.equal(split(x), split.first(x[:, :24]) + split.second(x[:, 24:]))


@pytest.fixture(scope="module")
def digits_split():
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    vd.quant.quantize(pipe, QuantConfig("svdquant", rank=4, layers="all", split_shortcut=True, calibration_images=2,
                                        calibration_steps=3), progress=False)
    return pipe


def _latents(pipe):
    return pipe(["a handwritten 3", "a handwritten 5"], num_inference_steps=4, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_digits_up_blocks_are_split(digits_split):
    names = [n for n, m in digits_split.unet.named_modules() if isinstance(m, SplitConv2d)]
    assert names and all(n.startswith("up_blocks.") and n.rpartition(".")[2] in ("conv1", "conv_shortcut")
                         for n in names)
    up_convs = [n for n, m in digits_split.unet.named_modules()
                if n.startswith("up_blocks.") and n.rpartition(".")[2] in ("conv1", "conv_shortcut")]
    assert sorted(names) == sorted(up_convs)  # every concat-fed conv, nothing else


def test_split_checkpoint_round_trip(digits_split, tmp_path):
    out = str(tmp_path / "split")
    vd.quant.save_quantized(digits_split, out, dtype=torch.float32)
    loaded = vd.Pipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    assert sum(isinstance(m, SplitConv2d) for m in loaded.unet.modules()) == \
        sum(isinstance(m, SplitConv2d) for m in digits_split.unet.modules())
    assert torch.equal(_latents(loaded), _latents(digits_split))


def test_split_needs_a_method_that_takes_convolutions():
    with pytest.raises(ValueError, match="split_shortcut applies"):
        QuantConfig("fp8", rank=0, split_shortcut=True)


def test_cli_split_shortcut(tmp_path, capsys):
    out = str(tmp_path / "q")
    code, stdout, _ = run_cli(["quantize", "--model", "digits", "--method", "w8a8", "--layers", "all",
                               "--split-shortcut", "--out", out], capsys)
    assert code == 0 and os.path.isdir(out), stdout
    loaded = vd.Pipeline.from_pretrained(out)
    assert any(isinstance(m, SplitConv2d) for m in loaded.unet.modules())
    for extra in (["--method", "w8a8"], ["--method", "fp8", "--layers", "all"]):
        code, _, err = run_cli(["quantize", "--model", "digits", "--split-shortcut", "--out", str(tmp_path / "x"),
                                *extra], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and "--split-shortcut" in err, err
