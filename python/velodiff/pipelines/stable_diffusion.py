"""Text-to-image for Stable Diffusion 1.x / 2.x and SDXL, following diffusers' pipelines call for call so that
the same seed gives the same image."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from velodiff.pipelines.base import (BasePipeline, PipelineOutput, check_call_args, image_size, native_image_size,
                                     randn_tensor, warn_prompt_issues)
from velodiff.pipelines.img2img import img2img_denoise, img2img_plan, preprocess_image

Prompt = Union[str, List[str]]


def _as_list(prompt: Prompt, name: str) -> List[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


class StableDiffusionPipeline(BasePipeline):
    """SD 1.x / 2.x text-to-image: CLIP text encoder, UNet2DConditionModel, AutoencoderKL."""

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _encode(self, texts: List[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(self.device)
        return self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]

    def encode_prompt(self, prompt: List[str], negative_prompt: Optional[List[str]], num_images: int,
                      guided: bool):
        """([B*n, L, D] prompt embeddings, same for the negative prompt or None)."""
        emb = self._encode(prompt).to(self.dtype).repeat_interleave(num_images, dim=0)
        neg = None
        if guided:
            neg_texts = negative_prompt if negative_prompt is not None else [""] * len(prompt)
            if len(neg_texts) != len(prompt):
                raise ValueError(f"negative_prompt has {len(neg_texts)} entries for {len(prompt)} prompts")
            neg = self._encode(neg_texts).to(self.dtype).repeat_interleave(num_images, dim=0)
        return emb, neg

    def unet_fn(self, cond: Dict[str, torch.Tensor], uncond: Optional[Dict[str, torch.Tensor]]):
        """The model callable of the sampling loop: one UNet call on the CFG batch [uncond, cond] (with
        :attr:`cfg_mode` "split": a call on the conditional, then one on the unconditional inputs)."""
        split = uncond is not None and self.cfg_mode == "split"

        def fn(x: torch.Tensor, t: float):
            x = x.to(self.dtype)
            ts = torch.tensor(t, device=self.device)
            if uncond is None:
                return self.unet(x, ts, cond["encoder_hidden_states"], added_cond_kwargs=cond.get("added"))
            if split:
                return self.split_cfg_calls(
                    lambda c: self.unet(x, ts, c["encoder_hidden_states"], added_cond_kwargs=c.get("added")),
                    cond, uncond)
            both = {k: torch.cat([uncond[k], cond[k]]) for k in ("encoder_hidden_states",)}
            added = None
            if cond.get("added") is not None:
                added = {k: torch.cat([uncond["added"][k], cond["added"][k]]) for k in cond["added"]}
            out = self.unet(torch.cat([x, x]), ts, both["encoder_hidden_states"], added_cond_kwargs=added)
            out_uncond, out_cond = out.chunk(2)
            return out_cond, out_uncond
        fn.cfg = "none" if uncond is None else ("split" if split else "batched")  # read by the call's context
        fn.cond_first = False
        return fn

    def conditioning(self, prompt: List[str], negative_prompt: Optional[List[str]], num_images: int, guided: bool,
                     height: int, width: int):
        emb, neg = self.encode_prompt(prompt, negative_prompt, num_images, guided)
        return {"encoder_hidden_states": emb}, (None if neg is None else {"encoder_hidden_states": neg})

    def prompt_checks(self, prompts: List[str], negatives: Optional[List[str]], guided: bool):
        """(argument, tokenizer, texts, max_length) for :func:`velodiff.pipelines.base.warn_prompt_issues`: what
        this call's text encoders read."""
        tokenizers = [t for t in (self.tokenizer, getattr(self, "tokenizer_2", None)) if t is not None]
        checks = [("prompt", t, prompts, t.model_max_length) for t in tokenizers]
        if guided and negatives is not None:
            checks += [("negative_prompt", t, negatives, t.model_max_length) for t in tokenizers]
        return checks

    @property
    def native_size(self):
        """The image side the UNet was configured for: ``sample_size`` x the VAE factor (512 for SD 1.5)."""
        return native_image_size(self.unet.config.sample_size, self.vae_scale_factor)

    @torch.no_grad()
    def __call__(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, num_inference_steps: int = 50,
                 guidance_scale: Optional[float] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_images_per_prompt: int = 1, generator=None, output_type: str = "pil",
                 sampler: Optional[str] = None, sampler_options: Optional[Dict[str, Any]] = None,
                 guidance_rescale: float = 0.0, latents: Optional[torch.Tensor] = None,
                 callback=None, image=None, strength: Optional[float] = None) -> PipelineOutput:
        """Generate images for ``prompt`` (diffusers' argument names and defaults). ``sampler`` is any name of
        :data:`velodiff.sampling.SAMPLERS` (default: the folder's scheduler); ``sampler_options`` go to it
        (e.g. ``{"eta": 0.5}`` for ddim). ``guidance_scale`` None means the folder's default (``pipe.defaults``,
        from model_index.json ``_velodiff_defaults``), else diffusers' (7.5; SDXL 5.0). ``height`` / ``width``
        (default: the model's native size) must be positive multiples of the VAE factor and at most
        :data:`velodiff.pipelines.base.MAX_SIZE_FACTOR` x the native size. A prompt longer than the tokenizer's
        ``model_max_length`` is cut and words the tokenizer does not know are dropped, as in diffusers; both give
        one :class:`velodiff.pipelines.base.PromptWarning` per call.

        Image-to-image when ``image`` is given (a PIL image, a list of them, or a [B, 3, H, W] tensor in [-1, 1] or
        [0, 1], finite, H and W multiples of the VAE factor): the image is encoded, noised to the point
        ``N - int(N * strength)`` of the N-step schedule (``strength`` in (0, 1], default 0.8) and denoised from
        there, as diffusers' ``StableDiffusion(XL)Img2ImgPipeline``; the output has the image's size
        (height/width, if given, must match it) and ``latents`` cannot be given. ``strength`` without ``image`` is
        an error.

        Every argument is checked, and the sampler plan built, before the text encoder runs."""
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
        guidance_scale = self.resolve_guidance(guidance_scale)
        check_call_args(num_inference_steps, guidance_scale, output_type, num_images_per_prompt, guidance_rescale)
        factor = self.vae_scale_factor
        if image is None:
            if strength is not None:
                raise ValueError(f"strength={strength!r} is for image-to-image: pass image= too (strength says how "
                                 "far the image is noised), or drop strength")
            height, width = image_size(height, width, self.native_size, factor)
            plan = self.make_plan(sampler, num_inference_steps, sampler_options)
        else:
            if latents is not None:
                raise ValueError("latents cannot be given together with image")
            image = preprocess_image(image, factor)
            size = (int(image.shape[2]), int(image.shape[3]))
            if (size[0] if height is None else height, size[1] if width is None else width) != size:
                raise ValueError(f"image is {size[0]}x{size[1]} but height x width is {height}x{width}")
            height, width = image_size(size[0], size[1], self.native_size, factor)
            plan = img2img_plan(self, sampler, num_inference_steps, 0.8 if strength is None else strength,
                                sampler_options)
        batch = len(prompts) * num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("latents has NaN or infinite values; pass finite initial noise")
        guided = guidance_scale > 1.0 and getattr(self.unet.config, "time_cond_proj_dim", None) is None
        warn_prompt_issues(self.prompt_checks(prompts, negatives, guided))
        cond, uncond = self.conditioning(prompts, negatives, num_images_per_prompt, guided, height, width)
        model_fn = self.unet_fn(cond, uncond)
        guidance = guidance_scale if guided else None
        if image is not None:
            final, name, nfe = img2img_denoise(self, model_fn, image, batch, plan, guidance, generator,
                                               guidance_rescale=guidance_rescale, callback=callback)
            return self.finish(final, name, nfe, output_type)
        if latents is None:
            latents = randn_tensor(shape, generator, self.device, self.dtype)
        final, name, nfe = self.denoise(model_fn, latents.to(self.device), plan, guidance, generator,
                                        guidance_rescale=guidance_rescale, callback=callback)
        return self.finish(final, name, nfe, output_type)


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL text-to-image: two CLIP encoders (penultimate hidden states concatenated; pooled projection of the
    second), the text_time added conditioning (original size, crop, target size)."""

    DEFAULT_GUIDANCE_SCALE = 5.0  # diffusers' StableDiffusionXL(Img2Img)Pipeline

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.components.get("_model_index", {}).get("force_zeros_for_empty_prompt", True))

    def _encode_xl(self, texts: List[str]):
        embeds, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].dim() == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def conditioning(self, prompt, negative_prompt, num_images, guided, height, width):
        emb, pooled = self._encode_xl(prompt)
        n = num_images
        emb = emb.to(self.dtype).repeat_interleave(n, dim=0)
        pooled = pooled.to(self.dtype).repeat_interleave(n, dim=0)
        # micro-conditioning (SDXL paper, section 2.2): (original_size, crops_coords_top_left, target_size)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        time_ids = time_ids.repeat(emb.shape[0], 1)
        cond = {"encoder_hidden_states": emb, "added": {"text_embeds": pooled, "time_ids": time_ids}}
        if not guided:
            return cond, None
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            neg, neg_pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
        else:
            texts = negative_prompt if negative_prompt is not None else [""] * len(prompt)
            if len(texts) != len(prompt):
                raise ValueError(f"negative_prompt has {len(texts)} entries for {len(prompt)} prompts")
            neg, neg_pooled = self._encode_xl(texts)
            neg = neg.to(self.dtype).repeat_interleave(n, dim=0)
            neg_pooled = neg_pooled.to(self.dtype).repeat_interleave(n, dim=0)
        return cond, {"encoder_hidden_states": neg, "added": {"text_embeds": neg_pooled, "time_ids": time_ids}}
