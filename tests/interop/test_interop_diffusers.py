"""velodiff.interop against diffusers on the tiny random-weight pipelines of tests/fixtures.py (nothing downloaded).

Oracles from outside velodiff: diffusers' own pipelines and schedulers on the same weights and seed, and the
storage of the diffusers modules themselves (``data_ptr``). Inside velodiff only for the scheduler's call-by-call
replay, whose oracle is :func:`velodiff.sampling.run_plan` (the loop it must reproduce exactly).
"""
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import velodiff.pipelines as vp  # noqa: E402
from velodiff.interop import DiffusersScheduler, from_diffusers, to_diffusers  # noqa: E402
from velodiff.loading.keymap_text import fit_clip_keys  # noqa: E402
from velodiff.pipelines.scheduling import make_plan  # noqa: E402
from velodiff.sampling import SAMPLERS, run_plan  # noqa: E402
from fixtures import save_pipeline, tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sd_pipeline  # noqa: E402

diffusers = pytest.importorskip("diffusers")
# the fixtures' 23-token vocabulary spells the prompts' words letter by letter, which velodiff's pipelines point out
pytestmark = pytest.mark.filterwarnings("ignore::velodiff.pipelines.base.PromptWarning")

# Max-abs difference between a velodiff and a diffusers [0, 1] image, both fp32 (u = 2^-24 = 6e-8) through the text
# encoder(s), 4 denoiser steps and the VAE decoder, with the models of the two libraries (sums ordered differently):
# rounding alone. Measured over generator seeds 0-5 for every such case below (from_diffusers, DiffusersScheduler in
# diffusers' pipeline against velodiff's pipeline, to_diffusers of a loaded folder): at most 2.6e-6 (sd2, euler_a).
# The bound is ~2x that, the bound of tests/pipelines/test_stable_diffusion.py, which c_d (the sampler's coefficient
# of the model output) off by a relative 1e-4 exceeds 3x or more (1.7e-5 .. 9.9e-5, measured there).
IMAGE_TOL = 5e-6
# Image-to-image (VAE encoder too, 5-step schedules started part-way): measured at most 1.6e-6 over seeds 0-5 and
# the six cases below (2.5e-6 over the same samplers on sd2 too). The bound of tests/pipelines/test_img2img.py (2x its
# largest observed, 3.0e-6), where c_d off by a relative 1e-4 gives 2.0e-5 or more for these multi-step cases.
IMG2IMG_TOL = 6e-6
# DiffusersScheduler against diffusers' own scheduler class inside the same diffusers pipeline (same UNet, VAE and
# text encoder): only the sampler arithmetic differs (velodiff's float64 coefficients and one fused fp32 update,
# diffusers' fp32 steps). Measured at most 1.7e-6 (seeds 0-5, euler_a; the others 5e-7 .. 1.4e-6); bound ~2x.
OWN_SCHEDULER_TOL = 4e-6
# DiT / PixArt: fp32, 3-4 steps of tiny transformers; measured at most 3.6e-7 (DiT) and 6.0e-7 (PixArt) over seeds
# 0-5; the bound of tests/pipelines/test_dit_pixart.py.
TRANSFORMER_TOL = 1e-6
# add_noise against diffusers' own add_noise at the same point: both fp32 from float64 schedule values, rounded in
# another order; measured at most 4.6e-7 of the largest value (about 4 ulp; euler / heun); bound 2x. A wrong point
# (one step off) is off by 10 % or more.
ADD_NOISE_RTOL = 1e-6

KINDS = ("sd15", "sd2", "sdxl")
PROMPT = dict(prompt=["lower newer", "wider"], num_inference_steps=4, guidance_scale=6.0, height=32, width=32,
              output_type="np")
SEED = 3
# velodiff sampler -> diffusers' scheduler class of the same method
OWN_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
                  "euler_a": "EulerAncestralDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                  "unipc": "UniPCMultistepScheduler", "heun": "HeunDiscreteScheduler"}
# the tiny pipelines' scheduler config (DDIMScheduler, leading spacing, steps_offset 1), as a saved folder has it
DDIM_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
               "prediction_type": "epsilon", "timestep_spacing": "leading"}


def evaluated(pipe):
    """``pipe`` with every torch module in eval mode (diffusers' VAE decodes ~3e-7 differently in training mode, in
    which the fixtures leave it) and no progress bar."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def all_pipes():
    """{kind: (diffusers' pipeline, velodiff's pipeline from from_diffusers)}."""
    out = {}
    for kind in KINDS:
        theirs = evaluated(tiny_sd_pipeline(kind))
        ours = from_diffusers(theirs)
        ours.set_progress_bar_config(disable=True)
        out[kind] = (theirs, ours)
    return out


def images(pipe, **kwargs) -> np.ndarray:
    """[2, 32, 32, 3] images in [0, 1] of :data:`PROMPT` from the generator seeded with :data:`SEED`."""
    return pipe(generator=torch.Generator().manual_seed(SEED), **{**PROMPT, **kwargs}).images


def with_scheduler(pipe, scheduler):
    """The same diffusers pipeline object with another scheduler (the fixtures' pipelines are shared: callers put
    the original back)."""
    pipe.scheduler = scheduler
    return pipe


def assert_shares(source, copy) -> None:
    """Every state-dict tensor of ``copy`` is the one of ``source`` with the same name (CLIP names matched up to
    transformers' ``text_model.`` prefix): same storage pointer, shape and dtype."""
    ours = copy.state_dict()
    theirs = fit_clip_keys(source.state_dict(), copy) if "CLIP" in type(copy).__name__ else source.state_dict()
    assert theirs.keys() == ours.keys()
    for name, tensor in ours.items():
        assert tensor.data_ptr() == theirs[name].data_ptr(), name
        assert tensor.shape == theirs[name].shape and tensor.dtype == theirs[name].dtype, name
    assert len(list(copy.parameters())) == len(list(source.parameters()))


def modules_of(kind: str):
    return ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind == "sdxl" else ())


# --- from_diffusers / to_diffusers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_from_diffusers_shares_weights_and_matches_diffusers(all_pipes, kind):
    theirs, ours = all_pipes[kind]
    expected = vp.StableDiffusionXLPipeline if kind == "sdxl" else vp.StableDiffusionPipeline
    assert type(ours) is expected
    for name in modules_of(kind):
        assert type(getattr(ours, name)).__module__.startswith("velodiff.models")
        assert_shares(getattr(theirs, name), getattr(ours, name))
    assert ours.tokenizer is theirs.tokenizer and ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert ours.scheduler_config["_class_name"] == "DDIMScheduler"  # so velodiff's default sampler is ddim
    err = np.abs(images(ours) - images(theirs)).max()  # diffusers runs its own DDIMScheduler
    assert err <= IMAGE_TOL, f"{kind}: {err}"


@pytest.mark.parametrize("kind", KINDS)
def test_to_diffusers_round_trip_is_the_same_pipeline(all_pipes, kind):
    theirs, ours = all_pipes[kind]
    back = evaluated(to_diffusers(ours))
    assert type(back) is type(theirs)
    for name in modules_of(kind):
        assert type(getattr(back, name)) is type(getattr(theirs, name))
        assert_shares(getattr(ours, name), getattr(back, name))
        assert_shares(getattr(theirs, name), getattr(back, name))
    assert type(back.scheduler) is diffusers.DDIMScheduler
    # the same diffusers classes over the same tensors with the same scheduler: the same operations, bit for bit
    assert np.array_equal(images(back), images(theirs))


def test_to_diffusers_of_a_loaded_folder(tmp_path):
    """A pipeline from Pipeline.from_pretrained (channels-last packed UNet, velodiff's own CLIP tokenizer) maps too:
    transformers' tokenizer from the same folder, diffusers' modules over velodiff's tensors."""
    import transformers
    import velodiff as vd

    theirs = evaluated(tiny_sd_pipeline("sd15"))
    ours = vd.Pipeline.from_pretrained(save_pipeline(theirs, str(tmp_path)))
    assert type(ours.tokenizer).__module__.startswith("velodiff.")  # the path under test
    back = evaluated(to_diffusers(ours))
    for name in modules_of("sd15"):
        assert_shares(getattr(ours, name), getattr(back, name))
    assert isinstance(back.tokenizer, transformers.PreTrainedTokenizerBase)
    err = np.abs(images(back) - images(theirs)).max()
    assert err <= IMAGE_TOL, err


def test_dit_and_pixart_from_diffusers():
    dit = evaluated(tiny_dit_pipeline())
    ours = from_diffusers(dit)
    assert type(ours) is vp.DiTPipeline
    assert_shares(dit.transformer, ours.transformer)
    assert_shares(dit.vae, ours.vae)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    expect = dit([3, 999, 0], generator=torch.Generator().manual_seed(1), **kw).images
    got = ours([3, 999, 0], sampler="ddim", generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(got - expect).max() <= TRANSFORMER_TOL
    with pytest.raises(TypeError, match="StableDiffusionPipeline"):
        to_diffusers(ours)

    pixart = evaluated(tiny_pixart_pipeline())
    ours = from_diffusers(pixart)
    assert type(ours) is vp.PixArtPipeline and ours.text_encoder is pixart.text_encoder  # T5: transformers' own
    assert_shares(pixart.transformer, ours.transformer)
    kw = dict(num_inference_steps=3, guidance_scale=4.5, height=32, width=48, output_type="np",
              max_sequence_length=16, negative_prompt="the cat")
    expect = pixart(["a red fox", "wider"], generator=torch.Generator().manual_seed(2), use_resolution_binning=False,
                    clean_caption=False, **kw).images
    got = ours(["a red fox", "wider"], sampler="ddim", generator=torch.Generator().manual_seed(2), **kw).images
    assert np.abs(got - expect).max() <= TRANSFORMER_TOL


def test_from_diffusers_follows_dtype_and_scheduler():
    """dtype and device are the diffusers modules' (bf16 here); a DiffusersScheduler's schedule becomes the
    pipeline's scheduler config."""
    theirs = tiny_sd_pipeline("sdxl").to(torch.bfloat16)
    theirs.scheduler = DiffusersScheduler("heun", theirs.scheduler)
    ours = from_diffusers(theirs)
    assert ours.dtype == torch.bfloat16 and ours.unet.dtype == torch.bfloat16
    for name in modules_of("sdxl"):
        assert_shares(getattr(theirs, name), getattr(ours, name))
    assert ours.scheduler_config == theirs.scheduler.schedule_config
    assert ours.scheduler_config["_class_name"] == "DDIMScheduler"


def test_unsupported_pipelines_raise_type_error(all_pipes):
    theirs, ours = all_pipes["sd15"]
    with pytest.raises(TypeError, match="supported diffusers pipelines: StableDiffusionPipeline"):
        from_diffusers(diffusers.StableDiffusionImg2ImgPipeline(**theirs.components))
    with pytest.raises(TypeError, match="supported"):
        from_diffusers(object())
    with pytest.raises(TypeError, match="velodiff pipeline already"):
        from_diffusers(ours)
    with pytest.raises(TypeError, match="to_diffusers maps"):
        to_diffusers(theirs)
    wide = tiny_sd_pipeline("sd15")
    wide.unet.to(torch.float64)
    with pytest.raises(ValueError, match="float64"):
        from_diffusers(wide)


# --- DiffusersScheduler -----------------------------------------------------------------------------------------------

def _analytic_model(x: torch.Tensor, t) -> torch.Tensor:
    """A cheap deterministic stand-in for a denoiser: depends on the input and the timestep, which it reads in fp32
    as the UNets do (run_plan hands over the float64 value, diffusers' loop an entry of the fp32 timesteps)."""
    t = float(torch.tensor(float(t), dtype=torch.float32))
    return torch.tanh(0.7 * x) + 0.01 * math.sin(t / 100.0)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_scheduler_replays_run_plan_call_by_call(sampler):
    """diffusers' loop (scale_model_input, model, step) over DiffusersScheduler gives run_plan's result bit for bit:
    the same fused update with the same rows, history, anchor and noise draws (tolerance 0)."""
    config = ({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
               "prediction_type": "flow"} if sampler == "flow_euler" else DDIM_CONFIG)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plan = make_plan(sampler, config, 5)[1]
    expect = run_plan(plan, _analytic_model, x0 * plan.init_noise_scale, generator=torch.Generator().manual_seed(7))
    scheduler = DiffusersScheduler(sampler, config)
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == len(plan.calls)
    latents, generator = x0 * scheduler.init_noise_sigma, torch.Generator().manual_seed(7)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(_analytic_model(model_in, t), t, latents, generator=generator).prev_sample
    assert torch.equal(latents, expect)


# (kind, sampler): every listed sampler on SD 1.5, the multi-call, stochastic and third-order ones on SD2 and SDXL
VELODIFF_CASES = [("sd15", s) for s in ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_3m_exact", "heun", "unipc",
                                        "dpmpp_2m_sde", "lcm")] + \
                 [(k, s) for k in ("sd2", "sdxl") for s in ("euler_a", "heun", "dpmpp_3m_exact")]


@pytest.mark.parametrize("kind,sampler", VELODIFF_CASES)
def test_diffusers_pipeline_with_velodiff_sampler_matches_velodiff(all_pipes, kind, sampler):
    theirs, ours = all_pipes[kind]
    original = theirs.scheduler
    try:
        expect = images(with_scheduler(theirs, DiffusersScheduler(sampler, original)))
    finally:
        theirs.scheduler = original
    got = images(ours, sampler=sampler)
    err = np.abs(got - expect).max()
    assert err <= IMAGE_TOL, f"{kind}/{sampler}: {err}"


@pytest.mark.parametrize("sampler", sorted(OWN_SCHEDULERS))
def test_velodiff_sampler_equals_diffusers_own_scheduler(all_pipes, sampler):
    theirs, _ = all_pipes["sd15"]
    original = theirs.scheduler
    config = {k: v for k, v in dict(original.config).items() if k != "_use_default_values"}  # as saved
    try:
        got = images(with_scheduler(theirs, DiffusersScheduler(sampler, original)))
        expect = images(with_scheduler(theirs, getattr(diffusers, OWN_SCHEDULERS[sampler]).from_config(config)))
    finally:
        theirs.scheduler = original
    err = np.abs(got - expect).max()
    assert err <= OWN_SCHEDULER_TOL, f"{sampler}: {err}"


@pytest.mark.parametrize("kind,sampler,strength", [
    ("sd15", "ddim", 0.6), ("sd15", "euler", 0.75), ("sd15", "heun", 0.6), ("sd15", "dpmpp_3m_exact", 0.5),
    ("sd15", "euler_a", 1.0), ("sdxl", "heun", 0.6)])
def test_img2img_pipeline_with_velodiff_sampler_matches_velodiff(all_pipes, kind, sampler, strength):
    """diffusers' Img2Img pipelines slice scheduler.timesteps at t_start * order, call set_begin_index and
    add_noise: the run equals velodiff's image-to-image from the same point."""
    from PIL import Image
    theirs, ours = all_pipes[kind]
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if kind == "sdxl" else diffusers.StableDiffusionImg2ImgPipeline
    img2img = evaluated(cls(**{**theirs.components, "scheduler": DiffusersScheduler(sampler, theirs.scheduler)}))
    rng = np.random.default_rng(0)
    image = [Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    kw = dict(prompt=["lower newer", "wider"], num_inference_steps=5, guidance_scale=6.0, strength=strength,
              output_type="np", image=image)
    expect = img2img(generator=torch.Generator().manual_seed(SEED), **kw).images
    got = ours(sampler=sampler, generator=torch.Generator().manual_seed(SEED), **kw).images
    err = np.abs(got - expect).max()
    assert err <= IMG2IMG_TOL, f"{kind}/{sampler}/{strength}: {err}"


def test_scheduler_interface_and_configs(tmp_path):
    heun = DiffusersScheduler("heun", DDIM_CONFIG)
    assert heun.order == 2 and heun.config.num_train_timesteps == 1000 and heun.config.sampler == "heun"
    heun.set_timesteps(4)
    assert heun.timesteps.dtype == torch.int64 and len(heun.timesteps) == 7  # leading spacing: integer timesteps
    euler = DiffusersScheduler("euler", {**DDIM_CONFIG, "timestep_spacing": "linspace"})
    euler.set_timesteps(5)
    assert euler.timesteps.dtype == torch.float32 and euler.init_noise_sigma > 1  # 999 * k / 4: fractional
    ddim = DiffusersScheduler(scheduler_config=DDIM_CONFIG, eta=0.5)  # sampler None: the one the config's class means
    assert ddim.sampler == "ddim" and ddim.sampler_options == {"eta": 0.5}
    again = DiffusersScheduler.from_config(ddim.config)
    assert (again.sampler, again.sampler_options, again.schedule_config) == ("ddim", {"eta": 0.5}, DDIM_CONFIG)
    assert DiffusersScheduler.from_config(ddim, sampler="unipc").sampler_options == {}
    folder = save_pipeline(tiny_sd_pipeline("sd15"), str(tmp_path))
    loaded = DiffusersScheduler.from_pretrained(folder, subfolder="scheduler", sampler="dpmpp_3m_exact")
    assert loaded.sampler == "dpmpp_3m_exact" and loaded.schedule_config["_class_name"] == "DDIMScheduler"
    ddim.set_timesteps(3)
    x = torch.ones(1, 4, 2, 2)
    out = ddim.step(torch.zeros_like(x), ddim.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == x.shape


@pytest.mark.parametrize("sampler", sorted(OWN_SCHEDULERS))
def test_add_noise_matches_diffusers(sampler):
    """add_noise puts clean samples at a point of the run in the sampler's state space (VE-scaled for euler and heun),
    as diffusers' scheduler of the same method does."""
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = DiffusersScheduler(sampler, DDIM_CONFIG)
    theirs = getattr(diffusers, OWN_SCHEDULERS[sampler]).from_config(DDIM_CONFIG)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(5)
    for step in (0, 2):
        index = step * ours.order
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(index)
        expect = theirs.add_noise(x0, eps, theirs.timesteps[index:index + 1].repeat(2))
        got = ours.add_noise(x0, eps, ours.timesteps[index:index + 1].repeat(2))
        assert (got - expect).abs().max() <= ADD_NOISE_RTOL * expect.abs().max(), (sampler, step)


def test_scheduler_bad_input():
    with pytest.raises(ValueError, match="sampler='nope' is not a velodiff sampler"):
        DiffusersScheduler("nope")
    with pytest.raises(ValueError, match="has no option 'etaa'"):
        DiffusersScheduler("ddim", etaa=0.5)
    with pytest.raises(ValueError, match="begin"):
        DiffusersScheduler("ddim", begin=2)
    with pytest.raises(TypeError, match="scheduler_config"):
        DiffusersScheduler("ddim", scheduler_config=42)
    with pytest.raises(ValueError, match="trained_betas"):
        DiffusersScheduler("ddim", {**DDIM_CONFIG, "trained_betas": [0.1] * 1000})
    scheduler = DiffusersScheduler("heun", DDIM_CONFIG)
    x = torch.zeros(1, 4, 2, 2)
    for call in (lambda: scheduler.step(x, 801, x), lambda: scheduler.scale_model_input(x, 801),
                 lambda: scheduler.init_noise_sigma, lambda: scheduler.add_noise(x, x, 801),
                 lambda: scheduler.set_begin_index(0)):
        with pytest.raises(RuntimeError, match=r"set_timesteps\(num_inference_steps\) first"):
            call()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)  # heun: timesteps t0, t1, t1 (calls of steps 0, 0, 1)
    with pytest.raises(ValueError, match="timestep=5 is not the timestep"):
        scheduler.step(x, 5, x)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(torch.zeros(2, 4, 2, 2), scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="begin_index=1 is a later model evaluation"):
        scheduler.set_begin_index(1)
    with pytest.raises(ValueError, match="timesteps: 5 is not a point"):
        scheduler.add_noise(x, x, 5)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(RuntimeError, match="all 3 model evaluations"):
        scheduler.step(x, scheduler.timesteps[-1], x)
