"""A sampler as a plan: a list of fused-update calls whose scalar coefficients are computed once, in float64.

Every sampler in :mod:`velodiff.sampling.samplers` is a small pure function that turns a discretisation of the
noise schedule into a :class:`SamplerPlan`. :func:`run_plan` then runs the denoising loop: per call it
evaluates the model once and makes one ``velodiff::sampler_update`` call, reading that call's row of a
coefficient table uploaded to the device once, so the loop makes no host sync.

Semantics of one call (see csrc/include/velodiff/sampler_update.h), all per element::

    g      = uncond ? delta*u + w*(c - delta*u) : c          (w, delta filled in by run_plan)
    D      = p_x*x + p_m*g + sum_k q[k]*H[k]
    x_next = c_x*x + c_a*anchor + c_d*D + sum_k c_h[k]*H[k] + c_z*noise
    y      = e_x*x + e_a*anchor + e_d*D + sum_k e_h[k]*H[k]   (only when want_y)
    H[write_slot] = D

where H[k] are the ring-buffer values before the call, ``x`` is the state the model was evaluated at (the
model sees ``x * input_scale``) and ``anchor`` is a second state kept by the loop (see :attr:`Call.anchor`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from velodiff.ops import reference as _ref

ModelOutput = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
ModelFn = Callable[[torch.Tensor, float], ModelOutput]


@dataclass
class Call:
    """One model evaluation plus one fused update. Unset coefficients are zero."""

    timestep: float                # the value passed to the model (discrete t, fractional t, or sigma*1000)
    input_scale: float = 1.0       # the model sees x * input_scale (e.g. 1/sqrt(sigma^2+1) in VE space)
    p_x: float = 0.0
    p_m: float = 0.0
    c_x: float = 0.0
    c_a: float = 0.0
    c_d: float = 0.0
    c_z: float = 0.0
    e_x: float = 0.0
    e_a: float = 0.0
    e_d: float = 0.0
    q: Sequence[float] = ()        # per history slot; shorter sequences are zero-padded
    c_h: Sequence[float] = ()
    e_h: Sequence[float] = ()
    write_slot: int = -1           # ring-buffer slot that receives D (-1: none)
    noise: bool = False            # draw fresh N(0, I) noise for this call
    want_y: bool = False           # compute the second output y
    anchor: str = "keep"           # anchor for the calls after this one: 'keep', 'x' (this call's input x),
                                   # 'y' (this call's y) or 'x_next'
    step: int = -1                 # the sampler step (a point of the num_inference_steps discretisation) this
                                   # evaluation belongs to; -1: its own step (one call per step). Heun's two
                                   # calls of step i both say i. Caches key their decisions on it.

    def folded(self) -> "Call":
        """An equivalent call with D = g when D is not stored: the conversion folded into the update.

        When nothing keeps D (``write_slot == -1``), ``c_d * (p_x x + p_m g + q.H)`` is expanded in float64
        here, which avoids the fp32 cancellation of ``x - alpha * x0`` at low noise.
        """
        if self.write_slot >= 0:
            return self
        k = max(len(self.q), len(self.c_h), len(self.e_h))

        def pad(v):
            return list(v) + [0.0] * (k - len(v))

        q, c_h, e_h = pad(self.q), pad(self.c_h), pad(self.e_h)
        return dataclasses.replace(
            self, p_x=0.0, p_m=1.0, q=(),
            c_x=self.c_x + self.c_d * self.p_x, c_d=self.c_d * self.p_m,
            e_x=self.e_x + self.e_d * self.p_x, e_d=self.e_d * self.p_m,
            c_h=[c + self.c_d * qq for c, qq in zip(c_h, q)], e_h=[e + self.e_d * qq for e, qq in zip(e_h, q)])

    def row(self, history_slots: int, guidance: float, delta: float) -> List[float]:
        """The coefficient row in the layout of csrc/include/velodiff/sampler_update.h."""
        k = history_slots

        def pad(values: Sequence[float], name: str) -> List[float]:
            if len(values) > k:
                raise ValueError(f"Call.{name} has {len(values)} entries but the plan has {k} history slots")
            return list(values) + [0.0] * (k - len(values))

        return ([guidance, delta, self.p_x, self.p_m, self.c_x, self.c_a, self.c_d, self.c_z,
                 self.e_x, self.e_a, self.e_d] + pad(self.q, "q") + pad(self.c_h, "c_h") + pad(self.e_h, "e_h"))


@dataclass
class SamplerPlan:
    """The whole loop of one sampler over one discretisation."""

    name: str
    calls: List[Call]
    history_slots: int = 0
    init_noise_scale: float = 1.0  # x_T = N(0, I) * init_noise_scale
    output_scale: float = 1.0      # the returned sample is x * output_scale
    info: dict = field(default_factory=dict)  # free-form: order, timesteps, sigmas (for tests and logs)

    def coefficient_table(self, guidance: float = 1.0, delta: float = 1.0,
                          device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """[num_calls, 11 + 3K] float32, computed in float64 then rounded once."""
        rows = [c.folded().row(self.history_slots, guidance, delta) for c in self.calls]
        return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)

    @property
    def timesteps(self) -> List[float]:
        return [c.timestep for c in self.calls]

    @property
    def call_steps(self) -> List[int]:
        """[num_calls] the step each call belongs to (0-based, non-decreasing, no gaps): ``Call.step`` where set,
        else a step of its own."""
        if all(c.step < 0 for c in self.calls):
            return list(range(len(self.calls)))
        return [c.step for c in self.calls]

    @property
    def num_steps(self) -> int:
        """The number of sampler steps of this plan (num_inference_steps less ``begin``)."""
        steps = self.call_steps
        return steps[-1] + 1 if steps else 0

    def validate(self) -> None:
        if not 0 <= self.history_slots <= _ref.MAX_HISTORY:
            raise ValueError(f"history_slots must be in [0, {_ref.MAX_HISTORY}], got {self.history_slots}")
        for i, c in enumerate(self.calls):
            if c.write_slot >= self.history_slots:
                raise ValueError(f"call {i}: write_slot {c.write_slot} >= history_slots {self.history_slots}")
            if c.anchor not in ("keep", "x", "y", "x_next"):
                raise ValueError(f"call {i}: anchor must be keep|x|y|x_next, got {c.anchor!r}")
            if c.anchor == "y" and not c.want_y:
                raise ValueError(f"call {i}: anchor='y' needs want_y=True")
        labelled = [c.step >= 0 for c in self.calls]
        if any(labelled) and not all(labelled):
            raise ValueError("Call.step must be set on every call of a plan or on none")
        steps = self.call_steps
        if steps and (steps[0] != 0 or any(b - a not in (0, 1) for a, b in zip(steps, steps[1:]))):
            raise ValueError(f"Call.step must count 0, 1, 2, ... over the calls (repeats allowed), got {steps}")


def randn_like_diffusers(shape, generator: Union[None, torch.Generator, Sequence[torch.Generator]],
                         device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw N(0, I) the way diffusers' ``randn_tensor`` does: on the generator's device, then moved; a list of
    generators draws batch row i from generator i (ValueError naming ``generator`` if the counts differ)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1,) + tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


NoiseFn = Callable[[int, torch.Size], torch.Tensor]


def check_guidance_args(guidance_scale: Optional[float], guidance_rescale: float, cfg_delta: float) -> None:
    """:func:`run_plan`'s guidance scalars: finite numbers (a NaN or infinite w gives NaN / a black image), phi in
    [0, 1] (Lin et al. 2305.08891 eq. 16 mixes the rescaled and the plain prediction); ValueError naming the
    argument. The sign of w is left to the caller (the pipelines require w >= 0)."""
    def finite(value) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    if guidance_scale is not None and not finite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number or None, got {guidance_scale!r}")
    if not finite(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if not finite(cfg_delta):
        raise ValueError(f"cfg_delta must be a finite number, got {cfg_delta!r}")


def run_plan(
    plan: SamplerPlan,
    model_fn: ModelFn,
    x: torch.Tensor,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.0,
    cfg_delta: float = 1.0,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    noise_fn: Optional[NoiseFn] = None,
    callback: Optional[Callable[[int, Call, torch.Tensor], None]] = None,
    before_call: Optional[Callable[[int, Call], None]] = None,
    progress: bool = False,
    update_fn: Optional[Callable] = None,
    initial_history: Optional[torch.Tensor] = None,
    initial_anchor: Optional[torch.Tensor] = None,
    table: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ``plan`` from the initial state ``x`` (already multiplied by ``plan.init_noise_scale``).

    Args:
        model_fn: ``model_fn(x_in, timestep) -> out`` or ``-> (cond, uncond)`` under guidance; ``x_in`` is
            ``x * call.input_scale`` in fp32; outputs may be fp16/bf16/fp32 with x's shape.
        guidance_scale: ``w`` of classifier-free guidance; None when the model returns a single tensor.
        guidance_rescale: ``phi`` of Lin et al.'s guidance rescale (0 disables it).
        cfg_delta: the unconditional scale ``delta`` (1 for standard CFG, StreamDiffusion's RCFG uses others).
        noise_fn: ``noise_fn(call_index, shape) -> fp32 tensor``, to inject noise (tests, parity); default draws
            with ``generator`` like diffusers (a list of generators: row i from generator i).
        callback: called as ``callback(call_index, call, x_next)`` after every call.
        before_call: called as ``before_call(call_index, call)`` before every model evaluation (a pipeline's
            per-call context follows the loop with it: caches key on the call's step, never on counted calls).
        update_fn: the fused update to use (default :func:`velodiff.ops.sampler_update`).
        initial_history: [K, *x.shape] values for the ring buffer (default zeros), e.g. exact predictions at
            the points before the start for a plan built with ``warm_start=True``; copied, not modified.
        initial_anchor: the anchor before the first call (default none).
        table: the plan's coefficient table on x's device, from :meth:`SamplerPlan.coefficient_table` with the
            same guidance; pass it to keep host-to-device copies out of a CUDA-graph capture of this loop.
    Returns:
        fp32 tensor of x's shape: the final sample times ``plan.output_scale``.
    """
    from velodiff import ops  # late import: ops loads the native module

    plan.validate()
    check_guidance_args(guidance_scale, guidance_rescale, cfg_delta)
    update = update_fn or ops.sampler_update
    x = x.to(torch.float32).contiguous()
    guided = guidance_scale is not None
    if table is None:
        table = plan.coefficient_table(guidance_scale if guided else 1.0, cfg_delta, device=x.device)
    elif table.shape[0] != len(plan.calls) or table.device != x.device:
        raise ValueError(f"table must be [{len(plan.calls)}, ...] on {x.device}, got {tuple(table.shape)} "
                         f"on {table.device}")
    k = plan.history_slots
    history = x.new_zeros((k,) + tuple(x.shape)) if k > 0 else None
    if initial_history is not None:
        if history is None or initial_history.shape != history.shape:
            raise ValueError(f"initial_history must have shape {None if history is None else tuple(history.shape)},"
                             f" got {tuple(initial_history.shape)}")
        history.copy_(initial_history)
    anchor: Optional[torch.Tensor] = None
    if initial_anchor is not None:
        anchor = initial_anchor.to(device=x.device, dtype=torch.float32).contiguous()
    iterator = enumerate(plan.calls)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, total=len(plan.calls), desc=plan.name)
    for i, call in iterator:
        x_in = x if call.input_scale == 1.0 else x * call.input_scale
        if before_call is not None:
            before_call(i, call)
        out = model_fn(x_in, call.timestep)
        if isinstance(out, (tuple, list)):
            if not guided:
                raise ValueError("model_fn returned (cond, uncond) but guidance_scale is None")
            cond, uncond = out
        else:
            if guided:
                raise ValueError("guidance_scale is set but model_fn returned a single tensor; "
                                 "return (cond, uncond)")
            cond, uncond = out, None
        noise = None
        if call.noise:
            noise = noise_fn(i, x.shape) if noise_fn is not None else randn_like_diffusers(
                x.shape, generator, x.device)
            noise = noise.to(device=x.device, dtype=torch.float32).contiguous()
        x_next, y = update(x, cond.contiguous(), None if uncond is None else uncond.contiguous(),
                           anchor, noise, history, table[i], write_slot=call.write_slot,
                           guidance_rescale=guidance_rescale if guided else 0.0, want_y=call.want_y)
        if call.anchor == "x":
            anchor = x
        elif call.anchor == "y":
            anchor = y
        elif call.anchor == "x_next":
            anchor = x_next
        x = x_next
        if callback is not None:
            callback(i, call, x)
    return x * plan.output_scale if plan.output_scale != 1.0 else x


def replace(call: Call, **changes) -> Call:
    """A copy of ``call`` with some fields changed."""
    return dataclasses.replace(call, **changes)
