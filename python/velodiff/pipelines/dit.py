"""Class-conditional generation with DiT (Peebles & Xie 2023), as diffusers' DiTPipeline: classifier-free
guidance with the null class, the learned-sigma channels dropped before the sampler."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from velodiff.pipelines.base import (BasePipeline, PipelineOutput, check_call_args, image_size, native_image_size,
                                     randn_tensor)


class DiTPipeline(BasePipeline):
    """DiT transformer + AutoencoderKL; ``class_labels`` are ImageNet-style integer labels."""

    DEFAULT_GUIDANCE_SCALE = 4.0  # diffusers' DiTPipeline

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self):
        """The image side the transformer was trained at: ``sample_size`` latents x the VAE factor."""
        return native_image_size(self.transformer.config.sample_size, self.vae_scale_factor)

    def transformer_fn(self, labels: torch.Tensor, guided: bool):
        channels = self.transformer.config.in_channels
        null = torch.full_like(labels, self.transformer.config.num_embeds_ada_norm)

        conditioning = torch.cat([labels, null]) if guided else labels
        # learned sigma: the sampler uses the noise prediction (the first `channels` channels) only
        return self.guided_fn(lambda batch, ts, rows: self.transformer(batch, ts, conditioning[rows]), guided,
                              cond_first=True,
                              channels=channels)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int], guidance_scale: Optional[float] = None, generator=None,
                 num_inference_steps: int = 50, output_type: str = "pil", sampler: Optional[str] = None,
                 sampler_options: Optional[Dict[str, Any]] = None, callback=None, height: Optional[int] = None,
                 width: Optional[int] = None) -> PipelineOutput:
        """Generate one image per label (diffusers' DiTPipeline arguments; guidance when > 1). ``guidance_scale``
        None means the folder's default (``pipe.defaults``), else diffusers' 4.0.

        ``height`` / ``width`` (default: the native size) may differ from the training size, as diffusers'
        ``DiTTransformer2DModel`` allows (its PatchEmbed recomputes the 2-D sin-cos table for the new token grid,
        stretched to the training grid; diffusers' DiTPipeline itself always uses the native size). DiT images are
        square (diffusers' DiT unpatchifies a square grid): height and width must be equal, positive multiples of
        the VAE factor x the patch size, at most :data:`velodiff.pipelines.base.MAX_SIZE_FACTOR` x the native
        size. Every argument is checked, and the sampler plan built, before the transformer runs."""
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels: List[int] = list(class_labels)
        num_classes = self.transformer.config.num_embeds_ada_norm
        if not labels or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes
                                 for c in labels):
            raise ValueError(f"class_labels must be integers in [0, {num_classes}), got {class_labels!r}")
        guidance_scale = self.resolve_guidance(guidance_scale)
        check_call_args(num_inference_steps, guidance_scale, output_type, 1)
        factor, patch = self.vae_scale_factor, self.transformer.config.patch_size
        height, width = image_size(height if height is not None else width,
                                   width if width is not None else height, self.native_size, factor * patch,
                                   f"the VAE factor {factor} x the patch size {patch}")
        if height != width:
            raise ValueError(f"height ({height}) and width ({width}) must be equal: DiT makes square images "
                             "(diffusers' DiTTransformer2DModel unpatchifies a square token grid)")
        plan = self.make_plan(sampler, num_inference_steps, sampler_options)
        guided = guidance_scale > 1.0
        channels = self.transformer.config.in_channels
        latents = randn_tensor((len(labels), channels, height // factor, width // factor), generator, self.device,
                               self.dtype)
        label_t = torch.tensor(labels, device=self.device, dtype=torch.int64)
        final, name, nfe = self.denoise(self.transformer_fn(label_t, guided), latents, plan,
                                        guidance_scale if guided else None, generator, callback=callback)
        return self.finish(final, name, nfe, output_type)
