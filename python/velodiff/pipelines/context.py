"""The per-call denoising context: what a technique may know about the loop of the current pipeline call.

A pipeline opens one :class:`DenoiseContext` when its denoising loop starts and closes it when the loop ends
(whatever way it ends): nothing survives between calls, and two pipelines (or two threads calling one pipeline)
never share one, because each pipeline keeps its context in a :class:`contextvars.ContextVar` of its own.

The context follows the sampler plan, not the model calls: before every model evaluation the loop tells it the
call's index, and the call's step comes from the plan (``SamplerPlan.call_steps``: Heun's two evaluations of one
step share its index). Techniques (caches) decide on :attr:`DenoiseContext.step`, never on counted forward calls
or on looking a timestep up in a list, which breaks for samplers that repeat timesteps.

Techniques keep their per-call state in :meth:`DenoiseContext.state_for`, a dict per technique that lives exactly
as long as the call.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple


@dataclass
class DenoiseContext:
    """The denoising loop of one pipeline call, as the sampler plan describes it.

    sampler: the sampler's name. call_steps: [num_calls] the step of each model evaluation. begin: the index of
    the first step in the full ``num_inference_steps`` discretisation (image-to-image starts part-way; 0 else).
    guided: classifier-free guidance is on. cfg: how the guided evaluation runs: ``"batched"`` (one denoiser call
    on [x; x], the conditional half first when ``cond_first``), ``"split"`` (two denoiser calls on x, the
    conditional one first; see :class:`velodiff.accel.SplitCFG`) or ``"none"``. batch_size: images per half.
    call_timesteps: [num_calls] the model timestep of each evaluation (the plan's; empty when not given), for
    techniques that prepare later evaluations ahead (Faster Diffusion's batched decoder).
    call_index / timestep: the current evaluation (-1 / None before the first). cfg_branch: under split CFG, the
    denoiser call running now: ``"cond"`` or ``"uncond"`` (None otherwise).

    Per-call state (:meth:`state_for`) is kept per CFG branch by default: under split CFG the conditional and the
    unconditional calls of a step are two different evaluations, and a cache that mixed them would reuse one
    branch's features in the other (the call-parity bug of peers)."""

    sampler: str
    call_steps: Tuple[int, ...]
    begin: int = 0
    guided: bool = False
    cfg: str = "none"
    cond_first: bool = True
    batch_size: int = 1
    call_timesteps: Tuple[float, ...] = ()
    call_index: int = -1
    timestep: Optional[float] = None
    cfg_branch: Optional[str] = None
    _state: Dict[Tuple[int, Optional[str]], Tuple[Any, Dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def num_calls(self) -> int:
        return len(self.call_steps)

    @property
    def num_steps(self) -> int:
        """Steps in this run (``num_inference_steps - begin``)."""
        return self.call_steps[-1] + 1 if self.call_steps else 0

    @property
    def total_steps(self) -> int:
        """Steps of the whole discretisation (``num_inference_steps``)."""
        return self.begin + self.num_steps

    @property
    def step(self) -> int:
        """The current step, 0-based within this run (-1 before the first evaluation)."""
        return self.call_steps[self.call_index] if self.call_index >= 0 else -1

    @property
    def is_first_call_of_step(self) -> bool:
        """Whether the current evaluation is the first of its step (Heun's corrector is not)."""
        i = self.call_index
        return i == 0 or (i > 0 and self.call_steps[i - 1] != self.call_steps[i])

    @property
    def is_last_step(self) -> bool:
        return self.step == self.num_steps - 1

    def advance(self, call_index: int, timestep: float) -> None:
        """The loop is about to evaluate call ``call_index`` (at ``timestep``)."""
        if not 0 <= call_index < self.num_calls:
            raise IndexError(f"call_index {call_index} outside the plan's {self.num_calls} calls")
        self.call_index, self.timestep = int(call_index), float(timestep)

    @contextlib.contextmanager
    def branch(self, name: str) -> Iterator["DenoiseContext"]:
        """Mark the denoiser call made inside the block as CFG branch ``name`` (``"cond"`` or ``"uncond"``)."""
        if name not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', got {name!r}")
        previous, self.cfg_branch = self.cfg_branch, name
        try:
            yield self
        finally:
            self.cfg_branch = previous

    def state_for(self, owner: Any, per_branch: bool = True) -> Dict[str, Any]:
        """The per-call state dict of ``owner`` (a technique), created empty on first use in this call; one per CFG
        branch under split CFG unless ``per_branch`` is False (then one shared by both branches)."""
        key = (id(owner), self.cfg_branch if per_branch else None)
        if key not in self._state:
            self._state[key] = (owner, {})  # keeps owner alive so that its id is not reused within the call
        return self._state[key][1]


class ContextHolder:
    """A pipeline's slot for its open context (a ContextVar of its own: per pipeline, per thread)."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar[Optional[DenoiseContext]] = contextvars.ContextVar(name, default=None)

    @property
    def current(self) -> Optional[DenoiseContext]:
        return self._var.get()

    @contextlib.contextmanager
    def open(self, context: DenoiseContext) -> Iterator[DenoiseContext]:
        """Make ``context`` current for the duration of the ``with`` block; always closed at its end."""
        if self._var.get() is not None:
            raise RuntimeError("this pipeline is already running a denoising loop in this thread; a pipeline call "
                               "cannot start another one inside it")
        token = self._var.set(context)
        try:
            yield context
        finally:
            self._var.reset(token)
