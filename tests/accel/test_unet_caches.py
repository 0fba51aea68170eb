"""The UNet caches (DeepCache, Faster Diffusion, T-GATE) on the built-in digits model and tiny SD / SDXL UNets:
the partial forwards they run, their schedules (keyed on the plan's step), bit-identity when they never skip, every
sampler, img2img, guided and unguided, state scoped to one call, restore, direct UNet calls, bad input."""
import math

import numpy as np
import pytest
import torch

import velodiff as vd
from velodiff.accel import parse_technique
from velodiff.accel.cache import DeepCache, FasterDiffusion, TGate
from velodiff.accel.cache.deepcache import deepcache_full_steps, quadratic_full_steps
from velodiff.accel.cache.tgate import tgate_actions
from velodiff.models.unet import UNet2DConditionModel
from velodiff.sampling import SAMPLERS

from fixtures import quiet_pipeline

# every sampler that runs on an epsilon-prediction SD schedule (flow_euler needs a flow schedule)
SD_SAMPLERS = sorted(s for s in SAMPLERS if s != "flow_euler")

# caches that never skip anything: bit-identical to no cache
NEVER_SKIP = [DeepCache(interval=1), DeepCache(interval=1, branch=3, schedule="quadratic"),
              FasterDiffusion(interval=1, noise_alpha=0.0), TGate(gate_step=1000, sp_interval=1)]
# caches that skip (small settings, so that a few steps already reuse something)
SKIPPING = [DeepCache(interval=2), DeepCache(interval=3, branch=2), FasterDiffusion(interval=2),
            FasterDiffusion(key_steps=(0, 2), decoder_batch=1), TGate(gate_step=2, sp_interval=2, warm_up=0)]


@pytest.fixture(scope="module")
def pipe():
    return quiet_pipeline("digits")


def generate(pipe, steps=4, sampler="dpmpp_2m", prompts=("a 3", "a 7"), seed=0, **kw):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(list(prompts), num_inference_steps=steps, sampler=sampler, generator=gens, output_type="pt",
                **kw).images


def cached(pipe, config, **kw):
    vd.optimize(pipe, config)
    try:
        return generate(pipe, **kw)
    finally:
        vd.restore(pipe)


def psnr(a, b) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# ------------------------------------------------------------------------------------------------------------------
# the partial forwards
# ------------------------------------------------------------------------------------------------------------------

def tiny_unet(kind):
    """Our UNet with the tiny fixtures' configs (random weights)."""
    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if kind == "sd15":
        cfg = dict(common, cross_attention_dim=32, attention_head_dim=4)
    elif kind == "sdxl":
        cfg = dict(common, cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                   projection_class_embeddings_input_dim=80)
    else:  # three blocks, two layers each: branches inside blocks and at downsamplers
        cfg = dict(block_out_channels=(16, 16, 32), layers_per_block=2, norm_num_groups=8, cross_attention_dim=16,
                   attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    return UNet2DConditionModel(**cfg).eval(), cfg


@pytest.mark.parametrize("kind, size", [("sd15", (8, 8)), ("sdxl", (8, 8)), ("deep", (8, 8)), ("deep", (7, 9))])
def test_partial_forwards_recompose_the_forward(kind, size):
    """For every branch b: the whole forward recording the state entering b's mirror, then the encoder up to b and the
    decoder from b's mirror fed by that state, gives the forward's output bit for bit (odd sizes too)."""
    unet, cfg = tiny_unet(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *size, generator=g)
    ctx = torch.randn(2, 5, cfg["cross_attention_dim"], generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    expected_branches = {"sd15": 4, "sdxl": 4, "deep": 1 + 3 + 3 + 2}[kind]
    assert unet.num_branches == expected_branches
    with torch.no_grad():
        ref = unet(x, torch.tensor(321.0), ctx, added_cond_kwargs=added)
        call = unet.prepare(x, torch.tensor(321.0), ctx, added)
        for b in range(unet.num_branches):
            h, skips = unet.encode(call)
            out, kept = unet.decode(call, unet.mid(call, h), skips, record_branch=b)
            assert torch.equal(out, ref)
            none, partial = unet.encode(call, until_branch=b)
            assert none is None and len(partial) == b + 1
            assert all(torch.equal(p, s) for p, s in zip(partial, skips))
            assert torch.equal(unet.decode(call, kept, partial, start_branch=b)[0], ref)
        with pytest.raises(ValueError, match="until_branch"):
            unet.encode(call, until_branch=unet.num_branches)


# ------------------------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------------------------

def reference_quadratic(total, n, center, power):
    """DeepCache's sample_from_quad_center as the paper's code evaluates it (Python's complex power of a negative
    number), written out independently."""
    while power > 1:
        pts = np.linspace((-center) ** (1 / power), (total - center) ** (1 / power), n + 1)
        vals = np.unique(np.real(pts ** power).astype(np.int32))
        got = [0] + [int(v) + center for v in vals[1:-1]]
        if len(got) == n:
            return got
        power -= 0.02
    return None


def test_deepcache_schedules():
    assert deepcache_full_steps(10, 3) == [0, 3, 6, 9]
    assert deepcache_full_steps(7, 1) == list(range(7))
    # the paper's SD 1.5 setting (interval 5, center 15, power 1.4) at 50 steps
    assert quadratic_full_steps(50, 5, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    for total in (20, 25, 50):
        for interval in (2, 3, 5):
            for center in (5, 10, 15):
                want = reference_quadratic(total, -(-total // interval), center, 1.4)
                assert quadratic_full_steps(total, interval, center, 1.4) == want
    with pytest.raises(ValueError, match="quadratic"):
        quadratic_full_steps(6, 2, 3, 1.4)


def test_tgate_schedule_follows_the_reference():
    acts = [tgate_actions(s, 10, 5, 1, 2) for s in range(14)]
    assert [a[0] for a in acts] == ["compute"] * 9 + ["keep_mean"] + ["reuse"] * 4
    assert [a[1] for a in acts] == (["compute", "compute", "keep", "reuse", "reuse", "keep", "reuse", "reuse", "reuse",
                                     "keep_mean"] + ["keep"] * 4)
    assert [tgate_actions(s, 3, 5, 2, 0)[1] for s in range(3, 7)] == ["reuse", "keep", "reuse", "keep"]


def test_faster_diffusion_keys():
    assert FasterDiffusion().keys(50) == [0, 1, 2, 3, 5, 10, 15, 25, 35]
    assert FasterDiffusion().keys(20) == [0, 1, 2, 3, 5, 10, 15]
    assert FasterDiffusion(interval=4).keys(10) == [0, 4, 8]


def _spy_mid(pipe, monkeypatch):
    """Record (step, call index, batch) of every mid-block run (DeepCache skips the mid block on cached steps)."""
    seen = []
    original = pipe.unet.mid_block.forward

    def spy(x, *args, **kwargs):
        ctx = pipe.denoise_context
        seen.append((ctx.step, ctx.call_index, x.shape[0]))
        return original(x, *args, **kwargs)
    monkeypatch.setattr(pipe.unet.mid_block, "forward", spy)
    return seen


def test_deepcache_runs_full_steps_by_the_plan_step(pipe, monkeypatch):
    seen = _spy_mid(pipe, monkeypatch)
    cached(pipe, DeepCache(interval=3), steps=7, sampler="heun")
    # Heun: 2 evaluations per step but the last; both evaluations of full steps 0, 3, 6 are full
    assert [(s, i) for s, i, _ in seen] == [(0, 0), (0, 1), (3, 6), (3, 7), (6, 12)]
    seen.clear()
    cached(pipe, DeepCache(interval=2), steps=5, image=torch.rand(2, 3, 16, 16), strength=0.8)
    assert [s for s, _, _ in seen] == [0, 2]  # img2img: 4 steps from begin=1, the run's own steps 0 and 2 are full


def test_faster_diffusion_encoder_and_batched_decoder(pipe, monkeypatch):
    encoder, decoder = [], []
    down = pipe.unet.down_blocks[0].forward
    up = pipe.unet.conv_out.forward

    def spy_down(*args, **kwargs):
        encoder.append(pipe.denoise_context.call_index)
        return down(*args, **kwargs)

    def spy_up(x):
        decoder.append((pipe.denoise_context.call_index, x.shape[0]))
        return up(x)
    monkeypatch.setattr(pipe.unet.down_blocks[0], "forward", spy_down)
    monkeypatch.setattr(pipe.unet.conv_out, "forward", spy_up)
    parallel = cached(pipe, FasterDiffusion(key_steps=(0, 3), noise_alpha=0.0), steps=6)
    assert encoder == [0, 3]
    assert decoder == [(0, 3 * 4), (3, 3 * 4)]  # steps 0-2 and 3-5 each decoded in one pass (CFG batch 4)
    encoder.clear(), decoder.clear()
    sequential = cached(pipe, FasterDiffusion(key_steps=(0, 3), noise_alpha=0.0, decoder_batch=1), steps=6)
    assert encoder == [0, 3] and decoder == [(i, 4) for i in range(6)]
    decoder.clear()
    cached(pipe, FasterDiffusion(key_steps=(0, 3), noise_alpha=0.0, decoder_batch=2), steps=6)
    assert decoder == [(0, 8), (2, 4), (3, 8), (5, 4)]
    assert torch.allclose(parallel, sequential, atol=1e-5, rtol=0)
    decoder.clear()
    cached(pipe, FasterDiffusion(key_steps=(0, 3), noise_alpha=0.0), steps=4, sampler="heun")
    # Heun: the key step's first evaluation decodes alone, its last with the non-key evaluations up to step 3
    assert decoder == [(0, 4), (1, 4 * 5), (6, 4)]


def test_faster_diffusion_noise_injection(pipe, monkeypatch):
    """With t/1000 < 0.5 the model sees its input plus 0.003 x the run's first input, at every step's first call."""
    inputs = []
    original = pipe.unet.conv_in.forward

    def spy(sample):
        inputs.append((pipe.denoise_context.timestep, sample[:2].clone()))  # the unconditional half: both are x
        return original(sample)
    monkeypatch.setattr(pipe.unet.conv_in, "forward", spy)
    generate(pipe, steps=6, sampler="ddim")
    plain = list(inputs)
    inputs.clear()
    cached(pipe, FasterDiffusion(interval=1, noise_alpha=0.003), steps=6, sampler="ddim")
    first = next(i for i, (t, _) in enumerate(plain) if t < 500)
    assert first > 0 and all(torch.equal(a[1], b[1]) for a, b in zip(plain[:first], inputs[:first]))
    moved = inputs[first][1] - plain[first][1]
    assert torch.allclose(moved, 0.003 * plain[0][1], atol=1e-6)


def test_state_hooks_move_the_state(pipe):
    """A state hook's offset reaches the model and the sampler state (DDIM with a zero model: the state only scales,
    so the offset added before call 2 comes out scaled like the state); callbacks keep unmoved copies."""
    plan = pipe.make_plan("ddim", 5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    d = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def model_fn(x_in, t):
        seen.append(x_in.clone())
        return torch.zeros_like(x_in)

    def run(hook):
        states = []
        if hook is not None:
            pipe.state_hooks.append(hook)
        try:
            out = pipe.run_denoising(plan, model_fn, x.clone(), None, None,
                                     callback=lambda i, call, state: states.append(state))
        finally:
            pipe.state_hooks.clear()
        return out, states
    plain, plain_states = run(None)
    inputs = list(seen)
    seen.clear()
    moved, states = run(lambda ctx, x_in: d if ctx.call_index == 2 else None)
    assert torch.equal(states[1], plain_states[1])  # the state after call 1, as handed to the callback, is unmoved
    assert torch.allclose(seen[2], inputs[2] + d)
    # moved - plain cancels states of size ~30 in fp32: an absolute error of a few 1e-6
    assert torch.allclose(moved - plain, plain / inputs[2] * d, rtol=1e-5, atol=2e-5)


def test_tgate_drops_guidance_after_the_gate(pipe, monkeypatch):
    seen = _spy_mid(pipe, monkeypatch)
    out = cached(pipe, TGate(gate_step=2), steps=5)
    assert [b for _, _, b in seen] == [4, 4, 2, 2, 2]  # CFG batch of 2 images, then the conditional half
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------------
# every sampler, bit-identity, state per call, restore
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SD_SAMPLERS)
def test_never_skipping_is_bit_identical_for_every_sampler(pipe, sampler):
    ref = generate(pipe, sampler=sampler)
    for config in NEVER_SKIP:
        assert torch.equal(cached(pipe, config, sampler=sampler), ref), config


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_3m", "unipc", "euler_a", "dpm_solver_2", "dpm_solver_3", "ddim"])
def test_skipping_caches_work_with_every_sampler(pipe, sampler):
    ref = generate(pipe, steps=6, sampler=sampler)
    for config in SKIPPING:
        out = cached(pipe, config, steps=6, sampler=sampler)
        assert torch.isfinite(out).all() and not torch.equal(out, ref), config
        assert psnr(out, ref) > 12, (config, psnr(out, ref))


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_img2img_guided_and_unguided(pipe, guidance):
    image = torch.rand(2, 3, 16, 16)
    kw = dict(steps=8, image=image, strength=0.6, guidance_scale=guidance)
    ref = generate(pipe, **kw)
    for config in NEVER_SKIP:
        assert torch.equal(cached(pipe, config, **kw), ref), config
    for config in SKIPPING:
        out = cached(pipe, config, **kw)
        assert torch.isfinite(out).all() and psnr(out, ref) > 15, config


def test_two_calls_in_a_row_equal_two_fresh_calls(pipe):
    for config in SKIPPING + [DeepCache(interval=3, schedule="quadratic", center=2)]:
        vd.optimize(pipe, config)
        first = generate(pipe, steps=7, sampler="heun", prompts=("a 1",))
        second = generate(pipe, steps=5, prompts=("a 2", "a 5"), seed=3)
        vd.restore(pipe)
        vd.optimize(pipe, config)
        fresh = generate(pipe, steps=5, prompts=("a 2", "a 5"), seed=3)
        vd.restore(pipe)
        vd.optimize(pipe, config)
        again = generate(pipe, steps=7, sampler="heun", prompts=("a 1",))
        vd.restore(pipe)
        assert torch.equal(second, fresh) and torch.equal(first, again), config


def test_restore_and_direct_unet_calls_are_uncached(pipe):
    ref = generate(pipe)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 64, generator=g)
    with torch.no_grad():
        direct = pipe.unet(x, torch.tensor(500.0), ctx)
    for config in SKIPPING:
        vd.optimize(pipe, config)
        assert "forward" in vars(pipe.unet)
        with torch.no_grad():
            assert torch.equal(pipe.unet(x, torch.tensor(500.0), ctx), direct), config
        vd.restore(pipe)
        assert "forward" not in vars(pipe.unet) and not pipe.state_hooks
        assert torch.equal(generate(pipe), ref), config


def test_tiny_sd_and_sdxl_pipelines(tmp_path):
    from fixtures import saved_and_loaded, tiny_sd_pipeline
    for kind in ("sd15", "sdxl"):
        _, ours, _ = saved_and_loaded(tiny_sd_pipeline(kind), str(tmp_path / kind))
        kw = dict(num_inference_steps=5, guidance_scale=5.0, output_type="pt", height=32, width=32)
        ref = ours(["low", "lowest"], generator=torch.Generator().manual_seed(0), **kw).images
        for config in NEVER_SKIP + SKIPPING:
            vd.optimize(ours, config)
            out = ours(["low", "lowest"], generator=torch.Generator().manual_seed(0), **kw).images
            vd.restore(ours)
            assert torch.isfinite(out).all()
            assert torch.equal(out, ref) == (config in NEVER_SKIP), (kind, config)


# ------------------------------------------------------------------------------------------------------------------
# bad input, fit, names
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: DeepCache(interval=0), "interval"), (lambda: DeepCache(interval=-2), "interval"),
    (lambda: DeepCache(interval=2.5), "interval"), (lambda: DeepCache(branch=-1), "branch"),
    (lambda: DeepCache(schedule="cubic"), "schedule"), (lambda: DeepCache(power=float("nan")), "power"),
    (lambda: DeepCache(power=1.0), "power"), (lambda: DeepCache(center=-1), "center"),
    (lambda: FasterDiffusion(interval=-1), "interval"), (lambda: FasterDiffusion(key_steps=(2, 5)), "key_steps"),
    (lambda: FasterDiffusion(key_steps=(0, -3)), "key_steps"), (lambda: FasterDiffusion(noise_alpha=-0.1), "noise_alpha"),
    (lambda: FasterDiffusion(noise_alpha=float("nan")), "noise_alpha"),
    (lambda: FasterDiffusion(noise_tau=float("inf")), "noise_tau"),
    (lambda: FasterDiffusion(decoder_batch=-1), "decoder_batch"),
    (lambda: TGate(gate_step=0), "gate_step"), (lambda: TGate(sp_interval=0), "sp_interval"),
    (lambda: TGate(fi_interval=-1), "fi_interval"), (lambda: TGate(warm_up=-1), "warm_up"),
])
def test_bad_fields_are_named(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_fit_and_names(pipe):
    with pytest.raises(ValueError, match=r"branch 12 does not exist: this UNet has branches 0\.\.3"):
        vd.optimize(pipe, DeepCache(branch=12))
    assert not pipe._applied and "forward" not in vars(pipe.unet)
    assert parse_technique("deepcache:interval=5,branch=1,schedule=quadratic") == DeepCache(5, 1, "quadratic")
    assert parse_technique("faster_diffusion:key_steps=0/4/8,decoder_batch=1") == \
        FasterDiffusion(key_steps=(0, 4, 8), decoder_batch=1)
    assert parse_technique("tgate:gate_step=5") == TGate(gate_step=5)
    assert FasterDiffusion(key_steps=[0, 4]) == FasterDiffusion(key_steps=(0, 4))
    with pytest.raises(ValueError, match="interval"):
        parse_technique("deepcache:interval=0")
    dit = vd.Pipeline.from_pretrained("digits-dit")
    with pytest.raises(ValueError, match="caches a UNet"):
        vd.optimize(dit, TGate())
    vd.optimize(pipe, DeepCache())
    try:
        with pytest.raises(ValueError, match="both cache techniques"):
            vd.optimize(pipe, TGate())
    finally:
        vd.restore(pipe)
