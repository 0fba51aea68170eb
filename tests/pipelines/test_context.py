"""The per-call denoising context (velodiff.pipelines.context): follows the plan's steps, lives exactly one call,
is never shared between pipelines or threads."""
import threading

import numpy as np
import pytest
import torch

import velodiff as vd
from velodiff.pipelines.context import ContextHolder, DenoiseContext
from velodiff.sampling import NoiseSchedule, build_plan


@pytest.fixture(scope="module")
def pipe():
    p = vd.Pipeline.from_pretrained("digits")
    p.set_progress_bar_config(disable=True)
    return p


def _record(pipe, monkeypatch):
    """Wrap the UNet to record the context it sees at every evaluation."""
    seen = []
    original = pipe.unet.forward

    def spy(*args, **kwargs):
        ctx = pipe.denoise_context
        seen.append((ctx.call_index, ctx.step, ctx.is_first_call_of_step, ctx.num_steps, ctx.begin, ctx.timestep,
                     ctx.cfg, ctx.cond_first, ctx.batch_size))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    return seen


@pytest.mark.parametrize("sampler, steps", [("heun", 6), ("dpmpp_2m", 5), ("dpm_solver_3", 6), ("euler_a", 4)])
def test_context_follows_the_plan(pipe, monkeypatch, sampler, steps):
    seen = _record(pipe, monkeypatch)
    assert pipe.denoise_context is None
    pipe("a 3", num_inference_steps=steps, sampler=sampler, num_images_per_prompt=2, output_type="np")
    assert pipe.denoise_context is None
    plan = build_plan(sampler, NoiseSchedule.sd(), steps)
    assert [s[0] for s in seen] == list(range(len(plan.calls)))
    assert [s[1] for s in seen] == plan.call_steps
    assert [s[5] for s in seen] == pytest.approx(plan.timesteps)
    assert {s[3] for s in seen} == {steps} and {s[4] for s in seen} == {0}
    assert all(s[6:] == ("batched", False, 2) for s in seen)  # digits' pipeline puts the unconditional half first
    first = [s[2] for s in seen]
    assert first == [i == 0 or plan.call_steps[i - 1] != plan.call_steps[i] for i in range(len(first))]
    if sampler == "heun":
        assert len(seen) == 2 * steps - 1 and seen[-1][1] == steps - 1


def test_unguided_and_img2img(pipe, monkeypatch):
    seen = _record(pipe, monkeypatch)
    pipe("a 3", num_inference_steps=4, guidance_scale=1.0, output_type="np")
    assert {s[6] for s in seen} == {"none"}
    seen.clear()
    image = torch.rand(1, 3, 16, 16)
    pipe("a 3", image=image, strength=0.5, num_inference_steps=10, output_type="np")
    # strength 0.5 of 10 steps: the run starts at step 5 of the discretisation and makes 5 steps
    assert [s[1] for s in seen] == [0, 1, 2, 3, 4] and {s[3] for s in seen} == {5} and {s[4] for s in seen} == {5}


def test_context_is_closed_when_the_loop_fails(pipe, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(pipe.denoise_context.step)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe.unet, "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        pipe("a 3", num_inference_steps=3, output_type="np")
    assert calls == [0] and pipe.denoise_context is None


def test_state_lives_one_call_and_pipelines_do_not_share(pipe, monkeypatch):
    other = vd.Pipeline.from_pretrained("digits")
    other.set_progress_bar_config(disable=True)
    owner, seen = object(), []
    original = pipe.unet.forward

    def spy(*args, **kwargs):
        state = pipe.denoise_context.state_for(owner)
        state["n"] = state.get("n", 0) + 1
        seen.append((state["n"], other.denoise_context))
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    pipe("a 3", num_inference_steps=3, output_type="np")
    pipe("a 3", num_inference_steps=3, output_type="np")
    assert [n for n, _ in seen] == [1, 2, 3, 1, 2, 3]  # fresh state per call
    assert all(o is None for _, o in seen)             # the other pipeline has no open context


def test_threads_get_their_own_context():
    holder = ContextHolder("test")
    barrier, seen = threading.Barrier(2), {}

    def work(name, steps):
        ctx = DenoiseContext(sampler=name, call_steps=tuple(range(steps)))
        with holder.open(ctx):
            barrier.wait()
            seen[name] = holder.current.sampler, holder.current.num_steps
            barrier.wait()
        seen[name + "-after"] = holder.current

    threads = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", 3), ("b", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"a": ("a", 3), "b": ("b", 5), "a-after": None, "b-after": None}


def test_nested_open_is_refused():
    holder = ContextHolder("test")
    ctx = DenoiseContext(sampler="x", call_steps=(0,))
    with holder.open(ctx):
        with pytest.raises(RuntimeError, match="already running"):
            with holder.open(ctx):
                pass
    assert holder.current is None


def test_context_properties():
    ctx = DenoiseContext(sampler="heun", call_steps=(0, 0, 1, 1, 2), begin=3)
    assert ctx.step == -1 and ctx.num_steps == 3 and ctx.total_steps == 6 and ctx.num_calls == 5
    ctx.advance(3, 500.0)
    assert ctx.step == 1 and not ctx.is_first_call_of_step and not ctx.is_last_step and ctx.timestep == 500.0
    ctx.advance(4, 10.0)
    assert ctx.is_first_call_of_step and ctx.is_last_step
    with pytest.raises(IndexError):
        ctx.advance(5, 0.0)


def test_state_is_per_cfg_branch_unless_shared():
    ctx = DenoiseContext(sampler="x", call_steps=(0,), cfg="split")
    owner = object()
    outside = ctx.state_for(owner)
    with ctx.branch("cond"):
        assert ctx.cfg_branch == "cond"
        cond = ctx.state_for(owner)
        shared = ctx.state_for(owner, per_branch=False)
    with ctx.branch("uncond"):
        uncond = ctx.state_for(owner)
        assert ctx.state_for(owner, per_branch=False) is shared
    assert ctx.cfg_branch is None and shared is outside
    assert len({id(outside), id(cond), id(uncond)}) == 3
    with pytest.raises(ValueError, match="branch"):
        with ctx.branch("both"):
            pass


def test_plan_steps_are_validated():
    plan = build_plan("heun", NoiseSchedule.sd(), 4)
    assert plan.num_steps == 4 and plan.call_steps == [0, 0, 1, 1, 2, 2, 3]
    plan.calls[2].step = 3
    with pytest.raises(ValueError, match="count 0, 1, 2"):
        plan.validate()
    plan.calls[2].step = -1
    with pytest.raises(ValueError, match="every call"):
        plan.validate()
    assert np.array_equal(build_plan("ddim", NoiseSchedule.sd(), 5, begin=2).call_steps, [0, 1, 2])
