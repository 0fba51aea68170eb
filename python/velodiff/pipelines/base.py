"""What every velodiff pipeline shares: construction from a folder, the folder's defaults, call-argument checks
(made before any heavy work), devices and dtypes, initial noise drawn as diffusers draws it, the denoising loop
through the sampling layer, decoding and output conversion."""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from velodiff.sampling import SamplerPlan, run_plan
from velodiff.sampling.plan import randn_like_diffusers
from velodiff.pipelines.context import ContextHolder, DenoiseContext
from velodiff.pipelines.scheduling import make_plan

Generator = Union[torch.Generator, List[torch.Generator], None]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: The largest image side a pipeline accepts, as a multiple of the model's native side (``sample_size`` x the VAE
#: factor: 512 for SD 1.5, 1024 for SDXL, 16 for the built-in digits). 4 is as far as the published
#: high-resolution methods go (HiDiffusion, ScaleCrafter, DemoFusion: 4x per side, e.g. SDXL at 4096 x 4096;
#: diffusers' MultiDiffusion panorama: 512 x 2048 from SD). It is checked before anything is allocated, so that a
#: typo (height=100000) fails at once instead of running for minutes in one attention call (where Ctrl-C waits for
#: the call to return) or asking for tens of GB. The environment variable ``VELODIFF_MAX_SIZE_FACTOR`` (read at
#: each call) overrides it, as does assigning this module attribute.
MAX_SIZE_FACTOR = 4
MAX_SIZE_FACTOR_ENV = "VELODIFF_MAX_SIZE_FACTOR"
#: What a folder's ``model_index.json`` may set under ``_velodiff_defaults`` (see :func:`read_defaults`).
DEFAULT_KEYS = ("guidance_scale", "hidiffusion")


class PromptWarning(UserWarning):
    """A prompt the text encoder cannot read whole: tokens cut at the tokenizer's length, or words it does not
    know (see :func:`prompt_token_issues`)."""


@dataclass
class PipelineOutput:
    """``images``: a list of PIL images (``output_type="pil"``), an array [B, H, W, 3] in [0, 1] ("np"), a
    tensor [B, 3, H, W] in [0, 1] ("pt") or the final latents ("latent")."""

    images: Any
    sampler: str = ""
    num_model_evaluations: int = 0


def randn_tensor(shape, generator: Generator, device, dtype) -> torch.Tensor:
    """N(0, I) exactly as diffusers' ``randn_tensor``: drawn on the generator's device (per sample for a list
    of generators; on the CPU without a generator), in ``dtype``, then moved to ``device``."""
    return randn_like_diffusers(shape, generator, torch.device("cpu") if generator is None else device, dtype) \
        .to(device)


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


def check_call_args(num_inference_steps, guidance_scale, output_type, num_images_per_prompt,
                    guidance_rescale: float = 0.0) -> None:
    """The arguments every pipeline call shares; ValueError / TypeError naming the argument. Sizes are checked by
    :func:`image_size`, the step count against the sampler and schedule by :meth:`BasePipeline.make_plan`."""
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    check_guidance(guidance_scale, guidance_rescale)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_guidance(guidance_scale, guidance_rescale: float = 0.0) -> None:
    """Classifier-free guidance ``w`` must be a finite number >= 0 (``inf`` would give a black image, ``nan`` an
    unguided one; w <= 1 means no guidance, as in diffusers); Lin et al.'s ``guidance_rescale`` phi a finite
    number in [0, 1] (the weight of the rescaled prediction in a convex mix, 2305.08891 eq. 16)."""
    if not _real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    if not _real(guidance_rescale) or not math.isfinite(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")


def max_size_factor() -> float:
    """:data:`MAX_SIZE_FACTOR`, or the environment variable ``VELODIFF_MAX_SIZE_FACTOR`` when set."""
    text = os.environ.get(MAX_SIZE_FACTOR_ENV)
    if text is None or text.strip() == "":
        return MAX_SIZE_FACTOR
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{MAX_SIZE_FACTOR_ENV} must be a positive number, got {text!r}")
    return value


def image_size(height, width, native: Union[int, Tuple[int, int]], multiple: int,
               multiple_why: str = "the VAE's downscaling factor") -> Tuple[int, int]:
    """(height, width) of the image to make: ``native`` (the model's native size, an int or (height, width)) for
    None, else the given values, which must be positive integer multiples of ``multiple`` (the VAE factor, times
    the patch size for transformers: one latent pixel / one token per ``multiple`` pixels; diffusers requires the
    same) and at most :func:`max_size_factor` x the native side. 0 is an error, never "the default". TypeError /
    ValueError naming ``height`` or ``width``, raised before anything is allocated."""
    natives = (native, native) if isinstance(native, int) else tuple(native)
    factor = max_size_factor()
    out = []
    for name, value, nat in (("height", height, natives[0]), ("width", width, natives[1])):
        if value is None:
            out.append(int(nat))
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer number of pixels, got {type(value).__name__} {value!r}")
        value = int(value)
        if value <= 0 or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} ({multiple_why}), got {value}")
        limit = int(factor * nat) // multiple * multiple
        if value > limit:
            raise ValueError(f"{name}={value} is more than this model can be asked for: at most {limit} pixels "
                             f"({factor:g} x its native {nat}; velodiff.pipelines.base.MAX_SIZE_FACTOR, or set "
                             f"the environment variable {MAX_SIZE_FACTOR_ENV} to allow more)")
        out.append(value)
    return out[0], out[1]


def native_image_size(sample_size, vae_scale_factor: int) -> Union[int, Tuple[int, int]]:
    """The image size a denoiser config's ``sample_size`` (latent pixels: an int, or [height, width]) stands for."""
    if isinstance(sample_size, (list, tuple)):
        return int(sample_size[0]) * vae_scale_factor, int(sample_size[1]) * vae_scale_factor
    return int(sample_size) * vae_scale_factor


def read_defaults(model_index: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The folder's call defaults: ``model_index.json``'s ``"_velodiff_defaults"`` object (e.g.
    ``{"guidance_scale": 3.0}``, the built-in models' measured best), checked; {} when absent. diffusers ignores
    keys that start with an underscore, so the folder still loads there."""
    if not model_index or "_velodiff_defaults" not in model_index:
        return {}
    defaults = model_index["_velodiff_defaults"]
    if not isinstance(defaults, dict):
        raise ValueError(f"model_index.json: _velodiff_defaults must be an object, got {defaults!r}")
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"model_index.json: _velodiff_defaults has unknown keys {unknown}; velodiff reads "
                         f"{list(DEFAULT_KEYS)}")
    if "guidance_scale" in defaults:
        try:
            check_guidance(defaults["guidance_scale"])
        except ValueError as e:
            raise ValueError(f"model_index.json: _velodiff_defaults: {e}") from None
    if not isinstance(defaults.get("hidiffusion", {}), dict):  # its fields are checked by the technique
        raise ValueError(f"model_index.json: _velodiff_defaults.hidiffusion must be an object, "
                         f"got {defaults['hidiffusion']!r}")
    return dict(defaults)


def _piece(token: str) -> str:
    """A token's text without the tokenizers' word markers (CLIP ``</w>``, SentencePiece ``▁``, GPT-2 ``Ġ``,
    WordPiece ``##``)."""
    for suffix in ("</w>",):
        if token.endswith(suffix):
            token = token[:-len(suffix)]
    for prefix in ("\u2581", "\u0120", "##"):
        if token.startswith(prefix):
            token = token[len(prefix):]
    return token


def prompt_token_issues(tokenizer, texts: Sequence[str], max_length: int) -> Tuple[int, List[str]]:
    """(how many tokens ``max_length`` cuts from the longest of ``texts``, the words the tokenizer does not
    know), special tokens included as the pipelines tokenize.

    A word is unknown when the tokenizer maps part of it to its unknown token, or spells it (2 characters or more)
    with at least half of its pieces single characters: the vocabulary has no piece of it, as with the built-in
    digits tokenizer, whose vocabulary is its prompt words plus the letters that spell anything else. Words need a
    fast tokenizer (word boundaries); with a slow one only the count of unknown tokens is reported."""
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    ids_list = enc["input_ids"]
    cut = max((len(ids) - max_length for ids in ids_list), default=0)
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown: List[str] = []
    for i, (text, ids) in enumerate(zip(texts, ids_list)):
        try:
            word_ids = enc.word_ids(i)
        except (ValueError, AttributeError):  # a slow tokenizer: no word boundaries
            unknown += ["<unk>"] * sum(1 for t in ids if unk is not None and t == unk)
            continue
        tokens = tokenizer.convert_ids_to_tokens(ids)
        words: Dict[int, List[Tuple[str, int]]] = {}
        for token, token_id, w in zip(tokens, ids, word_ids):
            if w is not None:
                words.setdefault(w, []).append((token, token_id))
        for w, parts in words.items():
            span = enc.word_to_chars(i, w)
            word = text[span.start:span.end] if span is not None else "".join(_piece(t) for t, _ in parts)
            singles = sum(1 for t, _ in parts if len(_piece(t)) <= 1)
            if any(unk is not None and t == unk for _, t in parts) or (len(word) > 1 and 2 * singles >= len(parts)):
                if word not in unknown:
                    unknown.append(word)
    return max(cut, 0), unknown


def warn_prompt_issues(checks: Sequence[Tuple[str, Any, Sequence[str], int]]) -> None:
    """One :class:`PromptWarning` for a whole call: ``checks`` are (argument name, tokenizer, texts, max_length),
    e.g. ("prompt", tokenizer, prompts, 77); nothing when every text fits and every word is known."""
    lines: List[str] = []
    for name, tokenizer, texts, max_length in checks:
        texts = [t for t in texts if t]
        if not texts:
            continue
        cut, unknown = prompt_token_issues(tokenizer, texts, max_length)
        if cut > 0:
            line = (f"{name}: {cut} tokens cut (the text encoder reads {max_length} tokens, start and end included; "
                    f"the rest of the text is ignored)")
            if line not in lines:
                lines.append(line)
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10
                                                                else "")
            line = f"{name}: words the tokenizer does not know (the model has no meaning for them): {shown}"
            if line not in lines:
                lines.append(line)
    if lines:
        warnings.warn("; ".join(lines), PromptWarning, stacklevel=4)  # the caller of pipe(...)


def is_class_conditional(pipe) -> bool:
    """Whether ``pipe`` is conditioned by class labels (a DiT pipeline, velodiff's or diffusers') not prompts."""
    return any(cls.__name__ == "DiTPipeline" for cls in type(pipe).__mro__)


class BasePipeline:
    """A set of components plus the shared denoising loop. Subclasses implement ``__call__``."""

    #: guidance_scale when neither the call nor the folder's defaults give one: diffusers' pipeline default
    DEFAULT_GUIDANCE_SCALE = 7.5

    def __init__(self, components: Dict[str, Any], dtype: torch.dtype, device: torch.device):
        self.components = components
        self.dtype = dtype
        self.device = torch.device(device)
        self.scheduler_config: Dict[str, Any] = components.get("scheduler") or {}
        #: the folder's call defaults (model_index.json ``_velodiff_defaults``, see :func:`read_defaults`)
        self.defaults: Dict[str, Any] = read_defaults(components.get("_model_index"))
        self.progress = True
        #: how a guided evaluation runs the denoiser: "batched" (one call on [x; x]) or "split" (two calls; set by
        #: velodiff.accel.SplitCFG)
        self.cfg_mode = "batched"
        self._restore_hooks: List[Callable[[], None]] = []
        #: the techniques applied with velodiff.optimize, oldest first (parallel to _restore_hooks)
        self._applied: List[Any] = []
        self._context = ContextHolder(f"velodiff-denoise-context-{id(self)}")
        #: techniques that move the sampler state (see :meth:`run_denoising`); each adds itself and its undo removes it
        self.state_hooks: List[Callable[[DenoiseContext, torch.Tensor], Optional[torch.Tensor]]] = []
        for name, value in components.items():
            if not name.startswith("_") and name != "scheduler":
                setattr(self, name, value)

    def __init_subclass__(cls, **kwargs):
        """Every pipeline's ``__call__`` takes ``lora_scales={name: strength}``: those LoRA strengths for this call
        only (velodiff.lora.lora_strengths)."""
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None or getattr(call, "_takes_lora_scales", False):
            return

        @functools.wraps(call)
        def with_lora_scales(self, *args, lora_scales: Optional[Dict[str, float]] = None, **kwargs):
            from velodiff.lora import apply_pending, lora_strengths
            apply_pending(self)  # LoRAs loaded in the background join between calls
            with lora_strengths(self, lora_scales):
                return call(self, *args, **kwargs)
        with_lora_scales._takes_lora_scales = True
        cls.__call__ = with_lora_scales

    # --- LoRA (velodiff.lora) ---------------------------------------------------------------------------------------

    def load_lora(self, source, name: Optional[str] = None, strength: float = 1.0, strict: bool = True,
                  background: bool = False, capacity: int = 0):
        """Add a LoRA: ``source`` a ``.safetensors`` file (diffusers / PEFT, kohya or LyCORIS LoCon keys, for the
        denoiser and the text encoders) or a state dict; ``name`` defaults to the file's stem. Several LoRAs can be
        loaded at once; each changes no module (a branch on the layer; quantized layers: their low-rank branch), so
        loading, unloading and re-weighting adapters never rebuilds the model. Unknown keys raise an error listing
        them (``strict=False``: a warning). Returns the name; with ``background=True`` the file is read on a worker
        thread while generation goes on, the adapter joins at the start of the next call after that (or at
        :meth:`wait_loras`), and a Future is returned. ``capacity``: pad each layer's rank axis to at least this
        total rank, so that later swaps up to it change no shapes (velodiff.lora.branch)."""
        from velodiff.lora import load_lora, load_lora_background
        if background:
            return load_lora_background(self, source, name, strength, strict, capacity)
        return load_lora(self, source, name, strength, strict, capacity)

    def wait_loras(self) -> None:
        """Attach every LoRA still loading in the background, waiting for them."""
        from velodiff.lora import apply_pending
        apply_pending(self, wait=True)

    def set_lora_strength(self, name: str, strength: float) -> None:
        """Re-weight a loaded LoRA (for one call only: ``pipe(..., lora_scales={name: strength})``)."""
        from velodiff.lora import set_lora_strength
        set_lora_strength(self, name, strength)

    def unload_lora(self, name: Optional[str] = None) -> None:
        """Remove a LoRA (None: all of them); the layers are exactly as before it was loaded."""
        from velodiff.lora import unload_lora
        unload_lora(self, name)

    def fuse_lora(self) -> None:
        """Add the loaded LoRAs into the weights (no branch per call); :meth:`unfuse_lora` restores them exactly."""
        from velodiff.lora import fuse_lora
        fuse_lora(self)

    def unfuse_lora(self) -> None:
        from velodiff.lora import unfuse_lora
        unfuse_lora(self)

    @staticmethod
    def check_defaults(defaults: Dict[str, Any]) -> Dict[str, Any]:
        """Call defaults as a folder's model_index.json or a LoRA's metadata gives them, checked (:func:`read_defaults`)."""
        return read_defaults({"_velodiff_defaults": defaults})

    @property
    def loras(self) -> Dict[str, float]:
        """The loaded LoRAs and their strengths."""
        return {name: entry["strength"] for name, entry in getattr(self, "_loras", {}).items()}

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    def guided_fn(self, call, guided: bool, cond_first: bool, channels: Optional[int] = None):
        """The model callable of the sampling loop for a denoiser ``call(batch, timesteps [N], rows) -> out``, where
        ``rows`` is the slice of the guided conditioning batch (first half; second half) that goes with ``batch``.
        Under guidance the batch is [x; x] with rows ``slice(None)`` (or, with :attr:`cfg_mode` ``"split"``, two
        calls on x with each half's rows, the conditional first) and the outputs are returned as (cond, uncond);
        ``cond_first`` says which half the caller's conditioning puts first; ``channels`` keeps the first output
        channels (learned sigma models)."""
        split = guided and self.cfg_mode == "split"

        def fn(x: torch.Tensor, t: float):
            x = x.to(self.dtype)
            if split:
                n = x.shape[0]
                halves = (slice(0, n), slice(n, 2 * n))
                cond_rows, uncond_rows = halves if cond_first else halves[::-1]
                ts = torch.full((n,), t, device=self.device)
                cond, uncond = self.split_cfg_calls(lambda rows: call(x, ts, rows), cond_rows, uncond_rows)
                if channels is not None:
                    cond, uncond = cond[:, :channels], uncond[:, :channels]
                return cond, uncond
            batch = torch.cat([x, x]) if guided else x
            out = call(batch, torch.full((batch.shape[0],), t, device=self.device), slice(None))
            if channels is not None:
                out = out[:, :channels]
            if not guided:
                return out
            first, second = out.chunk(2)
            return (first, second) if cond_first else (second, first)
        fn.cfg = ("split" if split else "batched") if guided else "none"  # read by run_denoising for the context
        fn.cond_first = cond_first
        return fn

    def split_cfg_calls(self, call, cond_args, uncond_args):
        """(call(cond_args), call(uncond_args)) under split CFG: the conditional call first, each marked with its
        branch in the open denoising context (see :attr:`DenoiseContext.cfg_branch`)."""
        context = self.denoise_context
        outs = []
        for name, args in (("cond", cond_args), ("uncond", uncond_args)):
            with (context.branch(name) if context is not None else contextlib.nullcontext()):
                outs.append(call(args))
        return outs[0], outs[1]

    @property
    def denoise_context(self) -> Optional[DenoiseContext]:
        """The context of the denoising loop running now in this thread (see :mod:`velodiff.pipelines.context`),
        None outside a call."""
        return self._context.current

    def run_denoising(self, plan: Tuple[str, SamplerPlan], model_fn, x: torch.Tensor, guidance_scale: Optional[float],
                      generator: Generator, guidance_rescale: float = 0.0, callback=None) -> torch.Tensor:
        """Run ``plan`` over ``model_fn`` from the sampler state ``x`` (fp32) inside a fresh
        :class:`DenoiseContext`, which follows the plan's calls and is closed when the loop ends.

        State hooks (:attr:`state_hooks`, e.g. Faster Diffusion's prior noise injection): before every model
        evaluation each hook is called as ``hook(context, x_in)`` with the model input ``x_in`` (fp32, the state times
        the call's ``input_scale``) and returns None or an fp32 offset of x_in's shape, in the model-input space. The
        model then sees ``x_in + offset`` and the sampler state moves by ``offset / input_scale`` before the call's
        update, in place, so whatever the sampler keeps of this call's state (its anchor) sees the move too; the
        ``callback`` then gets a copy of the state, which later moves do not change."""
        name, plan = plan
        context = DenoiseContext(sampler=name, call_steps=tuple(plan.call_steps),
                                 call_timesteps=tuple(float(t) for t in plan.timesteps),
                                 begin=int(plan.info.get("begin", 0) or 0), guided=guidance_scale is not None,
                                 cfg=getattr(model_fn, "cfg", "batched" if guidance_scale is not None else "none"),
                                 cond_first=getattr(model_fn, "cond_first", True), batch_size=int(x.shape[0]))
        update_fn = None
        if self.state_hooks:
            model_fn, update_fn = self._with_state_hooks(context, plan, model_fn)
            if callback is not None:
                user_callback = callback

                def callback(i, call, state):
                    return user_callback(i, call, state.clone())
        with self._context.open(context):
            return run_plan(plan, model_fn, x, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                            generator=generator, progress=self.progress, callback=callback, update_fn=update_fn,
                            before_call=lambda i, call: context.advance(i, call.timestep))

    def _with_state_hooks(self, context: DenoiseContext, plan: SamplerPlan, model_fn):
        """(model_fn, update_fn) applying :attr:`state_hooks` (see :meth:`run_denoising`)."""
        from velodiff import ops
        hooks = list(self.state_hooks)
        pending: Dict[int, torch.Tensor] = {}

        def fn(x_in: torch.Tensor, t: float):
            offset = None
            for hook in hooks:
                d = hook(context, x_in)
                if d is not None:
                    offset = d if offset is None else offset + d
            if offset is None:
                return model_fn(x_in, t)
            pending[context.call_index] = offset
            return model_fn(x_in + offset, t)

        def update(x: torch.Tensor, *args, **kwargs):
            offset = pending.pop(context.call_index, None)
            if offset is not None:
                x.add_(offset.to(x.dtype), alpha=1.0 / plan.calls[context.call_index].input_scale)
            return ops.sampler_update(x, *args, **kwargs)

        fn.cfg = getattr(model_fn, "cfg", None)
        fn.cond_first = getattr(model_fn, "cond_first", True)
        return fn, update

    def finish(self, final: torch.Tensor, name: str, nfe: int, output_type: str) -> PipelineOutput:
        """Decode the final latents with the pipeline's VAE (unless ``output_type='latent'``) into the output."""
        if output_type == "latent":
            return PipelineOutput(final, name, nfe)
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(self.vae.latents_to_vae(final.to(vae_dtype)))
        return PipelineOutput(postprocess(image, output_type), name, nfe)

    @property
    def default_guidance_scale(self) -> float:
        """What ``guidance_scale=None`` means for this pipeline: the folder's default (``pipe.defaults``), else
        diffusers' default for this pipeline class (:attr:`DEFAULT_GUIDANCE_SCALE`)."""
        return self.defaults.get("guidance_scale", self.DEFAULT_GUIDANCE_SCALE)

    def resolve_guidance(self, guidance_scale: Optional[float]) -> float:
        """The guidance scale of a call: the caller's, else :attr:`default_guidance_scale`."""
        return self.default_guidance_scale if guidance_scale is None else guidance_scale

    def make_plan(self, sampler: Optional[str], num_inference_steps: int,
                  sampler_options: Optional[Dict[str, Any]] = None) -> Tuple[str, SamplerPlan]:
        """(sampler name, plan) for this pipeline's schedule: cheap, so calls build it before any heavy work (a
        step count the schedule cannot give is a ValueError naming num_inference_steps)."""
        return make_plan(sampler, self.scheduler_config, num_inference_steps, sampler_options)

    def denoise(self, model_fn, latents: torch.Tensor, plan: Tuple[str, SamplerPlan],
                guidance_scale: Optional[float], generator: Generator, guidance_rescale: float = 0.0, callback=None):
        """Draw nothing, decide nothing: run ``plan`` (from :meth:`make_plan`) over ``model_fn`` from ``latents``
        (unit noise). Returns (final latents fp32, sampler name, number of model evaluations). Ctrl-C
        (KeyboardInterrupt) leaves the loop at the next model call: nothing here catches it."""
        x = latents.to(torch.float32) * plan[1].init_noise_scale
        out = self.run_denoising(plan, model_fn, x, guidance_scale, generator, guidance_rescale, callback)
        return out, plan[0], len(plan[1].calls)
