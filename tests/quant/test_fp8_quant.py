"""FP8 quantization of a pipeline: Fp8Linear against float64 arithmetic on the same codes, dtype moves, the
quantizer on the built-in models, checkpoints and the CLI."""
import os

import pytest
import torch

import velodiff as vd
from fixtures import fp8_special_inputs, run_cli
from velodiff.ops import reference as ref
from velodiff.quant import FP8, Fp8Linear, QuantConfig
from velodiff.quant.checkpoint import QUANTIZED_FILE
from velodiff.quant.fp8 import quantize_weight


def linear(k=96, n=40, seed=0, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(k, n, bias=bias).eval()


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_layer_is_the_product_of_its_codes(fmt, bias):
    """y = (decoded activation codes x scales) (decoded weight codes x scales)^T + bias, to fp32 summation error."""
    lin = linear(bias=bias)
    layer = Fp8Linear.from_linear(lin, "fp8", fmt)
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    a, asc = ref.quantize_fp8(x.reshape(-1, 96), fmt)
    want = (a.double() * asc.double()[:, None]) @ (layer.qweight.double() * layer.wscales.double()[:, None]).T
    if bias:
        want += lin.bias.detach().double()
    assert y.shape == (3, 7, 40)
    assert float((y.reshape(-1, 40).double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


def test_w8a8_layer_close_to_the_float_layer():
    lin = linear(k=512, n=64)
    x = torch.randn(50, 512, generator=torch.Generator().manual_seed(2))
    want = lin(x)
    got = Fp8Linear.from_linear(lin)(x)
    assert float((got - want).detach().norm() / want.detach().norm()) < 0.05  # two e4m3 roundings: ~3 % expected


def test_weight_only_is_a_linear_with_the_decoded_weight():
    lin = linear()
    layer = Fp8Linear.from_linear(lin, "fp8-weight-only")
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized_weight(), lin.bias))


def test_dtype_moves_keep_codes_and_scales():
    layer = Fp8Linear.from_linear(linear())
    codes, scales = layer.qweight.clone(), layer.wscales.clone()
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float8_e4m3fn and torch.equal(layer.qweight.view(torch.uint8),
                                                                       codes.view(torch.uint8))
    assert layer.wscales.dtype == torch.float32 and torch.equal(layer.wscales, scales)
    assert layer.bias.dtype == torch.bfloat16 and layer.dtype == torch.bfloat16
    y = layer(torch.randn(4, 96, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_weight_quantization_matches_the_op_and_clipping_saturates():
    w = torch.randn(16, 200, generator=torch.Generator().manual_seed(3))
    w[0, 5] = 40.0  # an outlier
    codes, scales = quantize_weight(w)
    op_codes, op_scales = vd.ops.quantize_fp8(w)
    assert torch.equal(codes.view(torch.uint8), op_codes.view(torch.uint8)) and torch.equal(scales, op_scales)
    clipped, cscales = quantize_weight(w, clip_percentile=99.0)
    assert cscales[0] < scales[0] / 4  # the row's scale no longer follows its outlier
    assert float(clipped[0, 5].float()) == 448.0  # which saturates
    with pytest.raises(ValueError, match="clip_percentile"):
        quantize_weight(w, clip_percentile=0)


def _latents(pipe, seed=3):
    return pipe(["a handwritten 3", "a handwritten 8"], num_inference_steps=6, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.fixture(scope="module")
def digits_fp8(tmp_path_factory):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    reference = _latents(pipe)
    report = vd.quant.quantize(pipe, FP8(), progress=False)
    out = str(tmp_path_factory.mktemp("q") / "digits-fp8")
    vd.quant.save_quantized(pipe, out)  # fp16 storage: FP8 codes and float32 scales must survive it
    return pipe, report, out, reference


def test_quantize_digits(digits_fp8):
    pipe, report, _, reference = digits_fp8
    assert report["layers"] == 32 and report["method"] == "fp8"
    assert report["layer_bytes_after"] < 0.55 * report["layer_bytes_before"]  # 1 byte a weight vs 2
    assert sum(isinstance(m, Fp8Linear) for m in pipe.unet.modules()) == 32
    rel = float((_latents(pipe) - reference).norm() / reference.norm())
    assert 0 < rel < 0.05, rel
    assert pipe.quantization["fp8_format"] == "e4m3"


def test_fp8_folder_round_trip_is_exact(digits_fp8):
    pipe, _, out, _ = digits_fp8
    from velodiff.loading import read_safetensors
    state = read_safetensors(os.path.join(out, "unet", QUANTIZED_FILE))
    key = next(k for k in state if k.endswith(".qweight"))
    assert state[key].dtype == torch.float8_e4m3fn
    assert state[key.replace("qweight", "wscales")].dtype == torch.float32
    loaded = vd.Pipeline.from_pretrained(out, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert sum(isinstance(m, Fp8Linear) for m in loaded.unet.modules()) == 32
    for name, m in pipe.unet.named_modules():
        if isinstance(m, Fp8Linear):
            other = loaded.unet.get_submodule(name)
            assert torch.equal(other.qweight.view(torch.uint8), m.qweight.view(torch.uint8))
            assert torch.equal(other.wscales, m.wscales)
    # the rest of the UNet was stored in fp16: compare one forward pass against the in-memory model made fp16-exact
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    a = loaded.unet(x, torch.tensor([500.0, 500.0]), ctx)
    b = pipe.unet(x, torch.tensor([500.0, 500.0]), ctx)
    assert float((a - b).norm() / b.norm()) < 1e-2


def test_fp8_on_dit_and_weight_only():
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    report = vd.quant.quantize(pipe, FP8(weight_only=True), progress=False)
    assert report["layers"] > 0 and all(m.method == "fp8-weight-only" for m in pipe.transformer.modules()
                                        if isinstance(m, Fp8Linear))


def test_convolutions_are_refused():
    pipe = vd.Pipeline.from_pretrained("digits")
    with pytest.raises(ValueError, match="linear layers only"):
        vd.quant.quantize(pipe, QuantConfig("fp8", rank=0, layers="all"), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="fp8_format"):
        QuantConfig("fp8", rank=0, fp8_format="e3m4")
    with pytest.raises(ValueError, match="clip_percentile applies"):
        QuantConfig("w8a8", rank=0, clip_percentile=99.0)
    with pytest.raises(ValueError, match="clip_percentile must be"):
        QuantConfig("fp8", rank=0, clip_percentile=150)


def test_cli_quantize_fp8_and_errors(tmp_path, capsys):
    out = str(tmp_path / "fp8")
    code, stdout, _ = run_cli(["quantize", "--model", "digits", "--method", "fp8", "--out", out], capsys)
    assert code == 0 and "quantized 32 layers of the unet with fp8" in stdout
    assert os.path.isfile(os.path.join(out, "unet", QUANTIZED_FILE))
    for extra, flag in ((["--method", "w8a8", "--clip-percentile", "99"], "--clip-percentile"),
                        (["--method", "fp8", "--clip-percentile", "0"], "--clip-percentile"),
                        (["--method", "w8a8", "--fp8-format", "e5m2"], "--fp8-format")):
        code, _, err = run_cli(["quantize", "--model", "digits", "--out", str(tmp_path / "x"), *extra], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and flag in err, err


# --- low-bit float formats (fake-quantized) ---------------------------------------------------------------------

from velodiff.quant import FpFormat, LowbitFP, LowbitINT, LowbitFpLinear  # noqa: E402
from velodiff.quant.lowbit_fp import (format_table, formats_of, grid_rows, grid_step, learn_rounding,  # noqa: E402
                                      magnitudes, quantize_rows, round_to_format)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_float_grid_is_the_fp8_codec_at_8_bits(fmt):
    """round_to_format's generic grid equals velodiff's FP8 encoder on every finite input (ties, subnormals,
    saturation included)."""
    v = fp8_special_inputs(fmt)
    v = v[torch.isfinite(v)]
    want = ref.encode_fp8(v, fmt).float()
    got = round_to_format(v, FpFormat.parse(fmt))
    assert torch.equal(got, want)


def test_four_bit_grids():
    values = torch.linspace(-8, 8, 3201)
    grids = {"e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6], "e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
             "e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5], "int4": [0, 1, 2, 3, 4, 5, 6, 7]}
    for name, grid in grids.items():
        fmt = FpFormat.parse(name)
        assert fmt.max == grid[-1]
        got = set(round_to_format(values, fmt).abs().tolist())
        assert got <= set(grid) and len(got) >= len(grid) - 1, (name, sorted(got))
    assert [f.name for f in formats_of(4)] == ["e1m2", "e2m1", "e3m0"]
    with pytest.raises(ValueError, match="format must look like"):
        FpFormat.parse("fp4")


def test_learned_rounding_beats_nearest_on_the_layer_output():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) / 8
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3, 64)  # uneven channels: rounding choices matter
    fmt = FpFormat.parse("e2m1")
    nearest, _ = quantize_rows(w, fmt)
    grid, scales = learn_rounding(w, x, fmt, 1.0, iters=300)
    learned = grid * scales[:, None]
    err = lambda q: float((x @ (q - w).T).square().sum())  # noqa: E731
    assert err(learned) < 0.9 * err(nearest)
    # on the grid, with the same scales as nearest rounding, each value the grid value below or above the weight
    assert torch.equal(scales, w.abs().amax(1) / fmt.max) and torch.equal(round_to_format(grid, fmt), grid)
    assert bool(((grid - w / scales[:, None]).abs() <= grid_step(w / scales[:, None], fmt)).all())


def test_lowbit_quantize_digits_fp_vs_int():
    """W4A8 on digits: float formats searched per layer, INT of the same width, and with learned rounding; each a
    LowbitFpLinear per default layer, outputs close to fp32's."""
    results = {}
    for label, config in (("fp", LowbitFP(4, 8, calibration_images=2, calibration_steps=4)),
                          ("int", LowbitINT(4, 8, calibration_images=2, calibration_steps=4))):
        pipe = vd.Pipeline.from_pretrained("digits")
        pipe.set_progress_bar_config(disable=True)
        reference = _latents(pipe)
        report = vd.quant.quantize(pipe, config, progress=False)
        layers = [m for m in pipe.unet.modules() if isinstance(m, LowbitFpLinear)]
        assert report["layers"] == len(layers) == 32
        assert all(m.a_format.name == ("e4m3" if label == "fp" else "int8") for m in layers)
        results[label] = float((_latents(pipe) - reference).norm() / reference.norm())
        assert 0 < results[label] < 0.5
        # 4-bit weights are packed; e4m3 activations put the FP layers on the FP8 GEMM, int8 ones stay fake
        assert all(m.qweight is not None and m.uses_kernel == (label == "fp") for m in layers)


def test_lowbit_config_validation():
    with pytest.raises(ValueError, match="w_bits"):
        LowbitFP(w_bits=9)
    with pytest.raises(ValueError, match="a_bits"):
        LowbitFP(a_bits=1)
    with pytest.raises(ValueError, match="learn_rounding"):
        QuantConfig("lowbit-int", rank=0, learn_rounding=True)


def test_fp8_attention_option_sets_and_restores_the_backend():
    from velodiff.models.attention import Attention
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    undo = QuantConfig("fp8", rank=0, fp8_attention=True).apply(pipe)
    backends = {m.backend for m in pipe.transformer.modules() if isinstance(m, Attention)}
    assert backends == {"fp8"} and pipe.quantization["fp8_attention"] is True
    out = pipe(class_labels=[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="latent").images
    assert torch.isfinite(out).all()
    undo()
    assert {m.backend for m in pipe.transformer.modules() if isinstance(m, Attention)} == {"auto"}
    with pytest.raises(ValueError, match="fp8_attention goes with method 'fp8'"):
        QuantConfig("w8a8", rank=0, fp8_attention=True)


# --- low-bit layers on the FP8 GEMM, and their checkpoints --------------------------------------------------------

@pytest.mark.parametrize("name", ["e1m2", "e2m1", "e3m0", "int4", "e4m3", "e5m2"])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_lowbit_layer_is_the_fake_quantized_product(name, bias):
    """A packed weight decodes exactly to grid x scale, and the FP8 GEMM (e4m3 activations) gives the fake-quantized
    product to fp32 summation error."""
    fmt = FpFormat.parse(name)
    lin = linear(k=301, n=37, bias=bias)
    grid, scales = grid_rows(lin.weight.detach(), fmt, clip=0.8)
    layer = LowbitFpLinear(301, 37, fmt, FpFormat.parse("e4m3"), bias=bias)
    layer.set_weight(grid, scales)
    if bias:
        layer.bias = lin.bias.detach().clone()
    assert layer.uses_kernel and layer.qweight.dtype == (torch.uint8 if fmt.bits == 4 else ref.FP8_DTYPES[name])
    assert torch.equal(layer.dequantized_weight(), grid * scales[:, None])
    x = torch.randn(4, 9, 301, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 4, 301)
    y = layer(x).reshape(-1, 37).double()
    xq = quantize_rows(x.reshape(-1, 301), FpFormat.parse("e4m3"))[0].double()
    want = xq @ layer.dequantized_weight().double().T + (lin.bias.detach().double() if bias else 0)
    mag = xq.abs() @ layer.dequantized_weight().double().abs().T
    assert bool(((y - want).abs() <= 301 * 2 ** -23 * mag + 1e-6).all())


def test_format_tables_hold_every_value():
    for fmt in (*formats_of(4), FpFormat.parse("int4")):
        table = format_table(fmt).float()
        mags = magnitudes(fmt).float()
        assert len(mags) == 8 and float(mags[-1]) == fmt.max
        assert torch.equal(table[:8], mags) and torch.equal(table[8:], -mags)
    with pytest.raises(ValueError, match="4-bit"):
        format_table(FpFormat.parse("e4m3"))


def test_lowbit_dtype_moves_keep_codes_tables_and_scales():
    fmt = FpFormat.parse("e2m1")
    layer = LowbitFpLinear(96, 40, fmt, FpFormat.parse("e4m3"))
    layer.set_weight(*grid_rows(linear().weight.detach(), fmt))
    codes, table, scales = layer.qweight.clone(), layer.w_table.clone(), layer.wscales.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.qweight, codes) and layer.w_table.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.w_table.view(torch.uint8), table.view(torch.uint8)) and torch.equal(layer.wscales, scales)
    assert layer(torch.randn(3, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_lowbit_checkpoint_round_trip_and_refusals(tmp_path):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    vd.quant.quantize(pipe, LowbitFP(4, 8, calibration_images=2, calibration_steps=4), progress=False)
    out = str(tmp_path / "lowbit")
    vd.quant.save_quantized(pipe, out, dtype=torch.float32)
    loaded = vd.Pipeline.from_pretrained(out, dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    mine = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LowbitFpLinear)}
    theirs = {n: m for n, m in loaded.unet.named_modules() if isinstance(m, LowbitFpLinear)}
    assert mine.keys() == theirs.keys() and len(mine) == 32
    assert all(m.w_format == theirs[n].w_format and m.a_format == theirs[n].a_format for n, m in mine.items())
    assert torch.equal(_latents(loaded), _latents(pipe))  # float32 storage: the same model exactly
    # a weight format without a packed form has no checkpoint
    pipe3 = vd.Pipeline.from_pretrained("digits")
    pipe3.set_progress_bar_config(disable=True)
    vd.quant.quantize(pipe3, LowbitFP(3, 8, calibration_images=1, calibration_steps=2), progress=False)
    with pytest.raises(ValueError, match="without a packed form"):
        vd.quant.save_quantized(pipe3, str(tmp_path / "three"))


@pytest.mark.parametrize("model", ["digits", "digits-dit"])
def test_cli_quantize_lowbit(tmp_path, capsys, model):
    out = str(tmp_path / "lb")
    code, stdout, _ = run_cli(["quantize", "--model", model, "--method", "lowbit-fp", "--learn-rounding",
                               "--rounding-iters", "5", "--calibration-images", "1", "--calibration-steps", "2",
                               "--out", out], capsys)
    assert code == 0 and "with lowbit-fp" in stdout, stdout
    loaded = vd.Pipeline.from_pretrained(out)
    layers = [m for m in vd.quant.denoiser_of(loaded)[1].modules() if isinstance(m, LowbitFpLinear)]
    assert layers and all(m.learned_rounding and m.w_format.bits == 4 and m.uses_kernel for m in layers)


def test_cli_lowbit_flag_errors(tmp_path, capsys):
    for extra, flag in ((["--method", "fp8", "--a-bits", "4"], "--a-bits"),
                        (["--method", "lowbit-fp", "--a-bits", "9"], "--a-bits"),
                        (["--method", "lowbit-int", "--learn-rounding"], "--learn-rounding"),
                        (["--method", "lowbit-fp", "--rounding-iters", "7"], "--rounding-iters")):
        code, _, err = run_cli(["quantize", "--model", "digits", "--out", str(tmp_path / "x"), *extra], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and flag in err, err
