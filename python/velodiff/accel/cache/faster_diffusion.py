"""Faster Diffusion: encoder propagation (Li et al., NeurIPS 2024, arXiv 2312.09608; reference code
hutaiHang/Faster-Diffusion).

The UNet's encoder (``conv_in``, the down blocks and the mid block) changes little between steps, its decoder a lot.
On *key* steps the whole UNet runs and the encoder's outputs (every skip branch and the mid block's output) are
kept; on the other steps only the decoder runs, on the kept features, with the current step's time embedding.

Key steps (0-based, within the run): the paper's list for 50 steps, ``key_steps=(0, 1, 2, 3, 5, 10, 15, 25, 35)``
(taken as step indices whatever the step count: at 20 steps the keys are 0, 1, 2, 3, 5, 10, 15), or every
``interval``-th step (``interval=k``: steps 0, k, 2k, ...; the paper's code recommends 4 for community models).
Step 0 is always a key step. Samplers with several evaluations per step (Heun): every evaluation of a key step runs
the encoder and refreshes the features.

Parallel decoder. A non-key evaluation's decoder input (kept features, time embedding, text) does not depend on the
state the sampler has reached, so the decoders of all evaluations up to the next key step can run as one batch as
soon as the features exist: the last evaluation of a key step runs its own decoder together with those of the
following non-key evaluations (their timesteps come from the plan, ``context.call_timesteps``), and those
evaluations then return their precomputed outputs. ``decoder_batch`` caps how many evaluations share one decoder
pass (0: the whole group, as the paper; 1: one at a time, the sequential form). The batch grows with the group
(at 50 steps the paper's list ends in a group of 15 steps: a decoder batch of 15 x the CFG batch), so memory does
too. The result equals the sequential form up to the rounding of batched GEMMs.

Prior noise injection: at every step whose model timestep is below ``noise_tau`` (500 of 1000: t/1000 < 0.5 in the
paper's code), the state the sampler holds moves by ``noise_alpha`` (0.003) times the run's initial latent before
the model is evaluated (the paper's ``latents + 0.003 * init_latents`` before ``scheduler.step``). velodiff applies
it through the pipeline's state hooks (:meth:`velodiff.pipelines.base.BasePipeline.run_denoising`) in the model-input
space (the VP latent the UNet sees), so it means the same for every sampler: for DDIM-type samplers, whose state
is that latent, it is exactly the paper's; for VE-space samplers (Euler, Heun, DPM-Solver singlestep), whose state
is scaled by sqrt(1 + sigma^2), the state moves by the same amount divided by the call's input scale (the paper's
code, run with diffusers' Euler, would add 0.003 * sigma_max * noise to the scaled state instead). The initial
latent is the model input of the run's first evaluation: the initial noise (text-to-image) or the noised image
(image-to-image). ``noise_alpha=0`` turns it off; with it off and ``interval=1`` the output is bit-identical to no
cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

from velodiff.accel.cache.base import CacheTechnique
from velodiff.accel.cache.unet_hooks import check_int, check_real, check_unet_parts, install_unet_dispatcher
from velodiff.accel.registry import register

__all__ = ["FasterDiffusion", "PAPER_KEY_STEPS"]

#: the paper's key steps for 50 DDIM steps ('50ls' in its code)
PAPER_KEY_STEPS: Tuple[int, ...] = (0, 1, 2, 3, 5, 10, 15, 25, 35)


@register("faster_diffusion")
@dataclass(frozen=True)
class FasterDiffusion(CacheTechnique):
    """Faster Diffusion's encoder propagation on a UNet pipeline (see :mod:`velodiff.accel.cache.faster_diffusion`).

    key_steps: the steps that run the encoder (must hold 0); interval: when >= 1, every interval-th step instead
    (0: use key_steps); decoder_batch: evaluations per batched decoder pass (0: all up to the next key step, 1:
    sequential); noise_alpha / noise_tau: the prior noise injection (0 turns it off)."""

    key_steps: Tuple[int, ...] = PAPER_KEY_STEPS
    interval: int = 0
    decoder_batch: int = 0
    noise_alpha: float = 0.003
    noise_tau: float = 500.0

    def validate(self) -> None:
        if isinstance(self.key_steps, (list, range)):  # accept any sequence; keep a tuple (the config is hashable)
            object.__setattr__(self, "key_steps", tuple(self.key_steps))
        if not isinstance(self.key_steps, tuple) or not self.key_steps:
            raise ValueError(f"faster_diffusion: key_steps must be a non-empty tuple of step indices, "
                             f"got {self.key_steps!r}")
        for s in self.key_steps:
            check_int("faster_diffusion", "key_steps", s, 0)
        if 0 not in self.key_steps:
            raise ValueError(f"faster_diffusion: key_steps must hold step 0 (the first step has no features to reuse), "
                             f"got {self.key_steps}")
        check_int("faster_diffusion", "interval", self.interval, 0)
        check_int("faster_diffusion", "decoder_batch", self.decoder_batch, 0)
        check_real("faster_diffusion", "noise_alpha", self.noise_alpha, minimum=0.0)
        check_real("faster_diffusion", "noise_tau", self.noise_tau)

    def check(self, pipe) -> None:
        super().check(pipe)
        check_unet_parts(pipe, "faster_diffusion")

    def keys(self, num_steps: int) -> List[int]:
        """The key steps of a run of ``num_steps``."""
        if self.interval >= 1:
            return list(range(0, num_steps, self.interval))
        return sorted(s for s in set(self.key_steps) if s < num_steps)

    def apply(self, pipe) -> Callable[[], None]:
        unet = pipe.unet

        def decode_group(context, state, args, first: int, call=None) -> torch.Tensor:
            """Decode evaluation ``first`` (its prepared ``call`` when at hand) and the non-key evaluations after it
            (up to decoder_batch) in one pass on the kept features; keeps the others' outputs, returns ``first``'s."""
            steps, keys = context.call_steps, state["keys"]
            group = [first]
            limit = (self.decoder_batch or len(steps)) if context.call_timesteps else 1
            j = first + 1
            while len(group) < limit and j < len(steps) and steps[j] not in keys:
                group.append(j)
                j += 1
            skips, mid = state["features"]
            if len(group) == 1:
                return unet.decode(call if call is not None else args.prepare(unet), mid, skips)[0]
            times = [context.timestep] + [context.call_timesteps[j] for j in group[1:]]
            m = len(group)
            out, _ = unet.decode(args.tiled(times).prepare(unet), torch.cat([mid] * m),
                                 [torch.cat([s] * m) for s in skips])
            outs = out.chunk(m)
            for j, t, o in zip(group[1:], times[1:], outs[1:]):
                state["ready"][j] = (t, o)
            return outs[0]

        def handler(context, state, args, plain):
            if "keys" not in state:
                state["keys"] = frozenset(self.keys(context.num_steps))
                state["ready"] = {}
            i, step = context.call_index, context.step
            ready = state["ready"].pop(i, None)
            if ready is not None and ready[0] == context.timestep and ready[1].shape[0] == args.batch:
                return ready[1]
            features = state.get("features")
            if step in state["keys"] or features is None or features[1].shape[0] != args.batch:
                call = args.prepare(unet)
                x, skips = unet.encode(call)
                state["features"] = (skips, unet.mid(call, x))
                last_of_step = i + 1 >= context.num_calls or context.call_steps[i + 1] != step
                if not last_of_step or self.decoder_batch == 1:
                    return unet.decode(call, state["features"][1], skips)[0]
                return decode_group(context, state, args, i, call)
            return decode_group(context, state, args, i)

        undo_forward = install_unet_dispatcher(pipe, self, handler)
        if self.noise_alpha == 0:
            return undo_forward
        alpha, tau = float(self.noise_alpha), float(self.noise_tau)

        def inject(context, x_in):
            state = context.state_for(self)
            if "initial" not in state:  # the first evaluation: its input is the run's initial latent
                state["initial"] = x_in.detach().clone()
            if context.is_first_call_of_step and context.timestep < tau:
                return alpha * state["initial"]
            return None

        pipe.state_hooks.append(inject)

        def undo() -> None:
            if inject in pipe.state_hooks:
                pipe.state_hooks.remove(inject)
            undo_forward()
        return undo
