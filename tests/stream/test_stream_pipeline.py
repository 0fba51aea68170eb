"""StreamDiffusion's stream batch and residual CFG (velodiff.stream.StreamPipeline).

Oracles: diffusers' StableDiffusionImg2ImgPipeline with its LCMScheduler on the same folder and seed (frame by
frame); velodiff's own image-to-image call (itself checked against diffusers in tests/pipelines/test_img2img.py),
bit for bit when the denoiser is made batch-invariant (evaluated one row at a time), so that stream batch is shown
to be a pure rescheduling; and a float64 re-derivation of the paper's residual CFG (section 3.2) that uses neither
the sampler plan nor the fused update op.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

import velodiff as vd
from fixtures import quiet_pipeline, save_pipeline, tiny_sd_pipeline
from velodiff.pipelines.scheduling import noise_schedule
from velodiff.sampling.samplers.lcm import lcm_boundary_scalings
from velodiff.stream import StreamPipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a handwritten 3"
T_INDEX = {2: [32, 45], 3: [10, 25, 40]}  # t = 359, 99 and t = 799, 499, 199 of the 50-point LCM grid
TIMESTEPS = {2: [359, 99], 3: [799, 499, 199]}
# the tiny random pipelines' tokenizers know no words of "a photo": the prompt is still a valid condition
pytestmark = pytest.mark.filterwarnings("ignore::velodiff.pipelines.base.PromptWarning")


class RowWise(nn.Module):
    """A UNet evaluated one batch row at a time: its result for a row does not depend on the other rows (a
    batched CPU convolution does differ from the unbatched one in the last bits)."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet
        self.config = unet.config

    def forward(self, x, t, emb, added_cond_kwargs=None):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        rows = []
        for i in range(x.shape[0]):
            added = None if added_cond_kwargs is None else {k: v[i:i + 1] for k, v in added_cond_kwargs.items()}
            rows.append(self.inner(x[i:i + 1], t[i:i + 1], emb[i:i + 1], added_cond_kwargs=added))
        return torch.cat(rows)


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


def frames(count: int, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g) for _ in range(count)]


def img2img(pipe, frame, n, guidance, seed=2, prompt=PROMPT):
    """The frame-by-frame oracle: image-to-image over the stream's timesteps with a generator seeded like it."""
    return pipe(prompt, image=frame, strength=1.0, num_inference_steps=n, sampler="lcm",
                sampler_options={"timesteps": TIMESTEPS[n]}, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("cfg_type,guidance", [("none", 1.0), ("full", 2.5)])
def test_stream_batch_is_img2img_frame_by_frame_bit_for_bit(digits, monkeypatch, n, cfg_type, guidance):
    monkeypatch.setattr(digits, "unet", RowWise(digits.unet))
    stream = StreamPipeline(digits, T_INDEX[n], prompt=PROMPT, cfg_type=cfg_type, guidance_scale=guidance,
                            output_type="latent")
    inputs = frames(7)
    outputs = [stream.step(f) for f in inputs] + stream.flush()
    # call k returns frame k - n + 1 (the first n calls: frame 0, after the warm-up); flush returns the rest
    assert [o.index for o in outputs] == [0] * (n - 1) + list(range(7))
    expected = {k: img2img(digits, inputs[k], n, guidance) for k in range(7)}
    for o in outputs:
        assert torch.equal(o.image, expected[o.index]), o.index
    assert stream.model_calls == (n - 1) + 7 + (n - 1)  # warm-up, one call per frame, flush


def test_stream_batch_with_the_batched_unet_differs_by_rounding_only(digits):
    stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, cfg_type="none", output_type="latent")
    inputs = frames(5)
    outputs = [stream.step(f) for f in inputs]
    for o in outputs:
        ref = img2img(digits, inputs[o.index], 2, 1.0)
        # fp32 rows of a batched vs unbatched UNet: at most 1.7e-6 measured on latents of std ~1 (bound: 3.5x);
        # a one-step error in the stream (e.g. a wrong slot's noise) moves them by > 0.1
        assert (o.image - ref).abs().max() < 6e-6


def test_stream_matches_diffusers_lcm_img2img(tmp_path):
    import diffusers
    folder = save_pipeline(tiny_sd_pipeline("sd15"), str(tmp_path / "sd15"))
    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    theirs.scheduler = diffusers.LCMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    ours = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    stream = StreamPipeline(ours, T_INDEX[2], prompt="a photo", output_type="pt", cfg_type="none",
                            use_denoising_batch=False, seed=5)
    for frame in frames(2, size=32, seed=3):
        got = stream(frame)
        want = theirs("a photo", image=frame[None], strength=1.0, timesteps=TIMESTEPS[2], guidance_scale=1.0,
                      generator=torch.Generator().manual_seed(5), output_type="pt").images
        # the images of velodiff's and diffusers' img2img agree to 6e-6 (tests/pipelines/test_img2img.py)
        assert (got - want).abs().max() < 6e-6


def test_sdxl_stream_is_img2img_frame_by_frame(tmp_path, monkeypatch):
    folder = save_pipeline(tiny_sd_pipeline("sdxl"), str(tmp_path / "sdxl"))
    pipe = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr(pipe, "unet", RowWise(pipe.unet))
    stream = StreamPipeline(pipe, T_INDEX[2], prompt="a photo", cfg_type="full", guidance_scale=3.0,
                            output_type="latent")
    inputs = frames(3, size=32)
    for o in [stream.step(f) for f in inputs] + stream.flush():
        assert torch.equal(o.image, img2img(pipe, inputs[o.index], 2, 3.0, prompt="a photo"))


def rcfg_float64(pipe, frame, cfg_type, gamma, delta, timesteps, seed=2, prompt=PROMPT):
    """One frame through the stream's steps with the paper's residual CFG, in float64 outside the UNet: virtual
    residual noise (x_t - alpha_t R) / sigma_t towards R = the input latent (self) or the data prediction of the
    negative-prompt noise at the first step (initialize); LCM boundary conditions; the draws in the pipeline's order."""
    ab = torch.as_tensor(noise_schedule(pipe.scheduler_config).alphas_cumprod, dtype=torch.float64)
    a = [ab[t].sqrt() for t in timesteps]
    s = [(1 - ab[t]).sqrt() for t in timesteps]
    g = torch.Generator().manual_seed(seed)
    posterior = pipe.vae.encode(frame[None] * 2 - 1)
    eps = torch.randn(posterior.mean.shape, generator=g)
    latent = pipe.vae.vae_to_latents(posterior.mean + posterior.std * eps).double()
    noises = [torch.randn(latent.shape, generator=g).double() for _ in timesteps]
    cond, uncond = pipe.conditioning([prompt], [""], 1, True, 16, 16)

    def unet(x, t, c):
        return pipe.unet(x.float(), torch.tensor([float(t)]), c["encoder_hidden_states"]).double()

    x = a[0] * latent + s[0] * noises[0]
    ref = latent if cfg_type == "self" else (x - s[0] * unet(x, timesteps[0], uncond)) / a[0]
    for i, t in enumerate(timesteps):
        virtual = (x - a[i] * ref) / s[i]
        e = delta * virtual + gamma * (unet(x, t, cond) - delta * virtual)
        c_skip, c_out = lcm_boundary_scalings(float(t))
        denoised = c_skip * x + c_out * (x - s[i] * e) / a[i]
        x = a[i + 1] * denoised + s[i + 1] * noises[i + 1] if i + 1 < len(timesteps) else denoised
    return x


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
@pytest.mark.parametrize("gamma,delta", [(1.5, 1.0), (2.0, 0.6)])
def test_residual_cfg_matches_the_paper_in_float64(digits, cfg_type, gamma, delta):
    stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, cfg_type=cfg_type, guidance_scale=gamma,
                            delta=delta, output_type="latent", use_denoising_batch=False)
    for frame in frames(2):
        got = stream(frame).double()
        want = rcfg_float64(digits, frame, cfg_type, gamma, delta, TIMESTEPS[2])
        # fp32 state and update vs float64: measured <= 3.2e-6 on latents of max ~4 (each UNet input rounded to
        # fp32 in both); the other RCFG's reference (self <-> initialize) moves them by 2.4 .. 2.7
        assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_residual_cfg_stream_batch_is_a_rescheduling(digits, monkeypatch, cfg_type):
    monkeypatch.setattr(digits, "unet", RowWise(digits.unet))
    kwargs = dict(prompt=PROMPT, cfg_type=cfg_type, guidance_scale=1.8, delta=0.8, output_type="latent")
    batched = StreamPipeline(digits, T_INDEX[3], **kwargs)
    alone = StreamPipeline(digits, T_INDEX[3], use_denoising_batch=False, **kwargs)
    inputs = frames(6)
    expected = [alone(f) for f in inputs]
    for o in [batched.step(f) for f in inputs] + batched.flush():
        assert torch.equal(o.image, expected[o.index])
    assert batched.batch_size == (4 if cfg_type == "initialize" else 3)


def test_residual_cfg_on_v_prediction_is_formed_on_noise(tmp_path):
    """With delta != 1, guidance on v and on epsilon differ; the stream forms it on epsilon (the paper's space):
    a v-prediction model's stream equals the same model wrapped to predict epsilon, on an epsilon schedule."""
    folder = save_pipeline(tiny_sd_pipeline("sd2"), str(tmp_path / "sd2"))
    v_pipe = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    eps_pipe = vd.Pipeline.from_pretrained(folder, dtype=torch.float32)
    eps_pipe.scheduler_config = dict(eps_pipe.scheduler_config, prediction_type="epsilon")
    ab = torch.as_tensor(noise_schedule(v_pipe.scheduler_config).alphas_cumprod, dtype=torch.float32)

    class AsEpsilon(nn.Module):  # eps = sigma x + alpha v for x = alpha x0 + sigma eps, v = alpha eps - sigma x0
        def __init__(self, unet):
            super().__init__()
            self.inner, self.config = unet, unet.config

        def forward(self, x, t, emb, added_cond_kwargs=None):
            a = ab[t.long()].sqrt().reshape(-1, 1, 1, 1)
            return (1 - a * a).sqrt() * x + a * self.inner(x, t, emb, added_cond_kwargs=added_cond_kwargs)

    eps_pipe.unet = AsEpsilon(eps_pipe.unet)
    kwargs = dict(prompt="a photo", cfg_type="self", guidance_scale=2.0, delta=0.5, output_type="latent")
    v_stream = StreamPipeline(v_pipe, T_INDEX[2], **kwargs)
    eps_stream = StreamPipeline(eps_pipe, T_INDEX[2], **kwargs)
    for frame in frames(3, size=32):
        got, want = v_stream(frame), eps_stream(frame)
        assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_first_outputs_are_the_first_frame_not_noise(digits):
    stream = StreamPipeline(digits, T_INDEX[3], prompt=PROMPT, output_type="np")
    inputs = frames(3)
    alone = StreamPipeline(digits, T_INDEX[3], prompt=PROMPT, output_type="np", use_denoising_batch=False)
    first = alone(inputs[0])
    for k, f in enumerate(inputs):
        out = stream.step(f)
        assert out.index == 0
        assert np.abs(out.image - first).max() < 1e-4, k


def test_prompt_change_mid_stream_and_the_embedding_cache(digits, monkeypatch):
    monkeypatch.setattr(digits, "unet", RowWise(digits.unet))
    calls = []
    encode = digits.conditioning
    monkeypatch.setattr(digits, "conditioning", lambda *a, **k: calls.append(a[0]) or encode(*a, **k))
    stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, cfg_type="none", output_type="latent")
    inputs = frames(8)
    outputs = [stream.step(f) for f in inputs[:3]]
    stream.set_prompt("a handwritten 8")
    outputs += [stream.step(f) for f in inputs[3:6]]
    stream.set_prompt(PROMPT)
    outputs += [stream.step(f) for f in inputs[6:]] + stream.flush()
    assert calls == [[PROMPT], ["a handwritten 8"]]  # the first prompt's embeddings came from the cache
    for o in outputs:  # frames that entered after a change are denoised under the new prompt only
        if o.index in (3, 4):
            assert torch.equal(o.image, img2img(digits, inputs[o.index], 2, 1.0, prompt="a handwritten 8"))
        elif o.index in (0, 1, 6, 7):
            assert torch.equal(o.image, img2img(digits, inputs[o.index], 2, 1.0))


def test_t_index_change_rebuilds_the_batch(digits, monkeypatch):
    monkeypatch.setattr(digits, "unet", RowWise(digits.unet))
    stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, cfg_type="full", guidance_scale=2.0,
                            output_type="latent")
    inputs = frames(6)
    for f in inputs[:3]:
        stream.step(f)
    pending = stream.flush()
    assert [o.index for o in pending] == [2]
    stream.set_t_index_list(T_INDEX[3])
    assert stream.batch_size == 6
    for o in [stream.step(f) for f in inputs[3:]] + stream.flush():
        assert torch.equal(o.image, img2img(digits, inputs[o.index], 3, 2.0))


def test_tiny_vae_encodes_and_decodes(digits):
    from velodiff.models.taesd import AutoencoderTiny
    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)).eval()
    stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, vae=tiny, output_type="pt")
    inputs = frames(3)
    got = [stream.step(f) for f in inputs]
    with torch.no_grad():
        latent = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, vae=tiny, output_type="latent",
                                use_denoising_batch=False)(inputs[0])
        want = (tiny.decode(tiny.latents_to_vae(latent)) / 2 + 0.5).clamp(0, 1)
    assert got[0].image.shape == (1, 3, 16, 16)
    assert (got[0].image - want).abs().max() < 1e-5
    wrong = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                            num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1)).eval()
    with pytest.raises(ValueError, match="vae: its scale factor is 4 but the pipeline's VAE has 2"):
        StreamPipeline(digits, T_INDEX[2], vae=wrong)
    wrong = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=3)
    with pytest.raises(ValueError, match="vae: it has 3 latent channels but the UNet takes 4"):
        StreamPipeline(digits, T_INDEX[2], vae=wrong)


def test_lora_and_lcm_lora_in_a_stream(digits):
    digits.load_lora("digits-lcm")
    try:
        stream = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, output_type="latent")
        alone = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, output_type="latent", use_denoising_batch=False)
        inputs = frames(3)
        outputs = [stream.step(f) for f in inputs]
        assert (outputs[-1].image - alone(inputs[outputs[-1].index])).abs().max() < 2e-5
    finally:
        digits.unload_lora()
    plain = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, output_type="latent", use_denoising_batch=False)
    assert (plain(inputs[1]) - outputs[-1].image).abs().max() > 1e-3  # the adapter did act


# --- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t_index,match", [([32, 50], r"\[50\] outside the schedule.*\[0, 49\]"),
                                           ([-1], "outside the schedule"), ([45, 32], "strictly increasing"),
                                           ([], "non-empty"), ("32,45", "non-empty list"), ([1.5], "integers")])
def test_bad_t_index_list(digits, t_index, match):
    with pytest.raises(ValueError, match=match):
        StreamPipeline(digits, t_index)
    stream = StreamPipeline(digits, [10])
    with pytest.raises(ValueError, match=match):
        stream.set_t_index_list(t_index)
    assert stream.t_index_list == [10]


@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg_type="half"), "cfg_type must be one of"), (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(delta=-1), "delta"), (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(output_type="gif"), "output_type"), (dict(similarity_threshold=1.5), "threshold"),
    (dict(max_skip_frame=-1), "max_skip_frame"), (dict(seed="2"), "seed")])
def test_bad_arguments(digits, kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamPipeline(digits, [32, 45], **kwargs)


def test_frames_of_mixed_sizes_and_batches(digits):
    stream = StreamPipeline(digits, [32, 45])
    stream(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"image: frame 1 is 32x32 but the stream runs at 16x16"):
        stream(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="one frame per call"):
        stream(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        stream(torch.rand(3, 15, 16))
    stream.reset()
    assert stream(torch.rand(3, 32, 32)).size == (32, 32)  # a reset stream takes a new size


def test_pipelines_without_text_conditioning_are_refused():
    with pytest.raises(TypeError, match="pipe must be a velodiff Stable Diffusion pipeline"):
        StreamPipeline(quiet_pipeline("digits-dit"), [32, 45])


def test_prompt_embeds_stand_in_for_the_text(digits):
    cond, uncond = digits.conditioning([PROMPT], None, 1, True, 16, 16)
    by_text = StreamPipeline(digits, T_INDEX[2], prompt=PROMPT, cfg_type="full", guidance_scale=2.0,
                             output_type="latent", use_denoising_batch=False)
    by_embeds = StreamPipeline(digits, T_INDEX[2], cfg_type="full", guidance_scale=2.0, output_type="latent",
                               use_denoising_batch=False)
    by_embeds.set_prompt(prompt_embeds=cond["encoder_hidden_states"],
                         negative_prompt_embeds=uncond["encoder_hidden_states"])
    frame = frames(1)[0]
    assert torch.equal(by_text(frame), by_embeds(frame))
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        by_embeds.set_prompt(prompt_embeds=cond["encoder_hidden_states"])
    with pytest.raises(ValueError, match=r"prompt_embeds must be a \[1, L, D\] tensor"):
        by_embeds.set_prompt(prompt_embeds=torch.zeros(2, 16, 64), negative_prompt_embeds=torch.zeros(2, 16, 64))
    with pytest.raises(TypeError, match="prompt must be a string"):
        by_text.set_prompt(3)
    with pytest.raises(TypeError, match="negative_prompt must be a string"):
        StreamPipeline(digits, T_INDEX[2], negative_prompt=["x"])


def test_the_embedding_cache_is_bounded(digits):
    from velodiff.stream.pipeline import EMBEDDING_CACHE_SIZE
    stream = StreamPipeline(digits, [45], output_type="latent")
    frame = frames(1)[0]
    for k in range(EMBEDDING_CACHE_SIZE + 5):
        stream.set_prompt(f"a handwritten {k % 10} {k}")
        stream(frame)
    assert len(stream._embeddings) == EMBEDDING_CACHE_SIZE
