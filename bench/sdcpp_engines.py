"""stable-diffusion.cpp engines for bench_cpu_engines.py (issue 14): the same UNet weights, one step's time.

stable-diffusion.cpp (through its Python binding, stable-diffusion-cpp-python, a bench-only dependency built from
its PyPI sdist) exposes whole generations only: prompt in, image out. One UNet step's time is taken from two
generations of the same size, one with 1 step and one with N steps (Euler, guidance 7.5: two UNet evaluations per
step, the work of one batch-2 step), both timed in the same interleaved rounds as the other engines:

    step = (t_N - t_1) / (N - 1)   per round

which removes the text encoder, the VAE decode and the setup that both generations share. Its own numbers: no
UNet output is exposed, so the relative error against diffusers cannot be taken; the row's error column holds
the PSNR of its image against its own fp32 image instead (same seed), a fidelity figure of its weight format.

The model folder is a diffusers folder (stable-diffusion.cpp reads one directly: unet/, vae/, text_encoder/):
diffusers' UNet given to the bench (fp32 file, so every weight type is converted from the same numbers), a
random CLIP ViT-L/14 text encoder of SD 1.5's size and SD's VAE (random, fp16).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

#: sd.cpp weight types timed, with the precision table each belongs to in bench_cpu_engines.py.
WEIGHT_TYPES = {"f32": "fp32", "f16": "bf16", "q8_0": "8bit", "q4_0": "4bit"}


def build_folder(unet, path: str, seed: int = 0) -> None:
    """A diffusers folder at ``path`` with ``unet`` (saved in fp32), a random SD 1.5-size CLIP text encoder and
    SD's VAE, what stable-diffusion.cpp needs to recognise an SD 1.x model."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(path, exist_ok=True)
    unet.save_pretrained(os.path.join(path, "unet"))
    torch.manual_seed(seed)
    te = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768)
    text_encoder = CLIPTextModel(te).to(torch.float16)
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    # the names stable-diffusion.cpp looks for ("text_model.embeddings...": newer transformers write them without)
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()
             for k, v in text_encoder.state_dict().items()}
    save_file(state, os.path.join(path, "text_encoder", "model.safetensors"))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    vae.to(torch.float16).save_pretrained(os.path.join(path, "vae"))


def engines(folder: str, size: int, steps: int, threads: int, wtypes: List[str]
            ) -> Tuple[Dict[str, Callable[[], object]], Dict[str, np.ndarray], str]:
    """({"sdcpp_<wtype> 1step": fn, "sdcpp_<wtype> <steps>step": fn, ...}, {wtype: its uint8 image}, why missing).

    Each fn generates one ``size`` px image (Euler, guidance 7.5, seed 0) with the model loaded once per weight
    type on ``threads`` threads."""
    try:
        from stable_diffusion_cpp import StableDiffusion
    except ImportError as e:
        return {}, {}, f"stable-diffusion.cpp rows: stable-diffusion-cpp-python not installed ({e})"
    fns, images = {}, {}
    for wtype in ["f32"] + [w for w in wtypes if w != "f32"]:  # f32 first: every row's PSNR reference
        sd = StableDiffusion(model_path=folder, wtype=wtype, n_threads=threads, verbose=False)

        def generate(n, sd=sd):
            return sd.generate_image(prompt="a photo of a cat", negative_prompt="", width=size, height=size,
                                     cfg_scale=7.5, sample_method="euler", sample_steps=n, seed=0)

        images[wtype] = np.asarray(generate(steps)[0].convert("RGB"), np.float64) / 255.0
        if wtype in wtypes:
            fns[f"sdcpp_{wtype} 1step"] = lambda g=generate: g(1)
            fns[f"sdcpp_{wtype} {steps}step"] = lambda g=generate: g(steps)
        del sd, generate  # an f32 context made only for the reference image is freed here
    return fns, images, ""


def step_rows(res, baseline: str, steps: int, images: Dict[str, np.ndarray]) -> List[dict]:
    """One row per weight type: per-round step seconds (t_N - t_1) / (N - 1), put into ``res`` under
    "sdcpp_<wtype> step" so that its ratio against ``baseline`` is taken round by round, and PSNR to its fp32."""
    from velodiff.commands.bench import psnr

    tag = baseline.replace(" ", "_")
    rows = []
    for wtype, image in images.items():
        if f"sdcpp_{wtype} 1step" not in res.samples:
            continue  # the f32 reference image of a table without an f32 row
        one, many = res.samples[f"sdcpp_{wtype} 1step"], res.samples[f"sdcpp_{wtype} {steps}step"]
        name = f"sdcpp_{wtype} step"
        res.samples[name] = [(b - a) / (steps - 1) for a, b in zip(one, many)]
        res.inner[name] = 1
        ref = images.get("f32")
        fidelity = "ref" if wtype == "f32" else (f"PSNR {psnr(image, ref):.1f} dB vs sdcpp f32" if ref is not None
                                                 else "n/a")
        rows.append({"engine": f"stable-diffusion.cpp {wtype}", "precision": WEIGHT_TYPES[wtype],
                     "s": res.stats(name), f"x_{tag}": res.ratio(name, over=baseline),
                     f"rel_err_vs_{tag}": fidelity})
    return rows
