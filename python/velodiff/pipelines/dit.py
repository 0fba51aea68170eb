"""Class-conditional generation with DiT (Peebles & Xie 2023), as diffusers' DiTPipeline: classifier-free
guidance with the null class, the learned-sigma channels dropped before the sampler."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from velodiff.pipelines.base import BasePipeline, PipelineOutput, check_call_args, randn_tensor


class DiTPipeline(BasePipeline):
    """DiT transformer + AutoencoderKL; ``class_labels`` are ImageNet-style integer labels."""

    def transformer_fn(self, labels: torch.Tensor, guided: bool):
        channels = self.transformer.config.in_channels
        null = torch.full_like(labels, self.transformer.config.num_embeds_ada_norm)

        conditioning = torch.cat([labels, null]) if guided else labels
        # learned sigma: the sampler uses the noise prediction (the first `channels` channels) only
        return self.guided_fn(lambda batch, ts: self.transformer(batch, ts, conditioning), guided, cond_first=True,
                              channels=channels)

    @torch.no_grad()
    def __call__(self, class_labels: Sequence[int], guidance_scale: float = 4.0, generator=None,
                 num_inference_steps: int = 50, output_type: str = "pil", sampler: Optional[str] = None,
                 sampler_options: Optional[Dict[str, Any]] = None, callback=None) -> PipelineOutput:
        """Generate one image per label (diffusers' DiTPipeline arguments; guidance when > 1)."""
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels: List[int] = list(class_labels)
        num_classes = self.transformer.config.num_embeds_ada_norm
        if not labels or not all(isinstance(c, int) and 0 <= c < num_classes for c in labels):
            raise ValueError(f"class_labels must be integers in [0, {num_classes}), got {class_labels!r}")
        check_call_args(num_inference_steps, guidance_scale, output_type, 1)
        guided = guidance_scale > 1.0
        size, channels = self.transformer.config.sample_size, self.transformer.config.in_channels
        latents = randn_tensor((len(labels), channels, size, size), generator, self.device, self.dtype)
        label_t = torch.tensor(labels, device=self.device, dtype=torch.int64)
        final, name, nfe = self.denoise(self.transformer_fn(label_t, guided), latents, num_inference_steps, sampler,
                                        guidance_scale if guided else None, generator,
                                        sampler_options=sampler_options, callback=callback)
        return self.finish(final, name, nfe, output_type)
