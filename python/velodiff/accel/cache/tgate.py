"""T-GATE: temporally gating the attention (Liu et al., TMLR 2025, arXiv 2404.02747; reference code
HaozheLiu-ST/T-GATE, the ``tgate`` package).

Cross-attention matters in the first steps (semantics planning) and little after (fidelity improving). T-GATE
computes it up to a gate step, keeps its output, and from then on reuses the kept output and drops classifier-free
guidance: the UNet runs on one half of the CFG batch, and the sampling loop gets that half as both the conditional
and the unconditional prediction, so the fused update's guided prediction g = delta*u + w*(c - delta*u) is c (and
guidance rescale leaves it as it is). Self-attention is cached on an interval in both phases.

The schedule, per step s of the run (0-based; image-to-image counts the steps the run makes), gate step G:

- s < G - 1 (semantics planning): cross-attention computed. Self-attention computed for s < ``warm_up``, computed and
  kept at s == ``warm_up``, afterwards computed and kept when s % ``sp_interval`` == 0 and reused otherwise.
- s == G - 1: both computed, and each kept as the mean of its unconditional and conditional halves.
- s >= G (fidelity improving): cross-attention reused; self-attention computed and kept when s % ``fi_interval`` == 0,
  reused otherwise; CFG dropped.

"Kept" is the attention output after ``to_out``, before the residual add, per attention layer. The reference code's
defaults are gate_step 10, sp_interval 5, fi_interval 1, warm_up 2 (its SDXL setting for 25 steps). Where it differs
from the reference: the step is the plan's step (the reference counts scheduler iterations, twice per step for
Heun); after the gate the UNet runs the *conditional* half (the reference runs the unconditional prompt's half; for
SD 1.x / 2.x the text reaches the UNet only through the cross-attention, which is then the kept mean, so the two
agree, but SDXL's pooled text embedding enters the time embedding, and the conditional half is the one closer to the
guided prediction; under split CFG the unconditional call after the gate returns the conditional call's output); without guidance the kept outputs are the outputs themselves (the reference would average the
two halves of an unguided batch of two images). The output never changes only with ``gate_step`` beyond the run's
last step *and* ``sp_interval=1``: the default sp_interval reuses self-attention before the gate too, as the paper
does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from velodiff.accel.cache.base import CacheTechnique
from velodiff.accel.cache.unet_hooks import check_int, install_unet_dispatcher, replace_forward
from velodiff.accel.registry import register

__all__ = ["TGate", "tgate_actions"]

COMPUTE, KEEP, KEEP_MEAN, REUSE = "compute", "keep", "keep_mean", "reuse"


def tgate_actions(step: int, gate_step: int, sp_interval: int, fi_interval: int, warm_up: int) -> Tuple[str, str]:
    """(cross-attention action, self-attention action) at ``step``: ``compute``, ``keep`` (compute and keep),
    ``keep_mean`` (compute, keep the mean of the CFG halves) or ``reuse``."""
    if step == gate_step - 1:
        return KEEP_MEAN, KEEP_MEAN
    if step >= gate_step:
        return REUSE, (KEEP if step % fi_interval == 0 else REUSE)
    if step < warm_up:
        return COMPUTE, COMPUTE
    if step == warm_up or step % sp_interval == 0:
        return COMPUTE, KEEP
    return COMPUTE, REUSE


@register("tgate")
@dataclass(frozen=True)
class TGate(CacheTechnique):
    """T-GATE on a UNet pipeline (see :mod:`velodiff.accel.cache.tgate`): cross-attention kept at ``gate_step - 1``
    and reused after it, CFG dropped after it; self-attention kept every ``sp_interval`` steps before the gate (from
    ``warm_up`` on) and every ``fi_interval`` steps after it, reused in between."""

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def validate(self) -> None:
        check_int("tgate", "gate_step", self.gate_step, 1)
        check_int("tgate", "sp_interval", self.sp_interval, 1)
        check_int("tgate", "fi_interval", self.fi_interval, 1)
        check_int("tgate", "warm_up", self.warm_up, 0)

    def actions(self, step: int) -> Tuple[str, str]:
        return tgate_actions(step, self.gate_step, self.sp_interval, self.fi_interval, self.warm_up)

    def apply(self, pipe) -> Callable[[], None]:
        from velodiff.models.attention import Attention

        def dropped(context, args) -> bool:
            return (context.cfg == "batched" and context.step >= self.gate_step
                    and args.batch == 2 * context.batch_size)

        def handler(context, state, args, plain):
            if context.cfg == "split" and context.step >= self.gate_step:
                # split CFG after the gate: the conditional call runs, the unconditional one returns its output
                shared = context.state_for(self, per_branch=False)
                if context.cfg_branch == "uncond" and shared.get("cond_call") == context.call_index:
                    return shared["cond_out"].clone()
                out = args.run(plain)
                if context.cfg_branch == "cond":
                    shared["cond_call"], shared["cond_out"] = context.call_index, out
                return out
            if not dropped(context, args):
                return args.run(plain)
            b = context.batch_size
            half = args.rows(0, b) if context.cond_first else args.rows(b, 2 * b)  # the conditional half
            out = half.run(plain)
            return torch.cat([out, out])

        def attention_hook(module):
            def make(plain):
                def forward(hidden_states, encoder_hidden_states=None, attention_mask=None):
                    context = pipe.denoise_context
                    if context is None or context.call_index < 0:
                        return plain(hidden_states, encoder_hidden_states, attention_mask)
                    # one state for both split-CFG branches: the gate step keeps their mean for the conditional
                    # branch; otherwise the kept outputs are per branch (key (branch, module))
                    state = context.state_for(self, per_branch=False)
                    if state.get("step") != context.step:
                        state["step"], state["actions"] = context.step, self.actions(context.step)
                    cross = encoder_hidden_states is not None
                    action = state["actions"][0 if cross else 1]
                    kept = state.setdefault("cross" if cross else "self", {})
                    key = (context.cfg_branch, module)
                    old = kept.get(key)
                    if action == REUSE and old is not None and old.shape[0] == hidden_states.shape[0]:
                        return old.clone()  # a fresh tensor: the transformer block adds its residual in place
                    out = plain(hidden_states, encoder_hidden_states, attention_mask)
                    if action == KEEP:
                        kept[key] = out.clone()
                    elif action == KEEP_MEAN:
                        if context.cfg == "batched" and out.shape[0] == 2 * context.batch_size:
                            first, second = out.chunk(2)
                            kept[key] = (first + second) / 2
                        elif context.cfg_branch == "uncond" and ("cond", module) in kept:
                            kept[("cond", module)] = (kept[("cond", module)] + out) / 2  # cond ran first
                        else:
                            kept[key] = out.clone()
                    return out
                return forward
            return make

        undos = [replace_forward(m, attention_hook(m)) for m in pipe.unet.modules() if isinstance(m, Attention)]
        undos.append(install_unet_dispatcher(pipe, self, handler))

        def undo() -> None:
            for u in reversed(undos):
                u()
        return undo
