"""What every velodiff pipeline shares: construction from a folder, devices and dtypes, initial noise drawn as
diffusers draws it, the denoising loop through the sampling layer, decoding and output conversion."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from velodiff.sampling import run_plan
from velodiff.pipelines.scheduling import make_plan

Generator = Union[torch.Generator, List[torch.Generator], None]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    """``images``: a list of PIL images (``output_type="pil"``), an array [B, H, W, 3] in [0, 1] ("np"), a
    tensor [B, 3, H, W] in [0, 1] ("pt") or the final latents ("latent")."""

    images: Any
    sampler: str = ""
    num_model_evaluations: int = 0


def randn_tensor(shape, generator: Generator, device, dtype) -> torch.Tensor:
    """N(0, I) exactly as diffusers' ``randn_tensor``: drawn on the generator's device (per sample for a list
    of generators), in ``dtype``, then moved to ``device``."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1,) + tuple(shape[1:]), generator=g, device=g.device, dtype=dtype)
                 for g in generator]
        return torch.cat(parts).to(device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def postprocess(image: torch.Tensor, output_type: str):
    """VAE output in [-1, 1] -> the requested output type."""
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    array = image.cpu().permute(0, 2, 3, 1).numpy()
    if output_type == "np":
        return array
    from PIL import Image
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def check_call_args(num_inference_steps, guidance_scale, output_type, num_images_per_prompt, height=None,
                    width=None, multiple: int = 8) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (not isinstance(value, int) or value <= 0 or value % multiple):
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")


def is_class_conditional(pipe) -> bool:
    """Whether ``pipe`` is conditioned by class labels (a DiT pipeline, velodiff's or diffusers') not prompts."""
    return any(cls.__name__ == "DiTPipeline" for cls in type(pipe).__mro__)


class BasePipeline:
    """A set of components plus the shared denoising loop. Subclasses implement ``__call__``."""

    def __init__(self, components: Dict[str, Any], dtype: torch.dtype, device: torch.device):
        self.components = components
        self.dtype = dtype
        self.device = torch.device(device)
        self.scheduler_config: Dict[str, Any] = components.get("scheduler") or {}
        self.progress = True
        self._restore_hooks: List[Callable[[], None]] = []
        for name, value in components.items():
            if not name.startswith("_") and name != "scheduler":
                setattr(self, name, value)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    def guided_fn(self, call, guided: bool, cond_first: bool, channels: Optional[int] = None):
        """The model callable of the sampling loop for a denoiser ``call(batch, timesteps [N]) -> out``: under
        guidance the batch is [x; x] and the output halves are returned as (cond, uncond); ``cond_first`` says
        which half the caller's conditioning puts first; ``channels`` keeps the first output channels (learned
        sigma models)."""
        def fn(x: torch.Tensor, t: float):
            x = x.to(self.dtype)
            batch = torch.cat([x, x]) if guided else x
            out = call(batch, torch.full((batch.shape[0],), t, device=self.device))
            if channels is not None:
                out = out[:, :channels]
            if not guided:
                return out
            first, second = out.chunk(2)
            return (first, second) if cond_first else (second, first)
        return fn

    def finish(self, final: torch.Tensor, name: str, nfe: int, output_type: str) -> PipelineOutput:
        """Decode the final latents with the pipeline's VAE (unless ``output_type='latent'``) into the output."""
        if output_type == "latent":
            return PipelineOutput(final, name, nfe)
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(self.vae.latents_to_vae(final.to(vae_dtype)))
        return PipelineOutput(postprocess(image, output_type), name, nfe)

    def denoise(self, model_fn, latents: torch.Tensor, num_inference_steps: int, sampler: Optional[str],
                guidance_scale: Optional[float], generator: Generator, guidance_rescale: float = 0.0,
                sampler_options: Optional[Dict[str, Any]] = None, callback=None):
        """Draw nothing, decide nothing: run the sampler plan over ``model_fn`` from ``latents`` (unit noise).
        Returns (final latents fp32, sampler name, number of model evaluations)."""
        name, plan = make_plan(sampler, self.scheduler_config, num_inference_steps, sampler_options)
        gen = generator[0] if isinstance(generator, list) else generator
        x = latents.to(torch.float32) * plan.init_noise_scale
        out = run_plan(plan, model_fn, x, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                       generator=gen, progress=self.progress, callback=callback)
        return out, name, len(plan.calls)
