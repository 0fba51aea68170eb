"""Starting a plan part-way (``begin=k``, image-to-image) against diffusers' schedulers after the same slicing:
``set_timesteps(N)``, ``timesteps[k * order:]``, ``set_begin_index(k * order)``, noise added with the scheduler's
``add_noise`` (``scale_noise`` for flow matching) at the first remaining timestep."""
import inspect

import pytest
import torch
import diffusers

from velodiff.sampling import NoiseSchedule, build_plan, run_plan
from velodiff.sampling.schedules import FlowSchedule
from parity import dummy_model, relative_error

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DDIM = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# (velodiff sampler, options, diffusers class, its config)
CASES = {
    "ddim": ("ddim", {}, "DDIMScheduler", DDIM),
    "ddpm": ("ddpm", {}, "DDPMScheduler", dict(clip_sample=False)),
    "euler": ("euler", {}, "EulerDiscreteScheduler", {}),
    "euler_karras": ("euler", {"sigma_schedule": "karras"}, "EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    "euler_a": ("euler_a", {}, "EulerAncestralDiscreteScheduler", {}),
    "heun": ("heun", {}, "HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("dpmpp_2m", {}, "DPMSolverMultistepScheduler", {}),
    "dpmpp_3m": ("dpmpp_3m", {}, "DPMSolverMultistepScheduler", dict(solver_order=3)),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++")),
    "dpm_solver_1": ("dpm_solver_1", {}, "DPMSolverSinglestepScheduler", dict(solver_order=1)),
    "dpm_solver_2": ("dpm_solver_2", {}, "DPMSolverSinglestepScheduler", dict(solver_order=2)),
    "dpm_solver_3": ("dpm_solver_3", {}, "DPMSolverSinglestepScheduler", dict(solver_order=3)),
    "unipc": ("unipc", {}, "UniPCMultistepScheduler", {}),
    "unipc_3": ("unipc", {"solver_order": 3, "disable_corrector": [4]}, "UniPCMultistepScheduler",
                dict(solver_order=3, disable_corrector=[4])),
    "lcm": ("lcm", {}, "LCMScheduler", {}),
    "flow_euler": ("flow_euler", {"spacing": "scheduler"}, "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
}


def diffusers_from(ref, n, k, x0, noise, seed=0):
    """diffusers' img2img loop from point k: (noised start, samples after each step)."""
    ref.set_timesteps(n)
    timesteps = ref.timesteps[k * ref.order:]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(k * ref.order)
    if hasattr(ref, "scale_noise"):
        x = ref.scale_noise(x0, timesteps[:1], noise)
    else:
        x = ref.add_noise(x0, noise, timesteps[:1])
    start = x.clone()
    gen = torch.Generator().manual_seed(seed)
    step_kwargs = {"generator": gen} if "generator" in inspect.signature(ref.step).parameters else {}
    scale = getattr(ref, "scale_model_input", lambda x, t: x)
    out = []
    for t in timesteps:
        m = dummy_model(scale(x, t), float(t))
        x = ref.step(m, t, x, **step_kwargs).prev_sample
        out.append(x.clone())
    return [float(t) for t in timesteps], start, out


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n,k", [(10, 3), (20, 7), (12, 1)])
def test_begin_matches_diffusers_after_slicing(case, n, k):
    name, opts, cls, cfg = CASES[case]
    flow = name == "flow_euler"
    ref = getattr(diffusers, cls)(**({} if flow else SD), **cfg)
    schedule = FlowSchedule(shift=3.0) if flow else NoiseSchedule.sd()
    plan = build_plan(name, schedule, n, begin=k, **opts)
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    ts, start, expect = diffusers_from(ref, n, k, x0, noise)
    assert plan.timesteps == pytest.approx(ts, rel=1e-5, abs=2e-3)
    # the pipeline's noising from plan.info["start"] gives diffusers' add_noise
    info = plan.info["start"]
    assert info["timestep"] == pytest.approx(ts[0], rel=1e-5, abs=2e-3)
    ours_start = info["state_scale"] * (info["alpha"] * x0.double() + info["sigma"] * noise.double())
    assert relative_error(ours_start, start) <= 1e-5
    got = []
    run_plan(plan, dummy_model, start.clone(), generator=torch.Generator().manual_seed(0),
             callback=lambda i, call, x: got.append(x.clone()))
    assert len(got) == len(expect)
    for i, (a, b) in enumerate(zip(got, expect)):
        assert relative_error(a, b) <= 1e-5, f"{case} step {i}: {relative_error(a, b)}"


def test_multistep_lower_order_final_counts_all_steps():
    # 20 steps from point 8: 12 calls remain, but diffusers' "N < 15" rule sees N = 20 -> no lower-order final
    plan = build_plan("dpmpp_3m", NoiseSchedule.sd(), 20, begin=8)
    assert plan.info["orders"] == [1, 2] + [3] * 9 + [1]
    assert build_plan("dpmpp_3m", NoiseSchedule.sd(), 12).info["orders"] == [1, 2] + [3] * 8 + [2, 1]


def test_singlestep_keeps_the_full_order_list():
    full = build_plan("dpm_solver_3", NoiseSchedule.sd(), 12).info["orders"]
    assert build_plan("dpm_solver_3", NoiseSchedule.sd(), 12, begin=1).info["orders"] == [1, 2] + full[3:]
    assert build_plan("dpm_solver_3", NoiseSchedule.sd(), 12, begin=2).info["orders"] == [1] + full[3:]


@pytest.mark.parametrize("name", ["ghvb", "bdia", "dpmpp_3m_exact"])
def test_begin_is_a_fresh_run_from_that_point(name):
    # samplers without a diffusers counterpart: begin=k equals the plan over the remaining points, i.e. the plan
    # whose first call is a first-order (DDIM) step and whose later calls repeat the full plan's structure
    sd = NoiseSchedule.sd()
    full, late = build_plan(name, sd, 12), build_plan(name, sd, 12, begin=4)
    assert late.timesteps == full.timesteps[4:]
    ddim_first = build_plan("ddim", sd, 12, begin=4).calls[0] if name != "dpmpp_3m_exact" else \
        build_plan("dpmpp_2m", sd, 12, begin=4).calls[0]
    first = late.calls[0].folded()
    ref = ddim_first.folded()
    for field in ("c_x", "c_d"):
        assert getattr(first, field) == pytest.approx(getattr(ref, field), rel=1e-9)
    # the same final sample as the full plan run from the same noised start at a different k is not expected;
    # but begin=0 is the unchanged full plan
    assert [c.folded().row(full.history_slots, 1.0, 1.0) for c in build_plan(name, sd, 12, begin=0).calls] == \
        [c.folded().row(full.history_slots, 1.0, 1.0) for c in full.calls]


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "dpm_solver_2", "unipc", "lcm", "ddpm",
                                  "ghvb", "bdia", "euler_a"])
def test_bad_begin_raises(name):
    for bad in (-1, 10, 2.5, True):
        with pytest.raises(ValueError, match="begin"):
            build_plan(name, NoiseSchedule.sd(), 10, begin=bad)


def test_begin_and_warm_start_exclusive():
    for name in ("dpmpp_2m", "dpm_solver_2", "unipc"):
        with pytest.raises(ValueError, match="begin"):
            build_plan(name, NoiseSchedule.sd(), 10, begin=2, warm_start=True)
