"""StreamDiffusion (Kodaira et al. 2023, arXiv 2312.12491) on a velodiff Stable Diffusion pipeline: image-to-image
on a stream of frames at one denoiser call per frame.

**Stream batch** (section 3.1). With n slots (``t_index_list``), the batch holds n frames, slot s at timestep
``timesteps[s]``: each call adds the new frame at slot 0 and advances every row by one LCM step, so the frame at
slot n - 1 comes out denoised. A frame's result therefore appears n - 1 frames after it went in (the latency is
n frames). Each row is updated exactly as ``pipe(prompt, image=frame, sampler="lcm", strength=1,
sampler_options={"timesteps": timesteps}, generator=torch.Generator().manual_seed(seed))`` updates its one frame:
the same VAE posterior draw, start noise and per-step noises, fixed for the stream (drawn once, in the pipeline's
order), the same fused update op and coefficients. Batching only reschedules the work.

**Warm-up.** The peer fills the empty slots with zeros, so its first n - 1 outputs are brown. Here the first frame
of a stream is first run alone through slots 0 .. n - 2 (n - 1 calls of batch 1) and its states fill the empty
slots, as if the frame had been streamed before: the outputs of the first n calls are all the first frame's
result, then call k returns frame k - n + 1's. :meth:`StreamPipeline.flush` returns the frames still in flight.

**Residual CFG** (section 3.2). ``cfg_type``: ``"none"`` (n rows, no guidance), ``"full"`` (2n rows, a true
negative prompt for every row), ``"self"`` (n rows) and ``"initialize"`` (n + 1 rows: the new frame once more with
the negative prompt). Guidance is ``delta e_neg + gamma (e_c - delta e_neg)`` (the fused update op's residual
form), formed on noise predictions as in the paper (a v-prediction model's output is converted first). RCFG
replaces the negative prediction e_neg by the *virtual residual noise* pointing from the row's latent x_t to a
reference latent R of its frame, ``(x_t - alpha_t R) / sigma_t``. Self-negative: R is the frame's encoded input
latent. Onetime-negative: R is the data prediction of the true negative-prompt output at slot 0, computed once per
frame and carried with the frame through the later slots. (The peer's code propagates a linearised update of that
noise from slot to slot; the definition in the paper, section 3.2, is used here.)

**Similarity filter** (section 3.4, :mod:`velodiff.stream.similarity`): a skipped frame costs nothing and returns
the previous output again. **Text-embedding cache**: the prompt is encoded once per (prompt, negative prompt,
size); switching back to a prompt used before reuses its embeddings. **Tiny VAE**: ``vae=`` takes an
``AutoencoderTiny`` (TAESD) for encoding and decoding.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from velodiff import ops
from velodiff.lora import apply_pending
from velodiff.pipelines.base import OUTPUT_TYPES, postprocess, randn_tensor
from velodiff.pipelines.img2img import noised_start, preprocess_image
from velodiff.sampling.plan import randn_like_diffusers
from velodiff.stream.schedule import check_cfg, check_t_index_list, stream_schedule
from velodiff.stream.similarity import SimilarityFilter, check_filter_args

#: how many (prompt, negative prompt, size) embeddings the text-embedding cache keeps
EMBEDDING_CACHE_SIZE = 16


def vae_factor(vae) -> int:
    """How many pixels one latent spans along a side: 2 ** (stages - 1) for AutoencoderKL and AutoencoderTiny."""
    config = vae.config
    stages = getattr(config, "block_out_channels", None) or getattr(config, "encoder_block_out_channels", None)
    if not stages:
        raise ValueError(f"vae: cannot tell the scale factor of a {type(vae).__name__}")
    return 2 ** (len(stages) - 1)


def check_vae(vae, pipe) -> int:
    """The stream VAE's scale factor; ValueError naming ``vae`` when its latents cannot be the UNet's (other
    channels, or another factor than the pipeline's own VAE)."""
    factor = vae_factor(vae)
    channels, wanted = getattr(vae.config, "latent_channels", None), pipe.unet.config.in_channels
    if channels != wanted:
        raise ValueError(f"vae: it has {channels} latent channels but the UNet takes {wanted}")
    own = getattr(pipe, "vae", None)
    if own is not None and own is not vae and vae_factor(own) != factor:
        raise ValueError(f"vae: its scale factor is {factor} but the pipeline's VAE has {vae_factor(own)}; the UNet "
                         f"works in that VAE's latent space")
    return factor


@dataclass
class StreamOutput:
    """One output of the stream: ``image`` (in the stream's output type, one image), ``index`` the input frame
    (0-based, counting skipped ones) whose result it is, ``skipped`` whether the frame just given was skipped by
    the similarity filter (the image then repeats the previous output)."""

    image: Any
    index: int
    skipped: bool = False


class StreamPipeline:
    """Real-time image-to-image on a stream of frames (see the module docstring).

    Args:
        pipe: a velodiff Stable Diffusion pipeline (SD 1.x / 2.x / SDXL, with its UNet, VAE and text encoders).
        t_index_list: the slots' indices into the ``num_inference_steps``-point LCM discretisation, strictly
            increasing (noisiest first); e.g. [32, 45] for 50 steps (t = 359, 99).
        prompt, negative_prompt: the text conditions (change them with :meth:`set_prompt`); no negative prompt
            means the pipeline's default negative condition (the empty prompt; zeros for SDXL).
        guidance_scale, delta: gamma and delta of the guidance (``cfg_type`` other than "none"); StreamDiffusion's
            defaults 1.2 and 1.0.
        cfg_type: "none", "full", "self" (default) or "initialize" (see the module docstring).
        seed: seeds the stream's fixed noises (and the similarity filter's draws).
        use_denoising_batch: False runs each frame through its n steps at once (n calls of batch 1, no latency):
            the sequential baseline.
        similarity_threshold: None (no filter) or the filter's threshold in [0, 1] (0.98 in the paper).
        max_skip_frame: the longest run of skipped frames (default 10).
        vae: a VAE to encode and decode with instead of ``pipe.vae`` (e.g. an ``AutoencoderTiny``).
        output_type: "pil" (default), "np", "pt" or "latent".
    """

    def __init__(self, pipe, t_index_list: Sequence[int] = (32, 45), *, prompt: str = "",
                 negative_prompt: Optional[str] = None, num_inference_steps: int = 50, guidance_scale: float = 1.2,
                 delta: float = 1.0, cfg_type: str = "self", seed: int = 2, use_denoising_batch: bool = True,
                 similarity_threshold: Optional[float] = None, max_skip_frame: int = 10, vae=None,
                 output_type: str = "pil"):
        if not hasattr(pipe, "conditioning") or not hasattr(pipe, "unet"):
            raise TypeError(f"pipe must be a velodiff Stable Diffusion pipeline (a UNet with text conditioning), "
                            f"got {type(pipe).__name__}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or not 1 <= num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps must be an integer in [1, 1000], got {num_inference_steps!r}")
        check_cfg(cfg_type, guidance_scale, delta)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.pipe = pipe
        self.vae = vae if vae is not None else getattr(pipe, "vae", None)
        if self.vae is None:
            raise ValueError("vae: the pipeline has no VAE; pass vae= (e.g. an AutoencoderTiny)")
        self.vae_factor = check_vae(self.vae, pipe)
        self.device = pipe.device
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.delta = float(delta)
        self.cfg_type = cfg_type
        self.seed = seed
        self.use_denoising_batch = bool(use_denoising_batch)
        self.output_type = output_type
        if similarity_threshold is None:
            check_filter_args(1.0, max_skip_frame)  # checked even when unused
            self.filter = None
        else:
            self.filter = SimilarityFilter(similarity_threshold, max_skip_frame, seed=seed)
        self._embeddings: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._rows: Dict[Tuple[str, int], Dict[str, Any]] = {}
        self._prompt = ("", None, None, None)  # (prompt, negative prompt, prompt_embeds, negative_prompt_embeds)
        self.set_prompt(prompt, negative_prompt)
        self.frames_in = 0      # frames given to the stream (skipped ones included)
        self.model_calls = 0    # denoiser calls (each on the whole batch)
        self.set_t_index_list(t_index_list)

    # --- configuration ---------------------------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.schedule.slots

    @property
    def batch_size(self) -> int:
        """Rows of one denoiser call in stream batch: n, 2n ("full") or n + 1 ("initialize")."""
        n = self.slots
        return {"full": 2 * n, "initialize": n + 1}.get(self.cfg_type, n)

    def set_t_index_list(self, t_index_list: Sequence[int]) -> None:
        """Move the slots to other timesteps (their number may change). The schedule, the fixed noises and the
        batch buffers are rebuilt; frames in flight are dropped (call :meth:`flush` first to get them) and the
        next frame warms the stream up again."""
        indices = check_t_index_list(t_index_list, self.num_inference_steps)
        residual = self.cfg_type in ("self", "initialize")
        self.schedule = stream_schedule(self.pipe.scheduler_config, indices, self.num_inference_steps,
                                        self.guidance_scale, self.delta, residual, self.device)
        self.t_index_list = indices
        self._timestep_rows = torch.tensor([float(t) for t in self.schedule.timesteps], device=self.device)
        self.reset()

    def set_prompt(self, prompt: Optional[str] = None, negative_prompt: Optional[str] = None, *,
                   prompt_embeds: Optional[torch.Tensor] = None,
                   negative_prompt_embeds: Optional[torch.Tensor] = None) -> None:
        """Change the text condition from the next frame on (frames in flight finish under the new one). Either
        text (encoded once, then cached) or, for SD 1.x / 2.x, ``prompt_embeds`` [1, L, D] (and
        ``negative_prompt_embeds`` for the "full" / "initialize" guidance)."""
        if prompt_embeds is None and negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds needs prompt_embeds")
        if prompt_embeds is not None:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("give either prompt text or prompt_embeds, not both")
            for name, value in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
                if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 3
                                          or value.shape[0] != 1):
                    raise ValueError(f"{name} must be a [1, L, D] tensor, got "
                                     f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)}")
            if self.cfg_type in ("full", "initialize") and negative_prompt_embeds is None:
                raise ValueError(f"cfg_type={self.cfg_type!r} needs negative_prompt_embeds with prompt_embeds")
            self._prompt = (None, None, prompt_embeds, negative_prompt_embeds)
        else:
            for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{name} must be a string, got {type(value).__name__}")
            old_prompt, old_negative = self._prompt[:2]
            self._prompt = ((old_prompt or "") if prompt is None else prompt,
                            old_negative if negative_prompt is None else negative_prompt, None, None)
        self._rows.clear()

    def reset(self) -> None:
        """Empty the stream: frames in flight are dropped, the noises re-drawn for the next frame (whose size may
        differ), the filter forgets its reference."""
        self._size: Optional[Tuple[int, int]] = None
        self._x: Optional[torch.Tensor] = None      # [n, C, h, w] fp32: slot s holds a frame at timesteps[s]
        self._ref: Optional[torch.Tensor] = None    # [n, C, h, w] fp32: the rows' RCFG reference latents
        self._ids: List[Optional[int]] = []         # the input index of each slot's frame
        self._last: Optional[StreamOutput] = None
        self._last_index = -1
        self._posterior_eps: Optional[torch.Tensor] = None  # the stream's fixed draws (see _draw_noises)
        self._start_noise: Optional[torch.Tensor] = None
        self._call_noise: List[torch.Tensor] = []
        self._rows.clear()  # the conditions of SDXL depend on the size
        if self.filter is not None:
            self.filter.reset()

    # --- conditioning ----------------------------------------------------------------------------------------------

    def _conditioning(self, height: int, width: int):
        """(cond, uncond) of the current prompt at this size, through the text-embedding cache."""
        prompt, negative, embeds, negative_embeds = self._prompt
        if embeds is not None:
            to = dict(device=self.device, dtype=self.pipe.dtype)
            return ({"encoder_hidden_states": embeds.to(**to)},
                    None if negative_embeds is None else {"encoder_hidden_states": negative_embeds.to(**to)})
        key = (prompt, negative, height, width)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        value = self.pipe.conditioning([prompt], None if negative is None else [negative], 1, True, height, width)
        self._embeddings[key] = value
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return value

    def _condition_rows(self, which: str, k: int) -> Dict[str, Any]:
        """The condition ``which`` ("cond" / "uncond") repeated to k rows (kept until the prompt or size changes)."""
        key = (which, k)
        if key not in self._rows:
            cond, uncond = self._conditioning(*self._size)
            c = cond if which == "cond" else uncond
            if c is None:
                raise ValueError(f"cfg_type={self.cfg_type!r} needs a negative condition")
            added = c.get("added")
            self._rows[key] = {
                "encoder_hidden_states": c["encoder_hidden_states"].repeat(k, 1, 1),
                "added": None if added is None else {n: v.repeat(k, *([1] * (v.dim() - 1))) for n, v in added.items()}}
        return self._rows[key]

    # --- the denoiser and the update -------------------------------------------------------------------------------

    def _model(self, x: torch.Tensor, slots: List[int], negative_first: bool):
        """One denoiser call on rows ``x`` [k, C, h, w] (fp32) at ``slots``. Returns (cond out [k], the true
        negative outputs [k] for "full", else None, the negative output [1] of row 0 for "initialize" when
        ``negative_first``, else None)."""
        t = self._timestep_rows[slots]
        x = x.to(self.pipe.dtype)
        parts = [("cond", x, t)]  # (condition, rows, timesteps), negative rows first as the pipeline's CFG batch
        if self.cfg_type == "full":
            parts.insert(0, ("uncond", x, t))
        elif negative_first:
            parts.insert(0, ("uncond", x[:1], t[:1]))
        conds = [self._condition_rows(which, rows.shape[0]) for which, rows, _ in parts]
        emb = torch.cat([c["encoder_hidden_states"] for c in conds])
        added = None
        if conds[0]["added"] is not None:
            added = {name: torch.cat([c["added"][name] for c in conds]) for name in conds[0]["added"]}
        inputs = torch.cat([rows for _, rows, _ in parts])
        times = torch.cat([ts for _, _, ts in parts])
        out = self.pipe.unet(inputs, times, emb, added_cond_kwargs=added)
        self.model_calls += 1
        if self.cfg_type == "full":
            uncond, cond = out.chunk(2)
            return cond, uncond, None
        if negative_first:
            return out[1:], None, out[:1]
        return out, None, None

    def _advance(self, x: torch.Tensor, ref: Optional[torch.Tensor], slots: List[int], cond: torch.Tensor,
                 uncond: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """Each row's LCM update from its slot to the next (the last slot: its denoised latent), [1, C, h, w] fp32
        each; the update op and coefficients of the pipeline's ``lcm`` plan."""
        out = []
        n = self.slots
        for r, s in enumerate(slots):
            row = x[r:r + 1]
            c = cond[r:r + 1]
            u = None
            if self.cfg_type == "full":
                u = uncond[r:r + 1].contiguous()
            elif ref is not None:  # RCFG: the virtual noise pointing from the row to its reference (eq. 9)
                sc = self.schedule
                c = c.float()
                if sc.to_epsilon:  # the conditional output as a noise prediction
                    c = (row - sc.alpha[s] * (sc.p_x[s] * row + sc.p_m[s] * c)) / sc.sigma[s]
                u = ((row - sc.alpha[s] * ref[r:r + 1]) / sc.sigma[s]).contiguous()
            noise = self._call_noise[s] if s + 1 < n else None
            x_next, _ = ops.sampler_update(row.contiguous(), c.contiguous(), u, None, noise, None,
                                           self.schedule.table[s])
            out.append(x_next)
        return out

    def _denoise(self, x: torch.Tensor, ref: Optional[torch.Tensor], slots: List[int]) -> List[torch.Tensor]:
        """One call on rows at ``slots`` and their updates; for "initialize" the reference of a slot-0 row is
        set from the true negative output first (in ``ref``, in place)."""
        negative_first = self.cfg_type == "initialize" and slots[0] == 0
        cond, uncond, negative = self._model(x, slots, negative_first)
        if negative_first:
            ref[:1] = self.schedule.p_x[0] * x[:1] + self.schedule.p_m[0] * negative.float()
        return self._advance(x, ref, slots, cond, uncond)

    # --- frames in, frames out -------------------------------------------------------------------------------------

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Model latents [1, C, h, w] (pipe dtype) of pixels [1, 3, H, W]: the VAE posterior sample with the
        stream's fixed draw (drawn here with the other noises on the first frame), or a tiny VAE's latents."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = self.vae.encode(pixels.to(device=self.device, dtype=vae_dtype))
        if not isinstance(z, torch.Tensor):  # a posterior: its sample with the fixed eps
            if self._posterior_eps is None:
                self._draw_noises(tuple(z.mean.shape), z.mean.dtype)
            z = z.sample(eps=self._posterior_eps)
        elif self._start_noise is None:
            self._draw_noises(None, None)
        return self.vae.vae_to_latents(z).to(self.pipe.dtype)

    def _draw_noises(self, posterior_shape, posterior_dtype) -> None:
        """The stream's fixed draws, in the order of image-to-image with a generator seeded with ``seed``: the
        posterior sample, the start noise, one noise per step but the last."""
        gen = torch.Generator().manual_seed(self.seed)
        if posterior_shape is not None:
            self._posterior_eps = randn_like_diffusers(posterior_shape, gen, self.device, posterior_dtype)
        h, w = self._size
        factor = self.vae_factor
        shape = (1, self.pipe.unet.config.in_channels, h // factor, w // factor)
        self._start_noise = randn_tensor(shape, gen, self.device, self.pipe.dtype)
        self._call_noise = [randn_like_diffusers(shape, gen, self.device).contiguous()
                            for _ in range(self.slots - 1)]


    def _decode(self, latents: torch.Tensor):
        if self.output_type == "latent":
            return latents
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(self.vae.latents_to_vae(latents.to(vae_dtype)))
        out = postprocess(image, self.output_type)
        return out[0] if self.output_type == "pil" else out

    def _pixels(self, image) -> torch.Tensor:
        """One frame as [1, 3, H, W] fp32 in [-1, 1], checked against the stream's size."""
        pixels = preprocess_image(image, self.vae_factor)
        if pixels.shape[0] != 1:
            raise ValueError(f"image: give one frame per call, got a batch of {pixels.shape[0]}")
        size = (int(pixels.shape[2]), int(pixels.shape[3]))
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(f"image: frame {self.frames_in} is {size[0]}x{size[1]} but the stream runs at "
                             f"{self._size[0]}x{self._size[1]}; all frames of a stream must have one size "
                             f"(call reset() before changing it)")
        return pixels

    def _frame_state(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slot-0 state [1, C, h, w] fp32, encoded latent fp32) of one frame's pixels."""
        latents = self._encode(pixels)
        x = noised_start(self.schedule.start, latents, None, noise=self._start_noise)
        return x, latents.float()

    def step(self, image) -> StreamOutput:
        """Give the next frame (a PIL image or a [1, 3, H, W] / [3, H, W] tensor in [-1, 1] or [0, 1]; every
        frame of a stream has one size, a multiple of the VAE factor); get the stream's current output."""
        apply_pending(self.pipe)
        index = self.frames_in
        pixels = self._pixels(image)
        skip = self.filter is not None and self.filter.should_skip(pixels)
        if skip and self._last is not None:
            self.frames_in += 1
            return StreamOutput(self._last.image, self._last.index, skipped=True)
        with torch.no_grad():
            x, latents = self._frame_state(pixels)
            self.frames_in += 1
            if not self.use_denoising_batch:
                final = self._run_alone(x, latents)
                return self._emit(final, index)
            if self._x is None:
                self._warm_up(x, latents, index)
            return self._emit(*self._batch_step(x, latents, index, first=0))

    def __call__(self, image):
        """``step(image).image``: the stream's current output image."""
        return self.step(image).image

    def _run_alone(self, x: torch.Tensor, latents: torch.Tensor, until: Optional[int] = None):
        """Run one frame through slots 0 .. until - 1 alone (default all): the final latent, or with ``until``
        the list of (state, reference) at slots 1 .. until."""
        ref = latents.clone() if self.cfg_type in ("self", "initialize") else None
        states = []
        for s in range(self.slots if until is None else until):
            (x,) = self._denoise(x, ref, [s])
            states.append((x, None if ref is None else ref.clone()))
        return x if until is None else states

    def _warm_up(self, x: torch.Tensor, latents: torch.Tensor, index: int) -> None:
        """Fill the empty slots 1 .. n - 1 with the first frame's own states there."""
        n = self.slots
        self._x = x.new_zeros((n,) + tuple(x.shape[1:]))
        self._ref = self._x.clone() if self.cfg_type in ("self", "initialize") else None
        for s, (state, ref) in enumerate(self._run_alone(x, latents, until=n - 1), start=1):
            self._x[s] = state[0]
            if self._ref is not None:
                self._ref[s] = ref[0]
        self._ids = [index] * n

    def _batch_step(self, x: Optional[torch.Tensor], latents: Optional[torch.Tensor], index: Optional[int],
                    first: int) -> Tuple[torch.Tensor, int]:
        """One stream-batch call on slots first .. n - 1 (a new frame at slot 0 when first == 0); every row moves
        one slot on. Returns (the final latent of the row that left slot n - 1, its input index)."""
        n = self.slots
        if first == 0:
            self._x[0] = x[0]
            self._ids[0] = index
            if self._ref is not None:
                self._ref[0] = latents[0]
        slots = list(range(first, n))
        ref = None if self._ref is None else self._ref[first:]
        outs = self._denoise(self._x[first:], ref, slots)
        final, final_index = outs[-1], self._ids[n - 1]
        for s, state in zip(slots[:-1], outs[:-1]):
            self._x[s + 1] = state[0]
        self._ids = [None] + self._ids[:-1]
        if self._ref is not None:
            self._ref[1:] = self._ref[:-1].clone()
        return final, final_index

    def _emit(self, final: torch.Tensor, index: int) -> StreamOutput:
        self._last = StreamOutput(self._decode(final), index)
        self._last_index = max(self._last_index, index)
        return self._last

    def flush(self) -> List[StreamOutput]:
        """The results of the frames still in flight (in input order), after which the stream is empty (the next
        frame warms it up again). Frames the warm-up duplicated are not returned twice."""
        results = []
        if self._x is not None:
            with torch.no_grad():
                for first in range(1, self.slots):
                    if all(i is None or i <= self._last_index for i in self._ids[first:]):
                        break
                    final, index = self._batch_step(None, None, None, first)
                    if index is not None and index > self._last_index:
                        results.append(self._emit(final, index))
        self._x = self._ref = None
        self._ids = []
        return results
