"""velodiff's SD / SDXL image-to-image against diffusers' Img2Img pipelines on tiny random components: same saved
folder, same scheduler config, same seed."""
import os

import numpy as np
import pytest
import torch

import velodiff as vd
from fixtures import save_pipeline, tiny_sd_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Max-abs difference allowed between velodiff's and diffusers' [0, 1] images: fp32 on both sides (u = 6e-8) through
# the VAE encoder, 1-5 denoiser steps and the decoder, so rounding alone. Measured over generator seeds 0-5 and
# every case below (132 runs): at most 3.0e-6 (median 1.1e-6). The bound is 2x the largest observed. c_d (the
# sampler's coefficient of the model output) off by a relative 1e-4 gives 2.0e-5 .. 1.1e-4, except in the one-step
# DDIM case (strength 0.3 of 5 steps), which that bug moves only 2.5e-6 .. 4e-6, within rounding.
IMAGE_TOL = 6e-6
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
            "unipc": "UniPCMultistepScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "heun": "HeunDiscreteScheduler"}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipes(request, tmp_path_factory):
    import diffusers
    folder = save_pipeline(tiny_sd_pipeline(request.param), str(tmp_path_factory.mktemp(request.param)))
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if request.param == "sdxl" else \
        diffusers.StableDiffusionImg2ImgPipeline
    theirs = cls.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    theirs.folder = folder
    ours = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    ours.set_progress_bar_config(disable=True)
    return request.param, theirs, ours


def images(kind: str):
    """(PIL images, the same as a [0, 1] tensor) of 32x32, deterministic."""
    from PIL import Image
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(2)]
    pil = [Image.fromarray(a) for a in arrays]
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return pil, tensor


def run_diffusers(pipe, sampler, **kwargs):
    import diffusers
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler]).from_pretrained(pipe.folder, subfolder="scheduler")
    return pipe(**kwargs).images


@pytest.mark.parametrize("sampler,strength,form", [
    ("ddim", 0.3, "pil"), ("ddim", 1.0, "tensor"), ("euler", 0.75, "pil"), ("euler", 1.0, "tensor"),
    ("dpmpp_2m", 0.75, "tensor"), ("dpmpp_2m", 0.3, "pil"), ("unipc", 0.75, "pil"), ("unipc", 1.0, "tensor"),
    ("euler_a", 0.75, "pil"), ("heun", 0.75, "tensor")])
def test_img2img_matches_diffusers(pipes, sampler, strength, form):
    kind, theirs, ours = pipes
    pil, tensor = images(kind)
    image = pil if form == "pil" else tensor
    kwargs = dict(prompt=["lower newer", "wider"], num_inference_steps=5, guidance_scale=6.0, strength=strength,
                  output_type="np")
    expect = run_diffusers(theirs, sampler, image=image, generator=torch.Generator().manual_seed(3), **kwargs)
    got = ours(sampler=sampler, image=image, generator=torch.Generator().manual_seed(3), **kwargs).images
    assert got.shape == expect.shape == (2, 32, 32, 3)
    err = np.abs(got - expect).max()
    assert err <= IMAGE_TOL, f"{kind}/{sampler}/{strength}/{form}: max abs difference {err}"


def test_img2img_single_image_several_per_prompt_and_signed_tensor(pipes):
    kind, theirs, ours = pipes
    _, tensor = images(kind)
    signed = tensor[:1] * 2 - 1  # [-1, 1] tensors are used as they are
    kw = dict(prompt="lower", num_inference_steps=4, guidance_scale=5.0, strength=0.6, num_images_per_prompt=2,
              output_type="np")
    expect = run_diffusers(theirs, "ddim", image=signed, generator=torch.Generator().manual_seed(0), **kw)
    got = ours(sampler="ddim", image=signed, generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(got - expect).max() <= IMAGE_TOL


def test_img2img_bad_arguments(pipes):
    _, _, ours = pipes
    pil, tensor = images("")
    for bad in (0.0, 1.5, -0.2, "0.5"):
        with pytest.raises(ValueError, match="strength"):
            ours("lower", image=pil[0], strength=bad, num_inference_steps=4)
    with pytest.raises(ValueError, match="strength"):
        ours("lower", image=pil[0], strength=0.1, num_inference_steps=4)  # int(0.4) = 0 steps
    with pytest.raises(ValueError, match="image"):
        ours("lower", image=tensor[:, :, :31, :], num_inference_steps=2)
    with pytest.raises(ValueError, match="image"):
        ours("lower", image=pil[0].resize((33, 32)), num_inference_steps=2)
    with pytest.raises(ValueError, match="image"):
        ours("lower", image=pil[0], height=64, width=64, num_inference_steps=2)
    with pytest.raises(ValueError, match="image"):
        ours("lower", image="not an image", num_inference_steps=2)
