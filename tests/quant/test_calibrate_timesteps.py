"""Timestep-aware calibration (velodiff.quant.calibrate): which steps' inputs the calibration sample holds."""
import math

import pytest
import torch

import velodiff as vd
from velodiff.quant import QuantConfig, select_layers
from velodiff.quant.calibrate import _Steps, calibrate


def _pipe():
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs_per_step(pipe, name, steps, prompts, images):
    """The layer's input rows at every model call, grouped by step index (an independent hook)."""
    layer = pipe.unet.get_submodule(name)
    calls = []
    handle = layer.register_forward_pre_hook(lambda m, a: calls.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    try:
        for start in range(0, images, 8):
            count = min(8, images - start)
            pipe([prompts[(start + i) % len(prompts)] for i in range(count)], num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(1 + start), output_type="latent")
    finally:
        handle.remove()
    return {i: torch.cat(calls[i::steps]) for i in range(steps)}


def test_qdiffusion_keeps_uniformly_spaced_steps_only():
    pipe = _pipe()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    layers = {name: pipe.unet.get_submodule(name)}
    prompts = ["a handwritten 1", "a handwritten 7"]
    stats = calibrate(pipe, layers, prompts, images=2, steps=6, rows=10 ** 6, timesteps="qdiffusion")
    per_step = _inputs_per_step(pipe, name, 6, prompts, 2)
    kept = sorted(_Steps("qdiffusion", 6, 1000).kept)
    assert kept == [0, 2, 5]  # three of six, uniformly spaced, first and last included
    want = torch.cat([per_step[i] for i in kept]).float()
    assert torch.equal(stats[name].absmax, want.abs().amax(0))
    assert stats[name].sample.shape[0] == want.shape[0]  # every row of the kept steps, none of the others
    everything = calibrate(pipe, layers, prompts, images=2, steps=6, rows=10 ** 6, timesteps="all")
    assert everything[name].sample.shape[0] == sum(v.shape[0] for v in per_step.values())


def test_ptq4dm_weights_follow_the_normal_density():
    steps = _Steps("ptq4dm", 20, 1000)
    for t, want in ((400, 1.0), (1000, math.exp(-0.5 * 1.5 ** 2)), (0, math.exp(-0.5))):
        steps(None, (None, torch.tensor([float(t)])), {})
        assert steps.weight() == pytest.approx(want)
    assert _Steps("all", 20, 1000).weight() == 1.0


def test_ptq4dm_sample_leans_to_the_late_steps():
    """With a small reservoir, PTQ4DM's weights keep more rows from the less noisy steps than uniform sampling."""
    pipe = _pipe()
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    layers = {name: pipe.unet.get_submodule(name)}
    prompts = ["a handwritten 2"]
    per_step = _inputs_per_step(pipe, name, 10, prompts, 1)
    late = torch.cat([per_step[i] for i in range(5, 10)]).float()

    def late_share(mode):
        sample = calibrate(pipe, layers, prompts, images=1, steps=10, rows=64, timesteps=mode)[name].sample
        return sum(bool((late == r).all(1).any()) for r in sample) / sample.shape[0]
    assert late_share("ptq4dm") > late_share("all")


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="calibration_timesteps"):
        QuantConfig("svdquant", calibration_timesteps="uniform")
    pipe = _pipe()
    with pytest.raises(ValueError, match="timesteps must be one of"):
        calibrate(pipe, select_layers(pipe.unet), ["a"], images=1, steps=2, timesteps="bad")


def test_nan_in_calibration_data_is_a_clear_error():
    """A model whose activations turn NaN during calibration (here a poisoned norm weight) gets a ValueError that
    names a layer, not a silently NaN quantizer."""
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.down_blocks[0].attentions[0].norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="hold NaN or inf"):
        vd.quant.quantize(pipe, QuantConfig("svdquant", rank=4, calibration_images=1, calibration_steps=2),
                          progress=False)
