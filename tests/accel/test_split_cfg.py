"""Split classifier-free guidance (``vd.accel.SplitCFG``: two denoiser calls per guided evaluation) and the caches
under it: the images are the batched ones up to float rounding, each CFG branch keeps its own cache state (so a
schedule-driven cache gives the batched cache's images), a cache that never skips is bit-identical to the split
run without it, threshold caches decide per branch, and T-GATE skips the unconditional call after its gate."""
import torch
import pytest

import velodiff as vd
from velodiff.accel import SplitCFG, parse_technique
from velodiff.accel.cache import (DBCache, DeepCache, FasterDiffusion, FBCache, TaylorSeer, TeaCache, TGate,
                                  dit_hooks)

from fixtures import quiet_pipeline, saved_and_loaded, tiny_pixart_pipeline

# split vs batched differ by fp32 rounding only (GEMMs of another batch size, carried through a few steps): the
# largest max-abs differences seen are 3.1e-6 on digits' [0, 1] images, and 5e-6 (plain) to 3e-5 (TaylorSeer's
# order-2 extrapolation amplifies it) of the largest |latent| on digits-dit; the bounds leave ~3x, and stay far
# below what a cache that mixed the two branches' state would move (> 1e-2)
IMAGE_TOL = 1e-5
LATENT_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


@pytest.fixture(scope="module")
def dit():
    return quiet_pipeline("digits-dit")


def sd_images(pipe, steps=6, sampler="dpmpp_2m", **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(["a 3", "a 7"], num_inference_steps=steps, sampler=sampler, generator=gens, output_type="pt",
                **kw).images


def dit_latents(pipe, steps=6, sampler="dpmpp_2m"):
    return pipe(class_labels=[1, 7], num_inference_steps=steps, sampler=sampler,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def with_techniques(pipe, configs, fn):
    vd.optimize(pipe, *configs)
    try:
        return fn()
    finally:
        vd.restore(pipe)


def count_calls(module):
    """A list that gets each forward's batch size while the returned handle is registered."""
    sizes = []
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(int(args[0].shape[0])),
                                              with_kwargs=True)
    return sizes, handle


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def rel_diff(a, b) -> float:
    """max |a - b| over max |b| (latents)."""
    return max_diff(a, b) / float(b.abs().max())


def test_split_cfg_gives_the_batched_images_with_two_calls(digits, dit):
    for pipe, run, denoiser in ((digits, sd_images, "unet"), (dit, dit_latents, "transformer")):
        batched = run(pipe)
        sizes, handle = count_calls(getattr(pipe, denoiser))
        seen = []

        def grab(i, call, state):
            seen.append(pipe.denoise_context.cfg)
        try:
            split = with_techniques(pipe, [SplitCFG()], lambda: run(pipe))
            vd.optimize(pipe, SplitCFG())
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            if denoiser == "unet":
                pipe(["a 3", "a 7"], num_inference_steps=2, generator=gens, callback=grab, output_type="latent")
            else:
                pipe(class_labels=[1, 7], num_inference_steps=2, callback=grab, output_type="latent")
            vd.restore(pipe)
        finally:
            handle.remove()
        assert pipe.cfg_mode == "batched"
        if denoiser == "unet":
            assert max_diff(split, batched) < IMAGE_TOL
        else:
            assert rel_diff(split, batched) < LATENT_REL_TOL
        assert set(sizes[:12]) == {2}, sizes  # two calls of the two images each, never the batch of four
        assert seen == ["split", "split"]


def test_split_cfg_on_pixart(tmp_path):
    pipe = saved_and_loaded(tiny_pixart_pipeline(), str(tmp_path))[1]
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(["a red fox", "a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="latent").images
    batched = run()
    split = with_techniques(pipe, [SplitCFG()], run)
    assert rel_diff(split, batched) < LATENT_REL_TOL


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "euler_a", "unipc"])
def test_caches_that_never_skip_are_bit_identical_under_split_cfg(digits, dit, sampler):
    split = with_techniques(digits, [SplitCFG()], lambda: sd_images(digits, sampler=sampler))
    for config in (DeepCache(interval=1), FasterDiffusion(interval=1, noise_alpha=0.0),
                   TGate(gate_step=1000, sp_interval=1)):
        got = with_techniques(digits, [SplitCFG(), config], lambda: sd_images(digits, sampler=sampler))
        assert torch.equal(got, split), config
    split = with_techniques(dit, [SplitCFG()], lambda: dit_latents(dit, sampler=sampler))
    for config in (FBCache(0.0), TeaCache(0.0), DBCache(0.0, fn_compute_blocks=2, bn_compute_blocks=1),
                   TaylorSeer(interval=1)):
        got = with_techniques(dit, [SplitCFG(), config], lambda: dit_latents(dit, sampler=sampler))
        assert torch.equal(got, split), config


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_schedule_caches_keep_one_state_per_branch(digits, dit, sampler):
    """A cache whose decisions follow a schedule gives the batched cache's images under split CFG only when each
    branch reuses its own features; sharing them moves the images by > 1e-2."""
    for config in (DeepCache(interval=2), DeepCache(interval=3, branch=2), FasterDiffusion(interval=2),
                   FasterDiffusion(key_steps=(0, 2), decoder_batch=1), TGate(gate_step=2, sp_interval=2, warm_up=0)):
        batched = with_techniques(digits, [config], lambda: sd_images(digits, sampler=sampler))
        split = with_techniques(digits, [SplitCFG(), config], lambda: sd_images(digits, sampler=sampler))
        plain = sd_images(digits, sampler=sampler)
        assert max_diff(split, batched) < IMAGE_TOL, (config, max_diff(split, batched))
        assert max_diff(batched, plain) > 1e-2, config  # the cache did reuse something
    for config in (TaylorSeer(order=2, interval=3, warmup_steps=1), TaylorSeer(order=1, interval=2)):
        batched = with_techniques(dit, [config], lambda: dit_latents(dit, sampler=sampler))
        split = with_techniques(dit, [SplitCFG(), config], lambda: dit_latents(dit, sampler=sampler))
        assert rel_diff(split, batched) < LATENT_REL_TOL, (config, rel_diff(split, batched))
        assert rel_diff(batched, dit_latents(dit, sampler=sampler)) > 1e-2, config


def test_threshold_caches_decide_per_branch(dit):
    for config in (FBCache(0.3), TeaCache(0.3), DBCache(0.3, fn_compute_blocks=2, bn_compute_blocks=1)):
        vd.optimize(dit, SplitCFG(), config)
        try:
            with dit_hooks.trace(dit) as log:
                first = dit_latents(dit, steps=12)
            again = dit_latents(dit, steps=12)
        finally:
            vd.restore(dit)
        assert torch.isfinite(first).all() and torch.equal(first, again), config  # no state left between calls
        assert [e.branch for e in log] == ["cond", "uncond"] * 12, config
        assert [e.call_index for e in log] == [i // 2 for i in range(24)]
        assert any(not e.computed for e in log), config
        # each branch gates against its own stored probe: the two distances of a step differ
        pairs = [(log[i].distance, log[i + 1].distance) for i in range(2, 24, 2)]
        assert any(a != b for a, b in pairs), config


def test_tgate_skips_the_unconditional_call_after_the_gate(digits):
    sizes, handle = count_calls(digits.unet)
    try:
        with_techniques(digits, [SplitCFG(), TGate(gate_step=3)], lambda: sd_images(digits, steps=6))
    finally:
        handle.remove()
    # the dispatcher sits on forward: steps 0-2 call it twice (the unconditional call is answered without the UNet
    # after the gate, but still reaches the dispatcher), so count the UNet's real work through its prepare instead
    assert len(sizes) == 12 and set(sizes) == {2}
    prepared = []
    original = digits.unet.prepare

    def spy(*args, **kwargs):
        prepared.append(digits.denoise_context.step)
        return original(*args, **kwargs)
    digits.unet.prepare = spy
    try:
        with_techniques(digits, [SplitCFG(), TGate(gate_step=3)], lambda: sd_images(digits, steps=6))
    finally:
        del digits.unet.prepare
    assert prepared == [0, 0, 1, 1, 2, 2, 3, 4, 5]


def test_split_cfg_by_name():
    assert parse_technique("split_cfg") == SplitCFG()
