"""Image-to-image (SDEdit, Meng et al. 2022) for the Stable Diffusion pipelines, following diffusers'
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionXLImg2ImgPipeline``: the image is encoded by the VAE, noised
to point ``t_start = N - int(N * strength)`` of the N-step discretisation, and the sampler runs from there
(``begin=t_start``, see :mod:`velodiff.sampling.begin`). Random draws happen in diffusers' order: the VAE
posterior sample, then the noise, then the sampler's own draws."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from velodiff.pipelines.base import Generator, randn_tensor
from velodiff.sampling import SamplerPlan

ImageInput = Union[Any, Sequence[Any], torch.Tensor, Sequence[torch.Tensor]]  # PIL images or tensors


def check_strength(strength, num_inference_steps: int) -> int:
    """``t_start``, the index of the first point sampled (diffusers' ``get_timesteps``); ValueError naming
    ``strength`` when it is outside (0, 1] or leaves no step."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    if init < 1:
        raise ValueError(f"strength ({strength}) x num_inference_steps ({num_inference_steps}) leaves no denoising "
                         f"step; raise strength or num_inference_steps")
    return num_inference_steps - init


def preprocess_image(image: ImageInput, multiple: int) -> torch.Tensor:
    """A PIL image, a list of them, or a [B, 3, H, W] / [3, H, W] tensor (or list of them) -> fp32 [B, 3, H, W] in
    [-1, 1], as diffusers' ``VaeImageProcessor.preprocess``: PIL images are converted to RGB and scaled from
    [0, 255]; tensors with a negative value are taken to be in [-1, 1] already, others in [0, 1], and must be
    finite and within those ranges (up to :data:`VALUE_SLACK`): ValueError naming ``image`` otherwise. H and W
    must be multiples of ``multiple`` (diffusers would resize; velodiff asks for the exact size)."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("image must not be an empty list")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL ships with the test environment
        Image = None
    if Image is not None and all(isinstance(i, Image.Image) for i in items):
        if len({i.size for i in items}) != 1:
            raise ValueError(f"image: all images must have the same size, got {[i.size for i in items]}")
        arrays = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in items])
        x = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    elif all(isinstance(i, torch.Tensor) for i in items):
        if any(i.dim() not in (3, 4) for i in items):
            raise ValueError(f"image tensors must be [B, 3, H, W] or [3, H, W], got {[tuple(i.shape) for i in items]}")
        x = torch.cat([i if i.dim() == 4 else i.unsqueeze(0) for i in items]).float()
        if x.shape[1] != 3:
            raise ValueError(f"image must have 3 channels, got shape {tuple(x.shape)}")
        _check_values(x)
        if x.min() >= 0:
            x = x * 2.0 - 1.0
        return _check_size(x.to(torch.float32), multiple)
    else:
        raise ValueError(f"image must be a PIL image, a list of PIL images or a torch.Tensor, got "
                         f"{type(image).__name__}")
    return _check_size(x * 2.0 - 1.0, multiple)


#: How far a tensor image may stray outside [-1, 1] (e.g. the overshoot of a bicubic resize) before it is taken
#: for a mistake, such as 8-bit values 0..255 not divided by 255.
VALUE_SLACK = 0.1


def _check_values(x: torch.Tensor) -> None:
    """A tensor image must be finite (NaN / inf would make a black image) and within [-1, 1] (+- VALUE_SLACK)."""
    if x.numel() == 0:
        raise ValueError(f"image is empty, shape {tuple(x.shape)}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"image has {bad} NaN or infinite values (of {x.numel()}); pass a finite image")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - VALUE_SLACK or hi > 1 + VALUE_SLACK:
        raise ValueError(f"image tensor values must lie in [0, 1] or [-1, 1], got [{lo:g}, {hi:g}]"
                         + (" (8-bit values? divide by 255)" if hi > 2 else ""))


def _check_size(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {multiple}, got {h}x{w}")
    return x


def encode_image(vae, image: torch.Tensor, batch: int, generator: Generator, device, dtype) -> torch.Tensor:
    """Model latents [batch, C, h, w] of ``image`` [B, 3, H, W]: a VAE posterior sample (one draw per generator for
    a list of generators, after repeating the image to the batch, as diffusers), normalised with
    ``vae_to_latents``; B must divide ``batch`` (the image is then repeated, as diffusers does)."""
    if batch % image.shape[0]:
        raise ValueError(f"image: cannot repeat a batch of {image.shape[0]} images to {batch} images")
    vae_dtype = next(vae.parameters()).dtype
    image = image.to(device=device, dtype=vae_dtype)
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"generator: got {len(generator)} generators for a batch of {batch}")
        image = image.repeat(batch // image.shape[0], 1, 1, 1)
        z = torch.cat([vae.encode(image[i:i + 1]).sample(generator[i]) for i in range(batch)])
    else:
        z = vae.encode(image).sample(generator)
    latents = vae.vae_to_latents(z).to(dtype)
    return latents.repeat(batch // latents.shape[0], 1, 1, 1)


def noised_start(start: Dict[str, float], latents: torch.Tensor, generator: Generator,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The sampler's initial state from clean latents: ``state_scale * (alpha x0 + sigma eps)`` (``start`` is
    ``plan.info["start"]``), eps drawn like diffusers' ``randn_tensor`` of the latents' shape (or ``noise``, drawn
    that way earlier: a stream keeps one); fp32."""
    if noise is None:
        noise = randn_tensor(latents.shape, generator, latents.device, latents.dtype)
    scale = start.get("state_scale", 1.0)
    return (scale * start["alpha"]) * latents.float() + (scale * start["sigma"]) * noise.float()


def img2img_plan(pipe, sampler: Optional[str], num_inference_steps: int, strength: float,
                 sampler_options: Optional[Dict[str, Any]] = None) -> Tuple[str, SamplerPlan]:
    """(sampler name, plan) starting at ``t_start`` of the N-step schedule (see :func:`check_strength`), from
    ``pipe``'s scheduler config."""
    t_start = check_strength(strength, num_inference_steps)
    options = dict(sampler_options or {})
    if "begin" in options:
        raise ValueError("sampler_options must not set 'begin' with image: it follows from strength")
    options["begin"] = t_start
    return pipe.make_plan(sampler, num_inference_steps, options)


def img2img_denoise(pipe, model_fn, image: torch.Tensor, batch: int, plan: Tuple[str, SamplerPlan],
                    guidance_scale: Optional[float], generator: Generator, guidance_rescale: float = 0.0,
                    callback=None):
    """Encode, noise and denoise ``image`` (preprocessed, [B, 3, H, W] in [-1, 1]) with ``pipe``'s VAE along
    ``plan`` (from :func:`img2img_plan`). Returns (final latents fp32, sampler name, number of model
    evaluations)."""
    latents = encode_image(pipe.vae, image, batch, generator, pipe.device, pipe.dtype)
    x = noised_start(plan[1].info["start"], latents, generator)
    out = pipe.run_denoising(plan, model_fn, x, guidance_scale, generator, guidance_rescale, callback)
    return out, plan[0], len(plan[1].calls)
