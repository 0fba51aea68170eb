"""What the UNet caches share: a dispatcher installed on the UNet's ``forward`` that hands every evaluation of a
pipeline call to the cache, and forward replacements on single modules that undo exactly.

The dispatcher passes a call to the cache only while the pipeline runs its denoising loop (``pipe.denoise_context``
is open); a direct ``pipe.unet(...)`` outside a pipeline call, or a call with ControlNet residuals (which the caches
do not propagate), runs the plain forward. Caches keep their state in the call's context
(``context.state_for(technique)``), so nothing survives a call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn


@dataclass
class UNetArgs:
    """The arguments of one UNet forward (see :meth:`velodiff.models.unet.UNet2DConditionModel.forward`)."""

    sample: torch.Tensor
    timestep: Any
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None
    timestep_cond: Optional[torch.Tensor] = None
    encoder_attention_mask: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return int(self.sample.shape[0])

    def prepare(self, unet):
        """``unet.prepare`` on these arguments (checks and the time embedding)."""
        return unet.prepare(self.sample, self.timestep, self.encoder_hidden_states, self.added_cond_kwargs,
                            self.timestep_cond, self.encoder_attention_mask)

    def run(self, forward: Callable[..., torch.Tensor]) -> torch.Tensor:
        return forward(self.sample, self.timestep, self.encoder_hidden_states, added_cond_kwargs=self.added_cond_kwargs,
                       timestep_cond=self.timestep_cond, encoder_attention_mask=self.encoder_attention_mask)

    def rows(self, start: int, stop: int) -> "UNetArgs":
        """The arguments of batch rows ``start:stop`` (a [B] timestep tensor is sliced too)."""
        def cut(t):
            return None if t is None else t[start:stop]
        timestep = self.timestep
        if torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.shape[0] == self.batch:
            timestep = timestep[start:stop]
        added = None if self.added_cond_kwargs is None else {k: v[start:stop] for k, v in self.added_cond_kwargs.items()}
        return replace(self, sample=self.sample[start:stop], timestep=timestep,
                       encoder_hidden_states=self.encoder_hidden_states[start:stop], added_cond_kwargs=added,
                       timestep_cond=cut(self.timestep_cond), encoder_attention_mask=cut(self.encoder_attention_mask))

    def tiled(self, timesteps) -> "UNetArgs":
        """The arguments of ``len(timesteps)`` evaluations stacked along the batch (evaluation-major: rows
        ``j*B .. (j+1)*B`` are evaluation ``j`` at ``timesteps[j]``), for one batched decoder pass."""
        m, b = len(timesteps), self.batch

        def tile(t):
            return None if t is None else torch.cat([t] * m)
        dtype = self.timestep.dtype if torch.is_tensor(self.timestep) else torch.float32
        device = self.sample.device
        steps = torch.tensor([float(t) for t in timesteps], dtype=dtype, device=device).repeat_interleave(b)
        added = None if self.added_cond_kwargs is None else {k: tile(v) for k, v in self.added_cond_kwargs.items()}
        return replace(self, sample=tile(self.sample), timestep=steps,
                       encoder_hidden_states=tile(self.encoder_hidden_states), added_cond_kwargs=added,
                       timestep_cond=tile(self.timestep_cond), encoder_attention_mask=tile(self.encoder_attention_mask))


Handler = Callable[[Any, Dict[str, Any], UNetArgs, Callable[..., torch.Tensor]], torch.Tensor]


def replace_forward(module: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Replace ``module.forward`` by ``make(previous_forward)`` (an instance attribute); returns the undo, which puts
    back exactly what was there (the class's forward, or an earlier instance replacement)."""
    had = "forward" in vars(module)
    previous = vars(module).get("forward")
    new = make(module.forward)
    module.forward = new

    def undo() -> None:
        if had:
            module.forward = previous
        else:
            vars(module).pop("forward", None)
    return undo


def install_unet_dispatcher(pipe, owner, handler: Handler) -> Callable[[], None]:
    """Route every evaluation of ``pipe``'s denoising loop through ``handler(context, state, args, plain)``, where
    ``state`` is ``owner``'s per-call dict and ``plain`` the UNet's forward without the cache. Returns the undo."""
    unet = pipe.unet

    def make(plain):
        def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, timestep_cond=None,
                    encoder_attention_mask=None, down_block_additional_residuals=None,
                    mid_block_additional_residual=None):
            context = pipe.denoise_context
            if (context is None or context.call_index < 0 or down_block_additional_residuals is not None
                    or mid_block_additional_residual is not None):
                return plain(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             timestep_cond=timestep_cond, encoder_attention_mask=encoder_attention_mask,
                             down_block_additional_residuals=down_block_additional_residuals,
                             mid_block_additional_residual=mid_block_additional_residual)
            args = UNetArgs(sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                            encoder_attention_mask)
            return handler(context, context.state_for(owner), args, plain)
        return forward
    return replace_forward(unet, make)


def check_unet_parts(pipe, name: str) -> None:
    """ValueError when ``pipe.unet`` lacks the partial-forward parts the UNet caches call."""
    unet = getattr(pipe, "unet", None)
    missing = [a for a in ("prepare", "encode", "mid", "decode", "num_branches") if not hasattr(unet, a)]
    if missing:
        raise ValueError(f"{name} needs velodiff's UNet2DConditionModel (its partial forwards); {type(unet).__name__} "
                         f"has no {', '.join(missing)}")


def check_int(name: str, field: str, value, minimum: int) -> None:
    """ValueError naming ``field`` unless ``value`` is an int >= ``minimum`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: {field} must be an integer >= {minimum}, got {value!r}")


def check_real(name: str, field: str, value, minimum: Optional[float] = None, above: Optional[float] = None) -> None:
    """ValueError naming ``field`` unless ``value`` is a finite real number (>= ``minimum``, > ``above``)."""
    import math
    import numbers
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and above is not None:
        ok = value > above
    if not ok:
        bound = (f" >= {minimum:g}" if minimum is not None else "") + (f" > {above:g}" if above is not None else "")
        raise ValueError(f"{name}: {field} must be a finite number{bound}, got {value!r}")
