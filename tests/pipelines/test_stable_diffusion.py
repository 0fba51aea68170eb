"""velodiff's SD / SDXL pipelines against diffusers' on tiny random-weight components, same seed and sampler."""
import os

import numpy as np
import pytest
import torch

import velodiff as vd
from velodiff.models.conv_prepack import PackedConv2d, PackedLinear
from fixtures import save_pipeline, tiny_sd_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Max-abs difference allowed between velodiff's and diffusers' [0, 1] images. Both compute in fp32 (unit roundoff
# u = 2^-24 = 6e-8) through the text encoder(s), 3-4 denoiser steps and the VAE decoder, ordering their sums
# differently (fused sampler update, attention and projection layouts), so the images differ by rounding alone.
# Measured over generator seeds 0-5 and every case of the two parity tests below (126 runs): at most 2.2e-6
# (median 1.0e-6 for text2img), i.e. ~40 u at 0.5; the per-run maximum over 6144 pixels moves little between seeds
# (at most 1.5x the case's median). The bound is ~2x the largest observed, room for another CPU's summation order
# but not for a bug: c_d (the sampler's coefficient of the model output) off by a relative 1e-4 gives 1.7e-5 ..
# 9.9e-5. (The scale of an attention layer off by 1e-4 is invisible here, 1e-6 at most: the tiny random-weight
# models' attention logits are small, so softmax hardly depends on the scale; tests/models check the layers.)
IMAGE_TOL = 5e-6
# Our pipeline against itself with another attention kernel ("math": fp32 softmax(q k^T) v vs SDPA) or with the
# prepacked channels-last convolutions: measured at most 3.1e-6 and 4.8e-6 (seeds 0-5, all three fixtures).
ATTENTION_BACKEND_TOL = 6e-6
CONV_PREPACK_TOL = 1e-5

# velodiff sampler name -> diffusers scheduler class name (configured from the folder's scheduler config)
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
            "unipc": "UniPCMultistepScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module", params=["sd15", "sd2", "sdxl"])
def pipes(request, tmp_path_factory):
    theirs = tiny_sd_pipeline(request.param)
    folder = save_pipeline(theirs, str(tmp_path_factory.mktemp(request.param)))
    ours = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    theirs.folder = folder
    return request.param, theirs, ours


def run_diffusers(pipe, sampler, **kwargs):
    """diffusers with the sampler's scheduler read from the saved folder, as velodiff reads it (from_config of
    the in-memory config would drop the values the original class had as defaults)."""
    import diffusers
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_pretrained(pipe.folder, subfolder="scheduler")
    return pipe(**kwargs).images


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_text2img_matches_diffusers(pipes, sampler):
    kind, theirs, ours = pipes
    kwargs = dict(prompt=["lower newer", "wider"], num_inference_steps=4, guidance_scale=6.0, height=32, width=32,
                  output_type="np")
    expect = run_diffusers(theirs, sampler, generator=torch.Generator().manual_seed(3), **kwargs)
    got = ours(sampler=sampler, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert got.shape == expect.shape
    err = np.abs(got - expect).max()
    assert err <= IMAGE_TOL, f"{kind}/{sampler}: max abs difference {err}"


@pytest.mark.parametrize("sampler", ["euler_a", "ddim"])
def test_a_list_of_generators_gives_each_image_its_own_noise(pipes, sampler):
    """With one generator per image, diffusers draws the initial noise and an ancestral sampler's step noise of
    image i from generator i; so does velodiff, and image i then equals the image drawn alone with generator i (up
    to the batch's rounding; the server's per-request seeds rely on it)."""
    kind, theirs, ours = pipes
    kwargs = dict(prompt=["lower newer", "wider"], num_inference_steps=4, guidance_scale=6.0, height=32, width=32,
                  output_type="np")
    gens = lambda: [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]  # noqa: E731
    expect = run_diffusers(theirs, sampler, generator=gens(), **kwargs)
    got = ours(sampler=sampler, generator=gens(), **kwargs).images
    assert np.abs(got - expect).max() <= IMAGE_TOL
    alone = ours(sampler=sampler, generator=torch.Generator().manual_seed(9),
                 **dict(kwargs, prompt="wider")).images
    assert np.abs(got[1] - alone[0]).max() <= IMAGE_TOL


def test_negative_prompt_images_per_prompt_and_no_guidance(pipes):
    kind, theirs, ours = pipes
    for kwargs in (dict(negative_prompt="low", num_images_per_prompt=2, guidance_scale=5.0),
                   dict(guidance_scale=1.0)):
        kw = dict(prompt="lower", num_inference_steps=3, height=32, width=32, output_type="np", **kwargs)
        expect = run_diffusers(theirs, "ddim", generator=torch.Generator().manual_seed(0), **kw)
        got = ours(sampler="ddim", generator=torch.Generator().manual_seed(0), **kw).images
        assert np.abs(got - expect).max() <= IMAGE_TOL


def test_pil_output_and_bad_arguments(pipes):
    _, _, ours = pipes
    out = ours("lower", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32) and out.num_model_evaluations == 2
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours("lower", num_inference_steps=0)
    with pytest.raises(ValueError, match="height"):
        ours("lower", height=31)
    with pytest.raises(TypeError, match="prompt"):
        ours(3)
    with pytest.raises(ValueError, match="sampler"):
        ours("lower", num_inference_steps=2, height=32, width=32, sampler="nope")


def test_optimize_and_restore_attention_backend(pipes):
    _, _, ours = pipes
    kw = dict(prompt="lower", num_inference_steps=2, height=32, width=32, output_type="np")
    base = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.optimize(ours, vd.accel.AttentionBackend("math"))
    backends = {m.backend for m in ours.unet.modules() if hasattr(m, "backend")}
    assert backends == {"math"}
    alt = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.restore(ours)
    assert {m.backend for m in ours.unet.modules() if hasattr(m, "backend")} == {"auto"}
    assert np.abs(alt - base).max() <= ATTENTION_BACKEND_TOL


def test_cpu_conv_prepack_config(pipes):
    """vd.accel.CPUConvPrepack keeps the images and vd.restore puts back the convs it packed (the VAE's; a UNet
    loaded on the CPU comes packed already and stays so)."""
    import torch.nn as nn
    _, _, ours = pipes
    types = lambda m: [type(c) for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    before = {name: types(getattr(ours, name)) for name in ("unet", "vae")}
    kw = dict(prompt="lower", num_inference_steps=2, height=32, width=32, output_type="np")
    base = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.optimize(ours, vd.accel.CPUConvPrepack())
    assert all(t is PackedConv2d for t in types(ours.vae))
    fast = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.restore(ours)
    assert {name: types(getattr(ours, name)) for name in ("unet", "vae")} == before
    assert np.abs(fast - base).max() <= CONV_PREPACK_TOL


def test_cpu_loads_the_unet_in_its_fastest_layout(tmp_path):
    """from_pretrained on the CPU (fp32 / bf16) packs the UNet's convs in channels-last; cpu_fast=False keeps the
    plain layout; the two give the same images within float rounding."""
    import torch.nn as nn
    fast = vd.Pipeline.from_pretrained("digits")
    plain = vd.Pipeline.from_pretrained("digits", cpu_fast=False)
    convs = lambda p: [type(m) for m in p.unet.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert set(convs(fast)) == {PackedConv2d} and set(convs(plain)) == {nn.Conv2d}
    assert all(type(m) is nn.Conv2d for m in fast.vae.modules() if isinstance(m, nn.Conv2d))
    bf16 = vd.Pipeline.from_pretrained("digits", dtype=torch.bfloat16)
    assert set(convs(bf16)) == {PackedConv2d}
    linears = lambda p: {type(m) for m in p.unet.modules() if isinstance(m, nn.Linear)}  # noqa: E731
    assert linears(bf16) == {PackedLinear} and linears(fast) == {PackedLinear} and linears(plain) == {nn.Linear}
    assert set(convs(vd.Pipeline.from_pretrained("digits", dtype=torch.float16))) == {nn.Conv2d}
    run = lambda p: p(["a handwritten 4"], num_inference_steps=3, output_type="np",  # noqa: E731
                      generator=torch.Generator().manual_seed(0)).images
    for p in (fast, plain):
        p.set_progress_bar_config(disable=True)
    assert np.abs(run(fast) - run(plain)).max() <= CONV_PREPACK_TOL
    for bad in ("no", 0, None):
        with pytest.raises(TypeError, match="cpu_fast must be True or False"):
            vd.Pipeline.from_pretrained("digits", cpu_fast=bad)
