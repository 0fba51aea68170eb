"""Pipeline calls check their arguments before any heavy work: step counts the schedule cannot give, sizes,
guidance, img2img images and strength; prompts the text encoder cannot read whole warn once; the folder's
``_velodiff_defaults`` and diffusers' defaults for guidance; DiT at sizes other than its training size (diffusers'
DiT model is the oracle); Ctrl-C leaves the denoising loop."""
import contextlib
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import velodiff as vd
from velodiff.pipelines import base
from velodiff.pipelines.base import PromptWarning
from fixtures import (quiet_pipeline, save_pipeline, saved_and_loaded, tiny_dit_pipeline, tiny_pixart_pipeline,
                      tiny_sd_pipeline)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def counting(*modules):
    """Counts the forward calls of ``modules`` (a list with one counter, updated in place)."""
    count = [0]

    def hook(module, args):
        count[0] += 1
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = save_pipeline(tiny_sd_pipeline("sd15"), str(tmp_path_factory.mktemp("sd15")))
    pipe = vd.Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return saved_and_loaded(tiny_dit_pipeline(), str(tmp_path_factory.mktemp("dit")))


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    folder = save_pipeline(tiny_pixart_pipeline(), str(tmp_path_factory.mktemp("pixart")))
    pipe = vd.Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


@pytest.fixture(scope="module")
def digits_dit():
    return quiet_pipeline("digits-dit")


def heavy_modules(pipe):
    return [getattr(pipe, name) for name in ("text_encoder", "unet", "transformer", "vae") if hasattr(pipe, name)]


def call(pipe, **kwargs):
    """A call of ``pipe`` with a conditioning that suits it (class labels for DiT)."""
    if isinstance(pipe, vd.pipelines.DiTPipeline):
        return pipe([3], **kwargs)
    return pipe("lower", **kwargs)


def refused_before_work(pipe, error, match, **kwargs):
    """The call raises ``error`` matching ``match`` with no model (text encoder, denoiser, VAE) called."""
    with counting(*heavy_modules(pipe)) as n, pytest.raises(error, match=match):
        call(pipe, **kwargs)
    assert n[0] == 0


# --------------------------------------------------------------------------------------------------------------
# step counts
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sd", "dit", "pixart"])
def test_too_many_steps_refused_with_the_maximum(which, sd, dit, pixart):
    pipe = {"sd": sd, "dit": dit[1], "pixart": pixart}[which]
    # the folders' DDIM configs have leading spacing, with steps_offset 1 for SD (timestep 1000 at N = 1000) and 0
    # for the DiT / PixArt ones (N <= 1000); dpmpp_2m's grid needs N + 1 points: T // (N + 1) >= 1 and, with
    # steps_offset 1, a top timestep N + 1 <= 999 (tests/sampling/test_step_limits.py checks these on diffusers)
    ddim_max, dpmpp_max = (999, 998) if which == "sd" else (1000, 999)
    refused_before_work(pipe, ValueError, f"num_inference_steps={ddim_max + 1} is too many for sampler 'ddim'.*at "
                                          f"most {ddim_max}", num_inference_steps=ddim_max + 1, sampler="ddim")
    refused_before_work(pipe, ValueError, f"num_inference_steps={dpmpp_max + 1} is too many for sampler "
                                          f"'dpmpp_2m'.*at most {dpmpp_max}", num_inference_steps=dpmpp_max + 1,
                        sampler="dpmpp_2m")
    refused_before_work(pipe, ValueError, "num_inference_steps=100000 is too many.*at most",
                        num_inference_steps=100000, sampler="euler")
    refused_before_work(pipe, ValueError, "num_inference_steps", num_inference_steps=0)


def test_too_many_steps_refused_for_img2img(sd):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    refused_before_work(sd, ValueError, "num_inference_steps=1000 is too many for sampler .ddim.*at most 999",
                        image=image, num_inference_steps=1000, strength=0.5)


# --------------------------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sd", "dit", "pixart"])
def test_sizes_must_be_positive_multiples(which, sd, dit, pixart):
    pipe = {"sd": sd, "dit": dit[1], "pixart": pixart}[which]
    multiple = 2 if which == "sd" else 4  # the tiny VAE's factor 2 (x the transformers' patch size 2)
    for name in ("height", "width"):
        other = "width" if name == "height" else "height"
        same = {other: 16} if which == "dit" else {}  # DiT: square
        for bad in (0, -16, multiple + 1) + ((6,) if multiple == 4 else ()):  # 6: the VAE's 2, not the patch's
            refused_before_work(pipe, ValueError, f"{name} must be a positive multiple of {multiple}.*got {bad}",
                                **{name: bad}, **same)
        refused_before_work(pipe, TypeError, name, **{name: 16.0}, **same)
        refused_before_work(pipe, TypeError, name, **{name: True}, **same)


@pytest.mark.parametrize("which", ["sd", "dit", "pixart"])
def test_huge_sizes_refused_before_allocating(which, sd, dit, pixart):
    """height=100000 ran 575 s; 100000 x 100000 asked for 40 GB: now refused at once, naming the limit and how to
    raise it. The tiny models' native side is 32 / 16 / 16 pixels: at most 4x that."""
    pipe = {"sd": sd, "dit": dit[1], "pixart": pixart}[which]
    native = 32 if which == "sd" else 16
    limit = 4 * native
    start = time.perf_counter()
    refused_before_work(pipe, ValueError, f"height=100000 is more than this model can be asked for: at most {limit} "
                                          f"pixels.*VELODIFF_MAX_SIZE_FACTOR", height=100000, width=100000)
    refused_before_work(pipe, ValueError, f"height={limit + 4} is .*at most {limit}", height=limit + 4,
                        width=limit + 4 if which == "dit" else None)
    assert time.perf_counter() - start < 1.0
    out = call(pipe, height=limit, width=limit if which == "dit" else native, num_inference_steps=1,
               output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape[-2] == limit // (2 if which == "sd" else 2)


def test_size_limit_is_overridable_by_the_environment(sd, monkeypatch):
    monkeypatch.setenv("VELODIFF_MAX_SIZE_FACTOR", "1")
    refused_before_work(sd, ValueError, "height=34 is .*at most 32 pixels", height=34)
    sd("lower", height=32, num_inference_steps=1, output_type="latent")
    monkeypatch.setenv("VELODIFF_MAX_SIZE_FACTOR", "16")
    out = sd("lower", height=16 * 32, width=32, num_inference_steps=1, output_type="latent")
    assert out.images.shape[-2:] == (256, 16)
    monkeypatch.setenv("VELODIFF_MAX_SIZE_FACTOR", "lots")
    refused_before_work(sd, ValueError, "VELODIFF_MAX_SIZE_FACTOR must be a positive number, got 'lots'")
    monkeypatch.setattr(base, "MAX_SIZE_FACTOR", 2)
    monkeypatch.delenv("VELODIFF_MAX_SIZE_FACTOR")
    refused_before_work(sd, ValueError, "width=66 is .*at most 64 pixels", width=66)


def test_zero_width_is_an_error_not_the_default(digits):
    """``width=0`` used to become the native 16 silently."""
    refused_before_work(digits, ValueError, "width must be a positive multiple of 2.*got 0", width=0)
    refused_before_work(digits, ValueError, "height must be a positive multiple of 2.*got 0", height=0)


# --------------------------------------------------------------------------------------------------------------
# DiT at other sizes: diffusers' DiTTransformer2DModel is the oracle
# --------------------------------------------------------------------------------------------------------------

# Max-abs difference of [0, 1] images, fp32 on both sides: measured over seeds 0-5, ddim and dpmpp_2m, guidance 1
# and 4, sizes 8 / 24 / 32 (72 runs): at most 4.2e-7 (median 3.0e-7). The bound is 2.4x the largest observed.
DIT_IMAGE_TOL = 1e-6


def test_dit_model_at_other_sizes_equals_diffusers(dit):
    """The transformer alone at latent grids of 4, 12 and 16 (native 8): diffusers' PatchEmbed recomputes the 2-D
    sin-cos table for the new grid, stretched to the training grid, and so does velodiff's."""
    theirs, ours, _ = dit
    for size in (4, 12, 16):
        x = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(size))
        t, y = torch.tensor([500, 20]), torch.tensor([3, 1000])
        expect = theirs.transformer(x, timestep=t, class_labels=y).sample
        got = ours.transformer(x, t, y)
        assert got.shape == expect.shape
        assert float((got - expect).abs().max()) <= 1e-6 * float(expect.abs().max())


@pytest.mark.parametrize("size", [8, 24, 32])
@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_dit_pipeline_at_other_sizes_matches_diffusers(dit, size, sampler, scheduler):
    """diffusers' DiTPipeline draws latents of ``transformer.config.sample_size``: with that set to the new latent
    size (the model's PatchEmbed keeps its training grid) it is the oracle for ``height=width=size``."""
    import diffusers
    theirs, ours, folder = dit
    native = theirs.transformer.config.sample_size
    theirs.scheduler = getattr(diffusers, scheduler).from_pretrained(folder, subfolder="scheduler")
    theirs.transformer.register_to_config(sample_size=size // 2)
    try:
        kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
        expect = theirs([3, 0], generator=torch.Generator().manual_seed(1), **kw).images
    finally:
        theirs.transformer.register_to_config(sample_size=native)
    got = ours([3, 0], sampler=sampler, height=size, generator=torch.Generator().manual_seed(1), **kw).images
    assert got.shape == expect.shape == (2, size, size, 3)
    assert np.abs(got - expect).max() <= DIT_IMAGE_TOL


def test_dit_sizes_must_be_square(dit, digits_dit):
    _, ours, _ = dit
    refused_before_work(ours, ValueError, r"height \(16\) and width \(24\) must be equal", height=16, width=24)
    out = digits_dit([7], height=32, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)


# --------------------------------------------------------------------------------------------------------------
# guidance
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sd", "dit", "pixart"])
def test_guidance_must_be_finite_and_nonnegative(which, sd, dit, pixart):
    pipe = {"sd": sd, "dit": dit[1], "pixart": pixart}[which]
    for bad in (math.inf, -math.inf, math.nan, -0.5, "3", True):
        refused_before_work(pipe, ValueError, r"guidance_scale must be a finite number >= 0", guidance_scale=bad)
    if which == "sd":
        for bad in (math.nan, math.inf, -0.1, 1.5, "0.7"):
            refused_before_work(pipe, ValueError, r"guidance_rescale must be a number in \[0, 1\]",
                                guidance_rescale=bad)


def test_sampler_and_latents_arguments(sd):
    refused_before_work(sd, TypeError, "sampler must be a str", sampler=3)
    refused_before_work(sd, ValueError, "unknown sampler 'nope'", sampler="nope")
    refused_before_work(sd, TypeError, "sampler_options must be a dict", sampler_options=[("eta", 1.0)])
    latents = torch.zeros(1, 4, 16, 16)
    latents[0, 0, 0, 0] = math.nan
    refused_before_work(sd, ValueError, "latents has NaN or infinite values", latents=latents)
    refused_before_work(sd, ValueError, r"latents must have shape \(1, 4, 16, 16\)", latents=torch.zeros(1, 4, 8, 8))


# --------------------------------------------------------------------------------------------------------------
# image-to-image
# --------------------------------------------------------------------------------------------------------------

def test_img2img_images_must_be_finite_and_in_range(sd):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for value, match in ((math.nan, "image has 1 NaN or infinite values"), (math.inf, "image has 1 NaN"),
                         (-math.inf, "image has 1 NaN")):
        bad = image.clone()
        bad[0, 1, 5, 7] = value
        refused_before_work(sd, ValueError, match, image=bad, strength=0.5)
    refused_before_work(sd, ValueError, r"image tensor values must lie in \[0, 1\] or \[-1, 1\].*divide by 255",
                        image=image * 255, strength=0.5)
    # a little overshoot (a bicubic resize) is fine
    out = sd("lower", image=image * 1.05, strength=0.5, num_inference_steps=2,
             output_type="np", generator=torch.Generator().manual_seed(0))
    assert np.isfinite(out.images).all()


def test_strength_needs_an_image_and_lies_in_0_1(sd):
    refused_before_work(sd, ValueError, "strength=0.5 is for image-to-image: pass image=", strength=0.5)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bad in (0, -0.2, 1.01, math.nan, "0.5", True):
        refused_before_work(sd, ValueError, r"strength must be a number in \(0, 1\]", image=image, strength=bad)
    # the default strength with an image is diffusers' 0.8
    kw = dict(image=image, num_inference_steps=5, output_type="np")
    default = sd("lower", generator=torch.Generator().manual_seed(0), **kw).images
    explicit = sd("lower", strength=0.8, generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(default, explicit)


# --------------------------------------------------------------------------------------------------------------
# prompts the text encoder cannot read whole
# --------------------------------------------------------------------------------------------------------------

def prompt_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, PromptWarning)]


def test_long_prompt_warns_once_with_the_count_cut(digits):
    prompt = "a handwritten seven " * 500  # 10,000 characters
    assert len(prompt) == 10000
    # the digits tokenizer: one token per word here, plus start and end; it keeps model_max_length = 16
    n_tokens = len(digits.tokenizer(prompt).input_ids)
    assert n_tokens == 3 * 500 + 2 and digits.tokenizer.model_max_length == 16
    run = lambda: digits(prompt, negative_prompt=prompt, num_inference_steps=1, output_type="latent")  # noqa: E731
    messages = prompt_warnings(run)
    assert len(messages) == 1
    assert f"prompt: {n_tokens - 16} tokens cut (the text encoder reads 16 tokens" in messages[0]
    assert f"negative_prompt: {n_tokens - 16} tokens cut" in messages[0]


def test_unknown_words_warn_and_known_prompts_do_not(digits):
    vocab = digits.tokenizer.get_vocab()
    # the README's prompts: every word is one whole-word token of the digits vocabulary
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for prompt in ["a handwritten 7", "the digit seven", "number seven", "digit 7", "a 7", "a picture of a 3",
                   "a drawing of the number 0"] + [f"a handwritten {w}" for w in words]:
        assert all(f"{w}</w>" in vocab for w in prompt.split())
        assert prompt_warnings(lambda: digits(prompt, num_inference_steps=1, output_type="latent")) == []
    # words outside it: spelled letter by letter ('purple'), partly ('write' = 'writ' + 'e'), or <unk> ('!')
    messages = prompt_warnings(lambda: digits("a purple 7 write!", num_inference_steps=1, output_type="latent"))
    assert len(messages) == 1
    assert "prompt: words the tokenizer does not know" in messages[0]
    assert "'purple', 'write', '!'" in messages[0]
    for word in ("purple", "write", "!"):
        assert f"{word}</w>" not in vocab


def test_unknown_words_of_a_word_level_tokenizer(pixart):
    """PixArt's (test) T5 tokenizer is word-level: an unknown word becomes <unk>."""
    messages = prompt_warnings(lambda: pixart("a blue fox", negative_prompt="the cat", num_inference_steps=1,
                                              output_type="latent"))
    assert len(messages) == 1 and "prompt: words the tokenizer does not know" in messages[0] and "'blue'" in messages[0]
    assert "negative_prompt" not in messages[0]
    messages = prompt_warnings(lambda: pixart("a red fox", num_inference_steps=1, output_type="latent",
                                              max_sequence_length=3))
    assert len(messages) == 1 and "prompt: 1 tokens cut (the text encoder reads 3 tokens" in messages[0]


# --------------------------------------------------------------------------------------------------------------
# defaults: the folder's, else diffusers'
# --------------------------------------------------------------------------------------------------------------

def test_builtin_folders_carry_their_guidance(digits, digits_dit):
    assert digits.defaults == {"guidance_scale": 3.0, "hidiffusion": {"fraction": 1.0, "downsample": "pooled",
                                                                      "redilate": True}}
    assert digits.default_guidance_scale == 3.0
    assert digits_dit.defaults == {"guidance_scale": 1.5} and digits_dit.default_guidance_scale == 1.5
    kw = dict(num_inference_steps=3, output_type="np")
    none = digits("a 7", generator=torch.Generator().manual_seed(0), **kw).images
    three = digits("a 7", guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kw).images
    seven = digits("a 7", guidance_scale=7.5, generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(none, three)
    assert np.abs(none - seven).max() > 1e-2
    none = digits_dit([7], generator=torch.Generator().manual_seed(0), **kw).images
    given = digits_dit([7], guidance_scale=1.5, generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(none, given)


def test_default_guidance_without_folder_defaults_is_diffusers(sd):
    import diffusers
    for ours, theirs in ((vd.pipelines.StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
                         (vd.pipelines.StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline),
                         (vd.pipelines.DiTPipeline, diffusers.DiTPipeline),
                         (vd.pipelines.PixArtPipeline, diffusers.PixArtAlphaPipeline),
                         (vd.pipelines.PixArtSigmaPipeline, diffusers.PixArtSigmaPipeline)):
        assert inspect.signature(ours.__call__).parameters["guidance_scale"].default is None
        assert ours.DEFAULT_GUIDANCE_SCALE == inspect.signature(theirs.__call__).parameters["guidance_scale"].default
    assert sd.defaults == {} and sd.default_guidance_scale == 7.5
    kw = dict(num_inference_steps=2, output_type="np")
    none = sd("lower", generator=torch.Generator().manual_seed(0), **kw).images
    given = sd("lower", guidance_scale=7.5, generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(none, given)


def copy_builtin(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(vd.pipelines.BUILTIN_MODELS[name], folder)
    return folder


@pytest.mark.parametrize("value, match", [
    ("3", "_velodiff_defaults: guidance_scale must be a finite number >= 0, got '3'"),
    ({"guidance_scale": -1.0}, "_velodiff_defaults: guidance_scale must be a finite number >= 0, got -1.0"),
    ({"guidance": 3.0}, r"_velodiff_defaults has unknown keys \['guidance'\]"),
    ({"hidiffusion": 3}, "_velodiff_defaults.hidiffusion must be an object, got 3")])
def test_bad_folder_defaults_are_refused_at_loading(tmp_path, value, match):
    folder = copy_builtin("digits", tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_velodiff_defaults"] = value if isinstance(value, dict) else {"guidance_scale": value}
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match):
        vd.Pipeline.from_pretrained(str(folder))


@pytest.mark.parametrize("name", ["digits", "digits-dit"])
def test_diffusers_loads_the_builtin_folders_with_the_defaults_key(name):
    """diffusers ignores model_index.json keys that start with an underscore."""
    import diffusers
    folder = vd.pipelines.BUILTIN_MODELS[name]
    assert "_velodiff_defaults" in json.loads(open(os.path.join(folder, "model_index.json")).read())
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == ("DiTPipeline" if name == "digits-dit" else "StableDiffusionPipeline")


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------------------------

def test_keyboard_interrupt_leaves_the_loop(digits):
    steps = []

    def callback(i, call, x):
        steps.append(i)
        if i == 2:
            raise KeyboardInterrupt
    with counting(digits.unet) as n, pytest.raises(KeyboardInterrupt):
        digits("a 7", num_inference_steps=50, callback=callback)
    assert steps == [0, 1, 2] and n[0] == 3


def test_ctrl_c_stops_a_long_run_promptly(tmp_path):
    """SIGINT to a process in the middle of 5000 steps: it exits within seconds with KeyboardInterrupt."""
    # SIGINT's Python handler, as in a terminal (a shell starts background jobs, e.g. a CI run under nohup ... &,
    # with SIGINT ignored, and a child inherits that)
    script = ("import signal, sys, velodiff as vd\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "pipe = vd.Pipeline.from_pretrained('digits')\n"
              "pipe.set_progress_bar_config(disable=True)\n"
              "def started(i, call, x):\n"
              "    if i == 3:\n"
              "        print('started', flush=True)\n"
              "pipe('a 7', num_inference_steps=5000, sampler='euler', callback=started)\n"
              "print('finished', flush=True)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "started", proc.stderr.read()
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        waited = time.perf_counter() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert waited < 5.0, f"{waited:.1f} s after SIGINT"
