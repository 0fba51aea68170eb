"""velodiff's DiT and PixArt pipelines against diffusers' on tiny random-weight components."""
import os

import numpy as np
import pytest
import torch

import velodiff as vd
from fixtures import save_pipeline, saved_and_loaded, tiny_dit_pipeline, tiny_pixart_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Max-abs difference allowed between velodiff's and diffusers' [0, 1] images: fp32 on both sides (u = 6e-8), so
# rounding alone. Measured over generator seeds 0-5 and every case below: DiT at most 5.4e-7 (median 2.9e-7; 36
# runs), PixArt at most 4.2e-7 (24 runs). The bound is ~2x the largest; it catches c_d (the sampler's coefficient
# of the model output) off by a relative 1e-4 (>= 1.07e-5) and, at guidance 4, the scale of the first DiT attention
# layer off by 1e-4 (1.5e-6).
IMAGE_TOL = 1e-6
DETERMINISTIC = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                 "unipc": "UniPCMultistepScheduler"}


def with_scheduler(pipe, sampler, folder):
    """The sampler's diffusers scheduler read from the saved folder, as velodiff reads it."""
    import diffusers
    pipe.scheduler = getattr(diffusers, DETERMINISTIC[sampler]).from_pretrained(folder, subfolder="scheduler")
    return pipe


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return saved_and_loaded(tiny_dit_pipeline(), str(tmp_path_factory.mktemp("dit")))


@pytest.mark.parametrize("sampler", list(DETERMINISTIC))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_matches_diffusers(dit, sampler, guidance):
    # diffusers' DiT loop steps the duplicated [cond; uncond] batch, so stochastic samplers draw twice the noise;
    # deterministic samplers give the same images.
    theirs, ours, folder = dit
    kw = dict(num_inference_steps=4, guidance_scale=guidance, output_type="np")
    expect = with_scheduler(theirs, sampler, folder)([3, 999, 0], generator=torch.Generator().manual_seed(1), **kw).images
    got = ours([3, 999, 0], sampler=sampler, generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(got - expect).max() <= IMAGE_TOL


def test_dit_bad_labels(dit):
    _, ours, _ = dit
    with pytest.raises(ValueError, match="class_labels"):
        ours([1000])
    with pytest.raises(ValueError, match="class_labels"):
        ours([])


@pytest.mark.parametrize("sigma", [False, True])
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_pixart_matches_diffusers(tmp_path, sigma, sampler):
    theirs = tiny_pixart_pipeline(sigma)
    folder = save_pipeline(theirs, str(tmp_path))
    ours = vd.Pipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=4.5, height=32, width=48, output_type="np",
              max_sequence_length=16, negative_prompt="the cat")
    expect = with_scheduler(theirs, sampler, folder)(["a red fox", "wider"], generator=torch.Generator().manual_seed(2),
                                             use_resolution_binning=False, clean_caption=False, **kw).images
    got = ours(["a red fox", "wider"], sampler=sampler, generator=torch.Generator().manual_seed(2), **kw).images
    assert got.shape == expect.shape
    assert np.abs(got - expect).max() <= IMAGE_TOL
