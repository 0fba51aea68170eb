"""Calibration on the model's own sampling trajectory (Q-Diffusion, Li et al. 2023; SVDQuant section 5): the
pipeline generates a few images while forward hooks record, for every linear layer to be quantized, the
per-input-channel max |x| over all tokens and a fixed-size random subsample of input rows. Under classifier-free
guidance every model call carries both the conditional and the unconditional half, at every timestep."""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence

import torch
from torch import nn

from velodiff.pipelines.base import is_class_conditional
from velodiff.quant.svdquant import LayerStats

DIGIT_PROMPTS = tuple(f"a handwritten {d}" for d in range(10))
GENERIC_PROMPTS = ("a photograph of an astronaut riding a horse", "a red fox in the snow, detailed fur",
                   "an oil painting of a lighthouse at dusk", "a bowl of fruit on a wooden table",
                   "a futuristic city skyline at night, neon lights", "a portrait of an old man, studio lighting",
                   "a watercolor of mountains and a lake", "a cute corgi wearing sunglasses")


class _Recorder:
    """Forward pre-hook state of one layer: running absmax [K] and a reservoir of at most ``rows`` input rows."""

    def __init__(self, rows: int, generator: torch.Generator, to_rows=None):
        self.rows, self.gen, self.to_rows = rows, generator, to_rows
        self.absmax = None
        self.sample: List[torch.Tensor] = []
        self.seen = 0

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0].detach()
        x = self.to_rows(x) if self.to_rows is not None else x.reshape(-1, x.shape[-1])
        x = x.float().cpu()
        amax = x.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        # reservoir sampling of rows: every row seen so far is kept with probability rows / seen
        for start in range(0, x.shape[0], 4096):
            chunk = x[start:start + 4096]
            keys = torch.rand(chunk.shape[0], generator=self.gen)
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
              batch: int = 8) -> Dict[str, LayerStats]:
    """Run ``pipe`` on ``images`` calibration images (prompts cycled; class labels for class-conditional
    pipelines) and return the input statistics of each layer in ``layers`` (qualified name -> module)."""
    gen = torch.Generator().manual_seed(seed)
    recorders = {name: _Recorder(rows, gen, _patch_rows(module)) for name, module in layers.items()}
    handles = [module.register_forward_pre_hook(recorders[name]) for name, module in layers.items()]
    was = getattr(pipe, "progress", True)
    pipe.set_progress_bar_config(disable=True)
    try:
        for start in range(0, images, batch):
            count = min(batch, images - start)
            conds = [prompts[(start + i) % len(prompts)] for i in range(count)]
            generator = torch.Generator().manual_seed(seed + 1 + start)
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
