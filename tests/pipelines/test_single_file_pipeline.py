"""Pipeline.from_pretrained on single-file checkpoints: a tiny diffusers SD1 / SD2 / SDXL pipeline written as one
original-layout .safetensors file by velodiff.loading, loaded back by velodiff, gives diffusers' images.

What the tiny models need in ``configs=`` (not in the weights, and unlike the family defaults): UNet
``attention_head_dim`` and ``norm_num_groups`` (8), VAE ``norm_num_groups`` (2) and, for SDXL, ``scaling_factor``
(0.18215, the SDXL default is 0.13025), text-encoder ``num_attention_heads`` (4) and ``hidden_act`` ("gelu";
SD1's CLIP-L default is "quick_gelu"). Everything else is inferred from the weights — including SDXL's
``addition_time_embed_dim`` (8 here, 256 by default), from the add-embedding width and text_encoder_2's
projection width — and the test checks that by not passing it.
"""
import json
import os

import numpy as np
import pytest
import torch

import velodiff as vd
from fixtures import clip_tokenizer, save_pipeline, tiny_sd_pipeline
from velodiff.loading import (CheckpointError, convert_diffusers_to_single_file, read_safetensors,
                              write_safetensors)

TE = {"num_attention_heads": 4, "hidden_act": "gelu"}
# Max-abs difference allowed on [0, 1] images, velodiff from the single file vs diffusers from the folder: fp32 on
# both sides (u = 6e-8), rounding alone; measured over generator seeds 0-5 (18 runs): at most 2.2e-6 (median 1.0e-6).
# ~2x that; c_d (the sampler's coefficient of the model output) off by a relative 1e-4 gives >= 1.9e-5.
IMAGE_TOL = 5e-6
CALL = dict(prompt=["lower newer", "wider"], num_inference_steps=3, guidance_scale=6.0, height=32, width=32,
            output_type="np")


def tiny_configs(pipe):
    """The configs= a tiny fixture pipeline needs (see the module docstring)."""
    u = pipe.unet.config
    return {"unet": {"attention_head_dim": u.attention_head_dim, "norm_num_groups": u.norm_num_groups},
            "vae": {"norm_num_groups": pipe.vae.config.norm_num_groups,
                    "scaling_factor": pipe.vae.config.scaling_factor},
            "text_encoder": dict(TE), "text_encoder_2": dict(TE)}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(kind) -> (kind, diffusers pipeline, its saved folder, the single file written from it); cached."""
    cache = {}

    def get(kind):
        if kind not in cache:
            root = tmp_path_factory.mktemp(f"single-{kind}")
            theirs = tiny_sd_pipeline(kind)
            folder = save_pipeline(theirs, str(root / "pipe"))
            path = convert_diffusers_to_single_file(folder, str(root / "model.safetensors"))
            cache[kind] = kind, theirs, folder, path
        return cache[kind]
    return get


def _images(pipe, sampler=None, seed=3):
    kw = {"sampler": sampler} if sampler else {}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw, **CALL).images


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_single_file_matches_diffusers(build, kind):
    from diffusers import EulerDiscreteScheduler
    kind, theirs, folder, path = build(kind)
    # three ways to hand over the tokenizer: an object, a tokenizer folder, a pipeline folder (SDXL: both)
    tok = {"sd15": dict(tokenizer=clip_tokenizer()),
           "sd2": dict(tokenizer=os.path.join(folder, "tokenizer")),
           "sdxl": dict(tokenizer=folder)}[kind]
    pred = theirs.scheduler.config.prediction_type  # v_prediction for the SD2 fixture: not in the weights
    ours = vd.Pipeline.from_pretrained(path, configs=tiny_configs(theirs), prediction_type=pred, **tok)
    ours.set_progress_bar_config(disable=True)
    assert type(ours).__name__ == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert ours.scheduler_config["prediction_type"] == pred
    if kind == "sdxl":
        assert ours.unet.config.addition_time_embed_dim == 8  # inferred, not passed
    # the structure was inferred from the weights
    for key in ("block_out_channels", "cross_attention_dim", "use_linear_projection", "down_block_types"):
        assert list(np.atleast_1d(ours.unet.config[key])) == list(np.atleast_1d(theirs.unet.config[key])), key
    theirs.scheduler = EulerDiscreteScheduler.from_config(ours.scheduler_config)
    expect = theirs(generator=torch.Generator().manual_seed(3), **CALL).images
    got = _images(ours, "euler")
    assert got.shape == expect.shape
    err = np.abs(got - expect).max()
    assert err <= IMAGE_TOL, f"{kind}: max abs difference {err}"


def test_defaults_pickle_rule_and_dtype(build, tmp_path):
    kind, theirs, folder, path = build("sd15")
    configs = tiny_configs(theirs)
    # a file written by velodiff records the folder's configs and scheduler: it needs no configs=
    recorded = vd.Pipeline.from_pretrained(path, tokenizer=folder)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        assert recorded.scheduler_config == json.load(f)  # the folder's DDIMScheduler, not the SD1 default
    assert recorded.unet.config.norm_num_groups == theirs.unet.config.norm_num_groups
    # a file from elsewhere (no metadata) gets the family defaults
    write_safetensors(read_safetensors(path), tmp_path / "plain.safetensors")
    ref = vd.Pipeline.from_pretrained(tmp_path / "plain.safetensors", configs=configs, tokenizer=folder)
    assert ref.scheduler_config["_class_name"] == "PNDMScheduler"
    assert ref.scheduler_config["prediction_type"] == "epsilon"  # the family default
    torch.save({"state_dict": read_safetensors(path)}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*allow_pickle=True"):
        vd.Pipeline.from_pretrained(tmp_path / "model.ckpt", configs=configs, tokenizer=folder)
    pickled = vd.Pipeline.from_pretrained(tmp_path / "model.ckpt", configs=configs, tokenizer=folder,
                                          allow_pickle=True)
    for pipe in (pickled, ref, recorded):
        pipe.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(pickled, "ddim"), _images(ref, "ddim"))
    half = vd.Pipeline.from_pretrained(path, dtype=torch.float16, configs=configs, tokenizer=folder)
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(half, name).parameters()} == {torch.float16}, name


def test_sdxl_needs_both_tokenizers(build):
    _, _, _, path = build("sdxl")
    with pytest.raises(ValueError, match=r"model\.safetensors.*no tokenizer.*Pass tokenizer=\.\.\., tokenizer_2="):
        vd.Pipeline.from_pretrained(path)
    with pytest.raises(ValueError, match=r"Pass tokenizer_2=\.\.\."):
        vd.Pipeline.from_pretrained(path, tokenizer=clip_tokenizer())


def test_errors(build, tmp_path):
    kind, theirs, folder, path = build("sd15")
    with pytest.raises(ValueError, match=r"model\.safetensors.*no tokenizer.*Pass tokenizer=\.\.\. "):
        vd.Pipeline.from_pretrained(path)
    with pytest.raises(ValueError, match=r"configs: unknown component 'text_encoder_3'"):
        vd.Pipeline.from_pretrained(path, tokenizer=folder, configs={"text_encoder_3": {}})
    with pytest.raises(ValueError, match="prediction_type"):
        vd.Pipeline.from_pretrained(path, tokenizer=folder, prediction_type="v")
    with pytest.raises(FileNotFoundError, match=r"tokenizer=.*nope.*not a folder"):
        vd.Pipeline.from_pretrained(path, tokenizer=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"tokenizer, configs: only for single-file"):
        vd.Pipeline.from_pretrained(folder, tokenizer=folder, configs={})
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file"):
        vd.Pipeline.from_pretrained(tmp_path / "missing.safetensors")
    # a UNet-only file is not a pipeline
    unet_only = {k: v for k, v in read_safetensors(path).items() if k.startswith("model.diffusion_model.")}
    from velodiff.loading import write_safetensors
    write_safetensors(unet_only, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=r"unet\.safetensors.*no vae, text_encoder weights"):
        vd.Pipeline.from_pretrained(tmp_path / "unet.safetensors", tokenizer=folder, family="sd1")
