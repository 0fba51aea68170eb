"""Text-to-image with PixArt-alpha / PixArt-sigma (T5 encoder, cross-attention DiT), as diffusers'
PixArtAlphaPipeline / PixArtSigmaPipeline with ``use_resolution_binning=False`` and ``clean_caption=False``."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from velodiff.pipelines.base import (BasePipeline, PipelineOutput, check_call_args, image_size, native_image_size,
                                     randn_tensor, warn_prompt_issues)
from velodiff.pipelines.stable_diffusion import _as_list


class PixArtPipeline(BasePipeline):
    """PixArt transformer + T5 encoder + AutoencoderKL. ``sigma=True`` for PixArt-sigma (300 tokens, no
    resolution micro-conditions)."""

    sigma = False
    DEFAULT_GUIDANCE_SCALE = 4.5  # diffusers' PixArtAlphaPipeline / PixArtSigmaPipeline

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _encode(self, texts: List[str], max_length: int, num_images: int):
        tok = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        emb = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)
        return emb.repeat_interleave(num_images, dim=0), mask.repeat_interleave(num_images, dim=0)

    def transformer_fn(self, emb, mask, neg_emb, neg_mask, added):
        channels = self.transformer.config.in_channels
        guided = neg_emb is not None
        if guided:
            emb, mask = torch.cat([neg_emb, emb]), torch.cat([neg_mask, mask])
            if added is not None:
                added = {k: torch.cat([v, v]) for k, v in added.items()}

        # learned sigma: the sampler uses the noise prediction (the first `channels` channels) only
        def call(batch, ts, rows):
            return self.transformer(batch, emb[rows], ts, encoder_attention_mask=mask[rows],
                                    added_cond_kwargs=None if added is None else {k: v[rows] for k, v in added.items()})
        return self.guided_fn(call, guided, cond_first=False, channels=channels)

    @property
    def native_size(self):
        """The image side the transformer was trained at: ``sample_size`` latents x the VAE factor."""
        return native_image_size(self.transformer.config.sample_size, self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], negative_prompt: Union[str, List[str]] = "",
                 num_inference_steps: int = 20, guidance_scale: Optional[float] = None,
                 num_images_per_prompt: int = 1, height: Optional[int] = None, width: Optional[int] = None,
                 generator=None, output_type: str = "pil", max_sequence_length: Optional[int] = None,
                 sampler: Optional[str] = None, sampler_options: Optional[Dict[str, Any]] = None,
                 callback=None) -> PipelineOutput:
        """Generate images for ``prompt`` (diffusers' PixArt arguments and defaults; no resolution binning).
        ``guidance_scale`` None means the folder's default (``pipe.defaults``), else diffusers' 4.5; ``height`` /
        ``width`` must be positive multiples of the VAE factor x the patch size, at most
        :data:`velodiff.pipelines.base.MAX_SIZE_FACTOR` x the native size. Prompts longer than
        ``max_sequence_length`` tokens (default 120, sigma 300) are cut and unknown words dropped, with one
        :class:`velodiff.pipelines.base.PromptWarning` per call. Every argument is checked, and the sampler plan
        built, before the text encoder runs."""
        prompts = _as_list(prompt, "prompt")
        negatives = _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts")
        guidance_scale = self.resolve_guidance(guidance_scale)
        check_call_args(num_inference_steps, guidance_scale, output_type, num_images_per_prompt)
        if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or
                                                isinstance(max_sequence_length, bool) or max_sequence_length < 1):
            raise ValueError(f"max_sequence_length must be a positive integer, got {max_sequence_length!r}")
        factor, patch = self.vae_scale_factor, self.transformer.config.patch_size
        height, width = image_size(height, width, self.native_size, factor * patch,
                                   f"the VAE factor {factor} x the patch size {patch}")
        plan = self.make_plan(sampler, num_inference_steps, sampler_options)
        max_length = max_sequence_length or (300 if self.sigma else 120)
        guided = guidance_scale > 1.0
        checks = [("prompt", self.tokenizer, prompts, max_length)]
        if guided:
            checks.append(("negative_prompt", self.tokenizer, negatives, max_length))
        warn_prompt_issues(checks)
        n = num_images_per_prompt
        emb, mask = self._encode(prompts, max_length, n)
        neg_emb = neg_mask = None
        if guided:
            neg_emb, neg_mask = self._encode(negatives, emb.shape[1], n)
        batch = len(prompts) * n
        added = None
        if not self.sigma and self.transformer.config.sample_size == 128:
            # PixArt-alpha 1024px micro-conditions: the requested size and its aspect ratio
            added = {"resolution": torch.tensor([[height, width]], dtype=self.dtype,
                                                device=self.device).repeat(batch, 1),
                     "aspect_ratio": torch.tensor([[height / width]], dtype=self.dtype,
                                                  device=self.device).repeat(batch, 1)}
        shape = (batch, self.transformer.config.in_channels, height // factor, width // factor)
        latents = randn_tensor(shape, generator, self.device, self.dtype)
        final, name, nfe = self.denoise(self.transformer_fn(emb, mask, neg_emb, neg_mask, added), latents, plan,
                                        guidance_scale if guided else None, generator, callback=callback)
        return self.finish(final, name, nfe, output_type)


class PixArtSigmaPipeline(PixArtPipeline):
    sigma = True
