"""Calibration on the model's own sampling trajectory (Q-Diffusion, Li et al. 2023; SVDQuant section 5): the
pipeline generates a few images while forward hooks record, for every linear layer to be quantized, the
per-input-channel max |x| over all tokens and a fixed-size random subsample of input rows. Under classifier-free
guidance every model call carries both the conditional and the unconditional half, at every timestep.

Which timesteps the sample comes from (``timesteps``):
  "all"         every step of the trajectory, each row equally likely (TFMQ-DM collects every step, too)
  "qdiffusion"  Q-Diffusion's time step-aware sampling: half the steps, uniformly spaced over the trajectory
                (its SD setting keeps 25 of 50), the same share of rows from each
  "ptq4dm"      PTQ4DM's normally distributed time-step calibration (Shang et al. 2023): each step's rows weighted
                by the density of N(0.4, 0.4) at its normalised timestep t / T (T: the training timesteps), which
                favours the less noisy half of the trajectory
A row's chance to be kept is proportional to its step's weight (weighted reservoir sampling, Efraimidis and
Spirakis 2006: key = u^(1/w)); steps of weight 0 are not recorded at all (absmax included)."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from velodiff.pipelines.base import is_class_conditional
from velodiff.quant.svdquant import LayerStats

DIGIT_PROMPTS = tuple(f"a handwritten {d}" for d in range(10))
GENERIC_PROMPTS = ("a photograph of an astronaut riding a horse", "a red fox in the snow, detailed fur",
                   "an oil painting of a lighthouse at dusk", "a bowl of fruit on a wooden table",
                   "a futuristic city skyline at night, neon lights", "a portrait of an old man, studio lighting",
                   "a watercolor of mountains and a lake", "a cute corgi wearing sunglasses")


TIMESTEP_MODES = ("all", "qdiffusion", "ptq4dm")


def train_timesteps(pipe) -> int:
    """The number of training timesteps of ``pipe``'s scheduler (1000 when it does not say)."""
    scheduler = getattr(pipe, "scheduler", None)
    return int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)


class _Steps:
    """Forward pre-hook of the denoiser: the index of the current model call within one generation and its
    normalised timestep t / T; ``weight()`` is the current step's calibration weight under ``mode``."""

    def __init__(self, mode: str, steps: int, train_timesteps: int):
        self.mode, self.steps, self.train_timesteps = mode, steps, train_timesteps
        self.kept = {round(i * (steps - 1) / max(1, steps // 2 - 1)) for i in range(max(1, steps // 2))} \
            if steps > 1 else {0}
        self.reset()

    def reset(self) -> None:
        self.index, self.t = -1, 1.0

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        self.index += 1
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is not None:
            self.t = float(torch.as_tensor(t).flatten()[0]) / self.train_timesteps

    def weight(self) -> float:
        if self.mode == "qdiffusion":
            return 1.0 if self.index % self.steps in self.kept else 0.0
        if self.mode == "ptq4dm":
            return math.exp(-0.5 * ((self.t - 0.4) / 0.4) ** 2)
        return 1.0


class _Recorder:
    """Forward pre-hook state of one layer: running absmax [K] and a reservoir of at most ``rows`` input rows,
    each row kept with a chance proportional to ``weight()`` (of its timestep; 1 without)."""

    def __init__(self, rows: int, generator: torch.Generator, to_rows=None,
                 weight: Optional[Callable[[], float]] = None):
        self.rows, self.gen, self.to_rows, self.weight = rows, generator, to_rows, weight
        self.absmax = None
        self.sample: List[torch.Tensor] = []
        self.seen = 0

    def __call__(self, module: nn.Module, args) -> None:
        w = 1.0 if self.weight is None else self.weight()
        if w <= 0:
            return
        x = args[0].detach()
        x = self.to_rows(x) if self.to_rows is not None else x.reshape(-1, x.shape[-1])
        x = x.float().cpu()
        amax = x.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        # weighted reservoir sampling of rows: the rows with the largest keys u^(1/w) are kept (w = 1: uniform)
        for start in range(0, x.shape[0], 4096):
            chunk = x[start:start + 4096]
            keys = torch.rand(chunk.shape[0], generator=self.gen)
            if w != 1.0:
                keys = keys.pow(1.0 / w)
            self.sample.append(torch.cat([chunk, keys[:, None]], 1))
            self.seen += chunk.shape[0]
            if sum(s.shape[0] for s in self.sample) > 4 * self.rows:
                self._shrink()

    def _shrink(self) -> None:
        allrows = torch.cat(self.sample)
        keep = allrows[:, -1].topk(min(self.rows, allrows.shape[0])).indices
        self.sample = [allrows[keep]]

    def stats(self) -> LayerStats:
        self._shrink()
        return LayerStats(absmax=self.absmax, sample=self.sample[0][:, :-1].contiguous())


def calibrate(pipe, layers: Dict[str, nn.Linear], prompts: Sequence = None, images: int = 16, steps: int = 20,
              guidance: float = None, sampler: str = None, rows: int = 256, seed: int = 0,
              batch: int = 8, timesteps: str = "all") -> Dict[str, LayerStats]:
    """Run ``pipe`` on ``images`` calibration images (prompts cycled; class labels for class-conditional
    pipelines) and return the input statistics of each layer in ``layers`` (qualified name -> module), sampled
    over the timesteps as ``timesteps`` says (module docstring)."""
    if timesteps not in TIMESTEP_MODES:
        raise ValueError(f"timesteps must be one of {TIMESTEP_MODES}, got {timesteps!r}")
    gen = torch.Generator().manual_seed(seed)
    from velodiff.quant import denoiser_of
    denoiser = denoiser_of(pipe)[1]
    tracker = _Steps(timesteps, steps, train_timesteps(pipe))
    weight = None if timesteps == "all" else tracker.weight
    recorders = {name: _Recorder(rows, gen, _patch_rows(module), weight) for name, module in layers.items()}
    handles = [module.register_forward_pre_hook(recorders[name]) for name, module in layers.items()]
    handles.append(denoiser.register_forward_pre_hook(tracker, with_kwargs=True))
    was = getattr(pipe, "progress", True)
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, images, batch):
            count = min(batch, images - start)
            conds = [prompts[(start + i) % len(prompts)] for i in range(count)]
            generator = torch.Generator().manual_seed(seed + 1 + start)
            tracker.reset()
            kwargs = dict(num_inference_steps=steps, generator=generator, output_type="latent")
            if guidance is not None:
                kwargs["guidance_scale"] = guidance
            if sampler is not None:
                kwargs["sampler"] = sampler
            if is_class_conditional(pipe):
                pipe(class_labels=[int(c) for c in conds], **kwargs)
            else:
                pipe(list(conds), **kwargs)
    finally:
        for h in handles:
            h.remove()
        pipe.set_progress_bar_config(disable=not was)
    missing = [name for name, r in recorders.items() if r.absmax is None]
    if missing:
        raise RuntimeError(f"calibration never ran layer(s) {missing[:5]}; are they part of the denoiser?")
    bad = [name for name, r in recorders.items() if not bool(torch.isfinite(r.absmax).all())]
    if bad:
        raise ValueError(f"calibration: the inputs of {len(bad)} layer(s), first {bad[0]!r}, hold NaN or inf: the "
                         "model produced non-finite activations while generating the calibration images; check its "
                         "weights and dtype (float16 overflows), or calibrate in float32")
    return {name: r.stats() for name, r in recorders.items()}


def _patch_rows(module: nn.Module):
    """For a convolution: its input's im2col rows (what its quantized GEMM will see); None for a linear layer."""
    if not isinstance(module, nn.Conv2d):
        return None
    from velodiff.quant.conv import conv_geometry, conv_patches
    geometry = conv_geometry(module)
    return lambda x: conv_patches(x, geometry)


def default_prompts(pipe) -> Iterable:
    """Class labels 0..9 for class-conditional pipelines, digit prompts for the built-in digits model, generic
    prompts otherwise."""
    if is_class_conditional(pipe):
        n = pipe.transformer.config.num_embeds_ada_norm
        return tuple(range(min(n, 10))) if n <= 10 else tuple(torch.randperm(n, generator=torch.Generator()
                                                                             .manual_seed(0))[:16].tolist())
    if str(getattr(pipe, "name_or_path", "")).rstrip("/").endswith("digits"):
        return DIGIT_PROMPTS
    return GENERIC_PROMPTS
