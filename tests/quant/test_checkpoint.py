"""Quantizing a pipeline, writing it as a folder and loading it back like any model."""
import json
import os

import pytest
import torch

import velodiff as vd
from fixtures import digits_unet_inputs
from velodiff.quant import QuantConfig, QuantizedCheckpointError, QuantizedLinear
from velodiff.quant.checkpoint import QUANTIZED_FILE


def _digits_latents(pipe, seed=3):
    out = pipe(["a handwritten 3", "a handwritten 8"], num_inference_steps=6, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    reference = _digits_latents(pipe)
    report = vd.quant.quantize(pipe, QuantConfig("svdquant", rank=8, calibration_images=4, calibration_steps=4,
                                                 alphas=(0.25, 0.5)), progress=False)
    out = str(tmp_path_factory.mktemp("q") / "digits-svdq")
    vd.quant.save_quantized(pipe, out, dtype=torch.float32)
    return pipe, report, out, reference


def test_report_and_layers(quantized):
    pipe, report, _, _ = quantized
    assert report["layers"] == 32 and report["component"] == "unet"
    assert report["layer_bytes_after"] < report["layer_bytes_before"]
    names = {n for n, m in pipe.unet.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(names) == 32 and not any("attn2.to_k" in n or "attn2.to_v" in n for n in names)


def test_quantized_output_is_close_but_not_identical(quantized):
    pipe, _, _, reference = quantized
    lat = _digits_latents(pipe)
    rel = float((lat - reference).norm() / reference.norm())
    assert 0 < rel < 0.2, rel


def test_folder_round_trip_is_exact(quantized):
    pipe, _, out, _ = quantized
    assert os.path.isfile(os.path.join(out, "unet", QUANTIZED_FILE))
    assert not os.path.exists(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    loaded = vd.Pipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.unet.modules()) == 32
    assert torch.equal(_digits_latents(loaded), _digits_latents(pipe))


def test_fp16_storage_loads_and_stays_close(quantized, tmp_path):
    pipe, _, _, _ = quantized
    out = vd.quant.save_quantized(pipe, str(tmp_path / "half"))  # default: float16
    from velodiff.loading import read_safetensors
    state = read_safetensors(os.path.join(out, "unet", QUANTIZED_FILE))
    key = next(k for k in state if k.endswith(".wscales"))
    assert state[key].dtype == torch.float16
    assert state[key.replace("wscales", "smooth")].dtype == torch.float32
    loaded = vd.Pipeline.from_pretrained(out)
    mine, theirs = loaded.unet.state_dict(), pipe.unet.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in theirs.items():  # every stored tensor within fp16 rounding of the fp32 one
        assert float((mine[k].float() - v.float()).norm()) <= 1e-3 * float(v.float().norm()) + 1e-12, k
    # W4A4 is discontinuous (an activation code flips under a tiny perturbation), so compare one forward pass
    # with the quantization error itself rather than with a fixed bound
    x, t, e = digits_unet_inputs()
    original = vd.Pipeline.from_pretrained("digits").unet(x, t, e)
    y32, y16 = pipe.unet(x, t, e), loaded.unet(x, t, e)
    assert float((y16 - y32).norm()) < 0.75 * float((y32 - original).norm())


def _rewrite_metadata(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, dst, metadata=meta)


def test_unknown_format_version_is_refused(quantized, tmp_path):
    _, _, out, _ = quantized
    import shutil
    bad = str(tmp_path / "v9")
    shutil.copytree(out, bad)
    path = os.path.join(bad, "unet", QUANTIZED_FILE)
    _rewrite_metadata(path, path, velodiff_quant_format="9")
    with pytest.raises(QuantizedCheckpointError, match="format version '9' is unknown"):
        vd.Pipeline.from_pretrained(bad)


def test_wrong_model_is_refused(quantized):
    _, _, out, _ = quantized
    from velodiff.models.unet import UNet2DConditionModel
    path = os.path.join(out, "unet", QUANTIZED_FILE)
    config = json.load(open(os.path.join(out, "unet", "config.json")))
    config["block_out_channels"] = [32, 96]
    other = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    with pytest.raises(QuantizedCheckpointError, match="block_out_channels"):
        vd.quant.load_quantized(other, path)
    dit = vd.Pipeline.from_pretrained("digits-dit").transformer if os.path.isdir(
        vd.pipelines.BUILTIN_MODELS["digits-dit"]) else None
    if dit is not None:
        with pytest.raises(QuantizedCheckpointError, match="made for a UNet2DConditionModel"):
            vd.quant.load_quantized(dit, path)


def test_load_into_unquantized_model(quantized):
    pipe, _, out, _ = quantized
    fresh = vd.Pipeline.from_pretrained("digits")
    fresh.set_progress_bar_config(disable=True)
    vd.quant.load_quantized(fresh.unet, os.path.join(out, "unet", QUANTIZED_FILE))
    assert torch.equal(_digits_latents(fresh), _digits_latents(pipe))


def test_not_a_quantized_file(tmp_path):
    from velodiff.loading import write_safetensors
    p = str(tmp_path / "plain.safetensors")
    write_safetensors({"a": torch.randn(2)}, p)
    with pytest.raises(QuantizedCheckpointError, match="not a velodiff quantized checkpoint"):
        vd.quant.load_quantized(torch.nn.Linear(2, 2), p)


def test_optimize_and_restore():
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    ref = _digits_latents(pipe)
    vd.optimize(pipe, QuantConfig("naive-w4a4", rank=0))
    assert any(isinstance(m, QuantizedLinear) for m in pipe.unet.modules())
    assert not torch.equal(_digits_latents(pipe), ref)
    vd.restore(pipe)
    assert not any(isinstance(m, QuantizedLinear) for m in pipe.unet.modules())
    assert torch.equal(_digits_latents(pipe), ref)


def test_save_refuses_loras_and_unquantized(quantized, tmp_path):
    pipe = vd.Pipeline.from_pretrained("digits")
    with pytest.raises(ValueError, match="not quantized"):
        vd.quant.save_quantized(pipe, str(tmp_path / "x"))
    qpipe, _, _, _ = quantized
    layer = next(m for m in qpipe.unet.modules() if isinstance(m, QuantizedLinear))
    layer.add_lora("l", torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2))
    try:
        with pytest.raises(ValueError, match="remove the LoRAs"):
            vd.quant.save_quantized(qpipe, str(tmp_path / "y"))
    finally:
        layer.remove_lora("l")


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        QuantConfig("gptq")
    with pytest.raises(ValueError, match="rank"):
        QuantConfig("svdquant", rank=0)
    with pytest.raises(TypeError, match="QuantConfig"):
        vd.quant.quantize(vd.Pipeline.from_pretrained("digits"), "svdquant")


@pytest.mark.cuda
def test_quantized_folder_runs_on_cuda(quantized):
    """The same quantized folder on the GPU kernels: one UNet forward agrees with the CPU kernels to well within
    the quantization error (activation codes may flip at rounding boundaries, so not bit for bit)."""
    pipe, _, out, _ = quantized
    gpu = vd.Pipeline.from_pretrained(out, device="cuda")
    x, t, e = digits_unet_inputs()
    original = vd.Pipeline.from_pretrained("digits").unet(x, t, e)
    cpu = pipe.unet(x, t, e)
    cuda = gpu.unet(x.cuda(), t.cuda(), e.cuda()).cpu()
    assert float((cuda - cpu).norm()) < 0.5 * float((cpu - original).norm())
    lat = gpu(["a handwritten 3"], num_inference_steps=4, guidance_scale=3.0, output_type="latent",
              generator=torch.Generator().manual_seed(1)).images
    assert lat.is_cuda and torch.isfinite(lat).all()


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["svdquant", "naive-w4a4", "w8a8"])
def test_quantize_on_cuda_matches_cpu_quality(quantized, method):
    """Quantizing on the GPU (calibration, smoothing search, SVD all on CUDA) gives a model as good as quantizing
    on the CPU: the error against the unquantized UNet is within 1.5x of the CPU-quantized one's."""
    x, t, e = digits_unet_inputs()
    original = vd.Pipeline.from_pretrained("digits").unet(x, t, e)
    errors = {}
    for device in ("cpu", "cuda"):
        pipe = vd.Pipeline.from_pretrained("digits", device=device)
        config = QuantConfig(method, rank=8 if method == "svdquant" else 0, calibration_images=4,
                             calibration_steps=4, alphas=(0.25, 0.5))
        vd.quant.quantize(pipe, config, progress=False)
        out = pipe.unet(x.to(device), t.to(device), e.to(device)).cpu()
        errors[device] = float((out - original).norm() / original.norm())
    assert 0 < errors["cuda"] < 1.5 * errors["cpu"] + 1e-3, errors


def test_save_refuses_an_existing_folder_and_force_keeps_other_files(quantized, tmp_path):
    """No data loss: an existing destination is refused unless force=True; force replaces only what it writes, so
    a file the user put there survives; the source folder's model-index settings (its default guidance) travel."""
    import stat
    from velodiff.loading.output import DestinationExistsError
    pipe, _, _, _ = quantized
    out = tmp_path / "q"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(DestinationExistsError, match="exists; nothing was written"):
        vd.quant.save_quantized(pipe, str(out))
    assert os.listdir(out) == ["notes.txt"]
    old = os.umask(0o027)
    try:
        vd.quant.save_quantized(pipe, str(out), force=True)
    finally:
        os.umask(old)
    assert (out / "notes.txt").read_text() == "the user's"
    path = out / "unet" / QUANTIZED_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and stat.S_IMODE(os.stat(out / "unet").st_mode) == 0o750
    source = json.load(open(os.path.join(vd.pipelines.BUILTIN_MODELS["digits"], "model_index.json")))
    written = json.load(open(out / "model_index.json"))
    assert written == source and "_velodiff_defaults" in written
    loaded = vd.Pipeline.from_pretrained(str(out))
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.unet.modules()) == 32
    assert not [n for n in os.listdir(tmp_path) if ".velodiff-" in n]
