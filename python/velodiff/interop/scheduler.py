"""Any velodiff sampler as a diffusers scheduler: :class:`DiffusersScheduler` drops into diffusers' own
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (and their image-to-image pipelines) in place of
``DDIMScheduler`` & co.

It runs the plan of :func:`velodiff.pipelines.scheduling.make_plan` (the same plan a velodiff pipeline builds from
the same scheduler config) one call at a time, as :func:`velodiff.sampling.run_plan` does: diffusers' loop gives it
one model output per entry of :attr:`DiffusersScheduler.timesteps` (one entry per model evaluation, so Heun's two
evaluations per step are two entries), and each :meth:`~DiffusersScheduler.step` makes that call's
``velodiff.ops.sampler_update`` with the same coefficient row, history ring buffer, anchor and noise draw
(``randn_like_diffusers`` with the step's generator) as run_plan. Classifier-free guidance is diffusers' (done
before ``step``), so the update runs unguided (``uncond=None``, guidance 1).

The sampler state is kept in fp32 between calls as in run_plan; the tensor handed back to diffusers has the
sample's dtype, and when diffusers passes that same tensor back, the fp32 state is used.

    from velodiff.interop import DiffusersScheduler
    pipe.scheduler = DiffusersScheduler("dpmpp_3m_exact", pipe.scheduler)  # the schedule of the model
    image = pipe("a prompt", num_inference_steps=20).images[0]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from velodiff.interop.scheduler_config import (check_sampler_options, own_config, resolve_sampler,
                                               schedule_config_of, split_config)
from velodiff.pipelines.scheduling import make_plan
from velodiff.sampling.plan import SamplerPlan, randn_like_diffusers

#: how far a timestep handed to step() / scale_model_input() may be from the call's own (relative): the
#: timesteps tensor is float32, whose rounding is 6e-8 relative
TIMESTEP_RTOL = 1e-6


@dataclass
class SchedulerStepOutput:
    """What :meth:`DiffusersScheduler.step` returns: ``prev_sample`` [B, C, H, W] in the sample's dtype, the state
    after the call (``out[0]`` reads it too, as diffusers' ``SchedulerOutput``)."""

    prev_sample: torch.Tensor

    def __getitem__(self, index):
        return (self.prev_sample,)[index]


def _scalar(timestep, name: str = "timestep") -> float:
    """A timestep (number, 0-d or [B] tensor with one value) as a float."""
    if isinstance(timestep, torch.Tensor):
        flat = timestep.detach().reshape(-1)
        if flat.numel() == 0 or not bool((flat == flat[0]).all()):
            raise ValueError(f"{name} must be one timestep (a number or a tensor of equal values), got "
                             f"{timestep.tolist()}")
        return float(flat[0])
    if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(timestep).__name__}")
    return float(timestep)


class DiffusersScheduler:
    """A velodiff sampler behind diffusers' scheduler interface.

    ``DiffusersScheduler(sampler=None, scheduler_config=None, **sampler_options)``: ``sampler`` is any name of
    :data:`velodiff.sampling.SAMPLERS` (None: the one a velodiff pipeline would pick for this config: the sampler
    matching its ``_class_name``, else ``dpmpp_2m``); ``scheduler_config`` the diffusers scheduler config of the
    model (a dict, diffusers' ``scheduler.config``, or a scheduler object; None: Stable Diffusion's schedule),
    whose spacing, offset and prediction type the plan takes as a velodiff pipeline does; ``sampler_options`` go
    to the sampler (e.g. ``eta=0.5`` for ddim). ValueError naming ``sampler`` or the option for bad ones.

    Attributes diffusers' pipelines read: :attr:`config` (``num_train_timesteps``, ``steps_offset``, ...),
    :attr:`timesteps` (after :meth:`set_timesteps`: [num_calls] int64 when every timestep is an integer, else
    float32), :attr:`init_noise_sigma`, :attr:`order` (model evaluations per step: 2 for heun, else 1).
    """

    def __init__(self, sampler: Optional[str] = None, scheduler_config=None, **sampler_options):
        self.schedule_config: Dict[str, Any] = schedule_config_of(scheduler_config)
        self.sampler = resolve_sampler(sampler, self.schedule_config)
        self.sampler_options = check_sampler_options(self.sampler, sampler_options)
        self._internal_dict = own_config(self.sampler, self.sampler_options, self.schedule_config)
        self.plan: Optional[SamplerPlan] = None
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._full: Optional[SamplerPlan] = None
        self._order: Optional[int] = None
        self._begin_index = 0
        self._starts: Dict[int, Dict[str, float]] = {}
        self._reset()

    # --- construction from configs -----------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, **kwargs) -> "DiffusersScheduler":
        """A DiffusersScheduler for ``config``: a DiffusersScheduler's own config (its sampler and options are
        kept), any diffusers scheduler config, or a scheduler object (a DiffusersScheduler keeps its sampler; a
        diffusers one gives its class name, which picks the default sampler). ``kwargs``: ``sampler`` and sampler
        options, which win."""
        mapping = config if isinstance(config, Mapping) else getattr(config, "config", None)
        if not isinstance(mapping, Mapping):
            raise TypeError(f"config must be a scheduler config (a dict) or a scheduler, got {type(config).__name__}")
        sampler, options = split_config(mapping, kwargs)
        return cls(sampler, config, **options)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], subfolder: Optional[str] = None,
                        **kwargs) -> "DiffusersScheduler":
        """From a local folder holding ``scheduler_config.json`` (a diffusers pipeline folder with
        ``subfolder="scheduler"``, or the scheduler folder itself); nothing is downloaded. ``kwargs`` as in
        :meth:`from_config`."""
        from velodiff.loading.folders import read_config

        folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
        return cls.from_config(read_config(folder, "scheduler_config.json"), **kwargs)

    @property
    def config(self):
        """The config (a dict readable as attributes): the schedule's keys plus ``sampler``, ``sampler_options``
        and ``schedule_class_name``, under ``_class_name = "DiffusersScheduler"``."""
        return self._internal_dict

    def __repr__(self) -> str:
        return (f"DiffusersScheduler(sampler={self.sampler!r}, options={self.sampler_options}, "
                f"schedule={self.schedule_config.get('_class_name') or 'given'})")

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    # --- the discretisation ------------------------------------------------------------------------------------

    def _make(self, num_steps: int, begin: int = 0) -> SamplerPlan:
        options = dict(self.sampler_options)
        if begin:
            options["begin"] = begin
        plan = make_plan(self.sampler, self.schedule_config, num_steps, options)[1]
        plan.validate()
        return plan

    def _reset(self) -> None:
        """Forget the run: the next step() is the plan's first call."""
        self._index = 0
        self._history: Optional[torch.Tensor] = None
        self._anchor: Optional[torch.Tensor] = None
        self._state: Optional[torch.Tensor] = None
        self._returned: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None

    def _use(self, plan: SamplerPlan, device) -> None:
        self.plan = plan
        self._reset()
        # unguided: guidance 1, delta 1, as run_plan's table when guidance_scale is None
        self._table = plan.coefficient_table(1.0, 1.0, device=device if device is not None else "cpu")

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Build the sampler's plan for ``num_inference_steps`` steps (ValueError naming ``num_inference_steps``
        beyond what the sampler and schedule can give) and start a new run: :attr:`timesteps` gets one entry per
        model evaluation, on ``device``."""
        plan = self._make(num_inference_steps)
        self._full, self.num_inference_steps = plan, int(num_inference_steps)
        self._begin_index, self._starts = 0, {0: plan.info.get("start")}
        steps = plan.call_steps
        self._order = max(steps.count(s) for s in set(steps)) if steps else 1
        values = plan.timesteps
        integral = all(float(t).is_integer() for t in values)
        self.timesteps = torch.tensor(values, dtype=torch.int64 if integral else torch.float32, device=device)
        self._use(plan, device)

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at entry ``begin_index`` of :attr:`timesteps` (diffusers' image-to-image pipelines call this with
        ``t_start * order``): the plan is rebuilt to start at that step (``begin``), as velodiff's image-to-image
        does, with a fresh history. ValueError naming ``begin_index`` for an entry that does not start a step."""
        self._require_plan("set_begin_index")
        full = self._full
        steps = full.call_steps
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or not 0 <= begin_index < len(steps):
            raise ValueError(f"begin_index must be an integer in [0, {len(steps)}), got {begin_index!r}")
        step = steps[begin_index]
        if begin_index > 0 and steps[begin_index - 1] == step:
            raise ValueError(f"begin_index={begin_index} is a later model evaluation of step {step} of "
                             f"{self.sampler}; start at an entry that begins a step (a multiple of order)")
        plan = self._make(self.num_inference_steps, step) if step else full
        if [float(t) for t in plan.timesteps] != [float(t) for t in full.timesteps[begin_index:]]:
            raise ValueError(f"begin_index={begin_index}: sampler {self.sampler!r} started at step {step} evaluates "
                             "the model at other timesteps than the rest of its full run")
        self._begin_index = begin_index
        self._starts.setdefault(step, plan.info.get("start"))
        self._use(plan, self._table.device if self._table is not None else None)

    @property
    def begin_index(self) -> int:
        """The entry of :attr:`timesteps` this run started at (:meth:`set_begin_index`; 0 after set_timesteps)."""
        return self._begin_index

    @property
    def step_index(self) -> Optional[int]:
        """The entry of :attr:`timesteps` the next step() is for, counted from the start of :attr:`timesteps`; None
        before the first step of a run (diffusers' convention)."""
        return None if self.plan is None or self._index == 0 else self._begin_index + self._index

    @property
    def order(self) -> int:
        """Model evaluations per sampler step (diffusers' ``scheduler.order``): 2 for heun, else 1."""
        if self._order is None:
            try:
                steps = self._make(4).call_steps
                self._order = max(steps.count(s) for s in set(steps))
            except ValueError:
                return 1
        return self._order

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the initial noise (the plan's ``init_noise_scale``: sqrt(sigma_max^2 + 1) for samplers in
        VE space, 1 otherwise)."""
        return float(self._require_plan("init_noise_sigma").init_noise_scale)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _require_plan(self, what: str) -> SamplerPlan:
        if self.plan is None:
            raise RuntimeError(f"DiffusersScheduler.{what}: call set_timesteps(num_inference_steps) first")
        return self.plan

    def _call(self, timestep, what: str):
        plan = self._require_plan(what)
        if self._index >= len(plan.calls):
            raise RuntimeError(f"DiffusersScheduler.{what}: all {len(plan.calls)} model evaluations of this run "
                               "are done; call set_timesteps again to start another")
        call = plan.calls[self._index]
        if timestep is not None:
            t = _scalar(timestep)
            if abs(t - call.timestep) > TIMESTEP_RTOL * max(1.0, abs(call.timestep)):
                raise ValueError(f"timestep={t:g} is not the timestep of model evaluation {self._index} of this run "
                                 f"({call.timestep:g}); step through scheduler.timesteps in order "
                                 "(set_timesteps restarts)")
        return call

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The denoiser's input for this call: ``sample * input_scale`` (1/sqrt(sigma^2 + 1) in VE space), any
        shape, in the sample's dtype (computed in fp32)."""
        scale = self._call(timestep, "scale_model_input").input_scale
        if scale == 1.0:
            return sample
        if sample.dtype == torch.float32:
            return sample * scale
        return (sample.to(torch.float32) * scale).to(sample.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True):
        """One call of the plan: ``model_output`` [B, C, H, W] (any float dtype; guidance already applied) is the
        denoiser's output at ``sample`` [B, C, H, W], the state the loop holds. Returns the next state as
        :class:`SchedulerStepOutput` (``.prev_sample``), or ``(prev_sample,)`` with ``return_dict=False``; on the
        last call it is the final sample (times the plan's ``output_scale``). Noise, for samplers that draw it, is
        drawn from ``generator`` (a list: row i from generator i, as diffusers) as run_plan draws it."""
        from velodiff import ops  # late import: ops loads the native module

        call = self._call(timestep, "step")
        plan, i = self.plan, self._index
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be torch tensors")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample "
                             f"{tuple(sample.shape)}; pass the guided prediction for the sample's batch")
        x = self._state if (sample is self._returned and self._state is not None) else \
            sample.to(torch.float32).contiguous()
        if self._table.device != x.device:
            self._table = self._table.to(x.device)
        if plan.history_slots and self._history is None:
            self._history = x.new_zeros((plan.history_slots,) + tuple(x.shape))
        noise = None
        if call.noise:
            noise = randn_like_diffusers(x.shape, generator, x.device)
            noise = noise.to(device=x.device, dtype=torch.float32).contiguous()
        x_next, y = ops.sampler_update(x, model_output.contiguous(), None, self._anchor, noise, self._history,
                                       self._table[i], write_slot=call.write_slot, guidance_rescale=0.0,
                                       want_y=call.want_y)
        if call.anchor == "x":
            self._anchor = x
        elif call.anchor == "y":
            self._anchor = y
        elif call.anchor == "x_next":
            self._anchor = x_next
        self._index += 1
        if self._index == len(plan.calls) and plan.output_scale != 1.0:
            x_next = x_next * plan.output_scale
        out = x_next if sample.dtype == torch.float32 else x_next.to(sample.dtype)
        self._state, self._returned = x_next, out
        return SchedulerStepOutput(out) if return_dict else (out,)

    # --- noising clean samples ---------------------------------------------------------------------------------

    def _start(self, t: float) -> Dict[str, float]:
        """plan.info["start"] of the run that starts at the point of timestep ``t`` of the current discretisation."""
        self._require_plan("add_noise")
        full = self._full
        for index, (value, step) in enumerate(zip(full.timesteps, full.call_steps)):
            if abs(value - t) <= TIMESTEP_RTOL * max(1.0, abs(value)) and (index == 0 or
                                                                             full.call_steps[index - 1] != step):
                if step not in self._starts:
                    self._starts[step] = self._make(self.num_inference_steps, step).info.get("start")
                if self._starts[step] is None:
                    raise ValueError(f"sampler {self.sampler!r} does not record where a run starts "
                                     "(plan.info['start']), so add_noise cannot place samples on its path")
                return self._starts[step]
        raise ValueError(f"timesteps: {t:g} is not a point of this {self.num_inference_steps}-step run of "
                         f"{self.sampler} (its timesteps: {[round(v, 3) for v in full.timesteps]})")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Clean samples ``original_samples`` [B, ...] noised with ``noise`` (same shape) to the point of
        ``timesteps`` (a number or [B] tensor of entries of :attr:`timesteps`), in the sampler's state space:
        ``state_scale * (alpha x0 + sigma eps)`` with the VP alpha, sigma of that point and ``state_scale`` 1, or
        1/alpha for samplers whose state is VE-scaled (euler, heun), as velodiff's image-to-image starts. Computed
        in fp32, returned in the samples' dtype. Needs :meth:`set_timesteps` first."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but original_samples "
                             f"{tuple(original_samples.shape)}")
        values: List[float] = ([float(v) for v in timesteps.detach().reshape(-1).tolist()]
                               if isinstance(timesteps, torch.Tensor) else [_scalar(timesteps, "timesteps")])
        starts = [self._start(t) for t in values]
        x0, eps = original_samples.to(torch.float32), noise.to(torch.float32)
        if len(set(values)) == 1:
            s = starts[0]
            scale = s.get("state_scale", 1.0)
            out = (scale * s["alpha"]) * x0 + (scale * s["sigma"]) * eps
        else:
            if len(values) != x0.shape[0]:
                raise ValueError(f"timesteps has {len(values)} entries for a batch of {x0.shape[0]}")
            shape = (-1,) + (1,) * (x0.dim() - 1)
            a = torch.tensor([s.get("state_scale", 1.0) * s["alpha"] for s in starts], dtype=torch.float32)
            b = torch.tensor([s.get("state_scale", 1.0) * s["sigma"] for s in starts], dtype=torch.float32)
            out = a.to(x0.device).view(shape) * x0 + b.to(x0.device).view(shape) * eps
        return out.to(original_samples.dtype)
