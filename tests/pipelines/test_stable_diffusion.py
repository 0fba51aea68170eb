"""velodiff's SD / SDXL pipelines against diffusers' on tiny random-weight components, same seed and sampler."""
import os

import numpy as np
import pytest
import torch

import velodiff as vd
from fixtures import save_pipeline, tiny_sd_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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
    assert err <= 1e-3, f"{kind}/{sampler}: max abs difference {err}"


def test_negative_prompt_images_per_prompt_and_no_guidance(pipes):
    kind, theirs, ours = pipes
    for kwargs in (dict(negative_prompt="low", num_images_per_prompt=2, guidance_scale=5.0),
                   dict(guidance_scale=1.0)):
        kw = dict(prompt="lower", num_inference_steps=3, height=32, width=32, output_type="np", **kwargs)
        expect = run_diffusers(theirs, "ddim", generator=torch.Generator().manual_seed(0), **kw)
        got = ours(sampler="ddim", generator=torch.Generator().manual_seed(0), **kw).images
        assert np.abs(got - expect).max() <= 1e-3


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
    assert {m.backend for m in ours.unet.modules() if hasattr(m, "backend")} == {"sdpa"}
    assert np.abs(alt - base).max() <= 1e-4


def test_cpu_conv_prepack_config(pipes):
    """vd.accel.CPUConvPrepack keeps the images and vd.restore puts plain convs back."""
    import torch.nn as nn
    _, _, ours = pipes
    kw = dict(prompt="lower", num_inference_steps=2, height=32, width=32, output_type="np")
    base = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.optimize(ours, vd.accel.CPUConvPrepack())
    fast = ours(generator=torch.Generator().manual_seed(0), **kw).images
    vd.restore(ours)
    assert all(type(m) is nn.Conv2d for m in ours.unet.modules() if isinstance(m, nn.Conv2d))
    assert np.abs(fast - base).max() <= 1e-4
