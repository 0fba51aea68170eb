"""The DiT caches (FBCache, TeaCache, DBCache, TaylorSeer) on digits-dit and tiny DiT / PixArt pipelines: exact when
they never skip, for every sampler, guided or not; keyed on the plan's step and scoped to one pipeline call; never
active outside a call; refused where they do not fit; bad input named."""
import json
import math

import numpy as np
import pytest
import torch

import velodiff as vd
from velodiff.accel import TECHNIQUES, parse_technique
from velodiff.accel.cache import DBCache, FBCache, TaylorSeer, TeaCache, dit_hooks
from velodiff.accel.cache.base import UNET, CacheTechnique
from velodiff.accel.cache.calibrate import (BUILTIN_FILE, builtin_calibration, fit_teacache, model_identity,
                                            write_calibration)
from velodiff.loading import BUILTIN_MODELS
from velodiff.pipelines.context import DenoiseContext
from velodiff.sampling import SAMPLERS

from fixtures import quiet_pipeline, saved_and_loaded, tiny_dit_pipeline, tiny_pixart_pipeline

#: samplers that run on digits-dit's schedule (epsilon prediction; flow_euler needs a flow model)
DIT_SAMPLERS = sorted(s for s in SAMPLERS if s != "flow_euler")
EXACT = [FBCache(0.0), TeaCache(0.0), DBCache(0.0, fn_compute_blocks=2, bn_compute_blocks=1), TaylorSeer(interval=1)]
SKIPPING = [FBCache(0.3), TeaCache(0.3), DBCache(0.3, fn_compute_blocks=2, bn_compute_blocks=1),
            TaylorSeer(order=2, interval=3, warmup_steps=1)]


@pytest.fixture(scope="module")
def pipe():
    return quiet_pipeline("digits-dit")


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    return saved_and_loaded(tiny_dit_pipeline(), str(tmp_path_factory.mktemp("dit")))[1]


def generate(pipe, sampler="dpmpp_2m", steps=5, guidance=None, labels=(1, 7), seed=0):
    out = pipe(class_labels=list(labels), num_inference_steps=steps, sampler=sampler, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


def cached(pipe, config, fn):
    """fn() with ``config`` applied (and the decisions traced), restored afterwards: (result, trace)."""
    vd.optimize(pipe, config)
    try:
        with dit_hooks.trace(pipe) as log:
            return fn(), log
    finally:
        vd.restore(pipe)


def label(config):
    return type(config).__name__


# ----------------------------------------------------------------------------------------------------------------
# exactness and the plan
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", DIT_SAMPLERS)
def test_never_skipping_is_bit_identical_for_every_sampler(pipe, sampler):
    for guidance in (None, 1.0):  # the model's own (1.5: batched CFG) and unguided
        base = generate(pipe, sampler, guidance=guidance)
        for config in EXACT:
            got, log = cached(pipe, config, lambda: generate(pipe, sampler, guidance=guidance))
            assert torch.equal(got, base), (sampler, guidance, config)
            assert log and all(e.computed for e in log)
    assert torch.equal(generate(pipe, sampler), generate(pipe, sampler))  # and the sampler itself is deterministic


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_3m", "unipc", "euler_a", "dpm_solver_2", "dpm_solver_3", "ddpm"])
def test_skipping_works_with_every_kind_of_sampler(pipe, sampler):
    base = generate(pipe, sampler, steps=12)
    stochastic = sampler in ("euler_a", "ddpm")
    configs = SKIPPING
    if stochastic:  # fresh noise every step moves the probes by 40-90 % (TeaCache: beyond its calibrated range)
        configs = [FBCache(0.9), TeaCache(1.0, coefficients=(1.0, 0.0)),
                   DBCache(0.9, fn_compute_blocks=2, bn_compute_blocks=1), SKIPPING[3]]
    for config in configs:
        got, log = cached(pipe, config, lambda: generate(pipe, sampler, steps=12))
        assert torch.isfinite(got).all(), (sampler, config)
        assert any(not e.computed for e in log), (sampler, config)
        err = float((got - base).norm() / base.norm())
        # ancestral noise is not a smooth trajectory: reuse and extrapolation run, but far from the uncached
        # result (relative errors 3-25 at 12 steps); only deterministic samplers are held close
        assert err > 0 and (stochastic or err < 1.0), (sampler, config, err)
        steps = [e.step for e in log]
        assert steps == sorted(steps) and steps[-1] == 11


def test_teacache_computes_beyond_its_calibrated_range(pipe):
    """digits-dit's fitted polynomial turns large and negative beyond the distances its fit saw (0.016-0.15);
    ancestral sampling moves the modulated input by 40-90 % per step, so every evaluation computes instead of the
    accumulator being pushed below the threshold for good."""
    base = generate(pipe, "euler_a", steps=12)
    got, log = cached(pipe, TeaCache(0.3), lambda: generate(pipe, "euler_a", steps=12))
    assert all(e.computed for e in log) and all(e.distance > 0.16 for e in log[1:]) and torch.equal(got, base)
    # within the range it skips
    _, log = cached(pipe, TeaCache(0.3), lambda: generate(pipe, "dpmpp_2m", steps=12))
    assert any(not e.computed for e in log)


def test_two_calls_in_a_row_equal_two_fresh_calls(pipe):
    for config in SKIPPING:
        def twice():
            return generate(pipe, labels=(3, 4), seed=1, steps=10), generate(pipe, labels=(5,), seed=2, steps=8)
        (first, second), _ = cached(pipe, config, twice)
        fresh_first, _ = cached(pipe, config, lambda: generate(pipe, labels=(3, 4), seed=1, steps=10))
        fresh_second, _ = cached(pipe, config, lambda: generate(pipe, labels=(5,), seed=2, steps=8))
        assert torch.equal(first, fresh_first) and torch.equal(second, fresh_second), label(config)


def test_restore_gives_back_the_uncached_pipeline(pipe):
    base = generate(pipe, steps=10)
    for config in SKIPPING:
        got, _ = cached(pipe, config, lambda: generate(pipe, steps=10))
        assert not torch.equal(got, base)
        assert "block_stack_hook" not in vars(pipe.transformer)
        assert torch.equal(generate(pipe, steps=10), base), label(config)


def test_direct_transformer_calls_are_never_cached(pipe):
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    with torch.no_grad():
        ref = [pipe.transformer(x, t, labels) for t in (900, 899, 898)]
    for config in SKIPPING:
        vd.optimize(pipe, config)
        try:
            with dit_hooks.trace(pipe) as log, torch.no_grad():
                got = [pipe.transformer(x, t, labels) for t in (900, 899, 898)]
        finally:
            vd.restore(pipe)
        assert log == [] and all(torch.equal(a, b) for a, b in zip(got, ref)), label(config)


def test_an_extra_transformer_call_inside_an_evaluation_is_not_cached(pipe, monkeypatch):
    """A second forward within one evaluation of the loop (say from a wrapper) runs whole and leaves the state."""
    config = FBCache(0.3)
    base, base_log = cached(pipe, config, lambda: generate(pipe, steps=10))
    original = pipe.transformer.forward
    extra = []

    def twice(*args, **kwargs):
        out = original(*args, **kwargs)
        extra.append(original(*args, **kwargs))
        return out

    monkeypatch.setattr(pipe.transformer, "forward", twice)
    got, log = cached(pipe, config, lambda: generate(pipe, steps=10))
    assert torch.equal(got, base) and [e.computed for e in log] == [e.computed for e in base_log]
    assert len(extra) == len(log)


def test_decisions_follow_the_plan_steps(pipe):
    """Heun: two evaluations per step (one in the last); TeaCache computes every evaluation of the first and the last
    step; TaylorSeer's schedule is in steps; DBCache's warm-up is in steps."""
    _, log = cached(pipe, TeaCache(5.0, coefficients=(1.0, 0.0)), lambda: generate(pipe, "heun", steps=6))
    assert [e.step for e in log] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert [e.computed for e in log] == [True, True] + [False] * 8 + [True]
    _, log = cached(pipe, TaylorSeer(interval=3, warmup_steps=2), lambda: generate(pipe, "heun", steps=8))
    computed_steps = sorted({e.step for e in log if e.computed})
    assert computed_steps == [0, 1, 4, 7] and all(e.computed == (e.step in computed_steps) for e in log)
    _, log = cached(pipe, DBCache(10.0, warmup_steps=3, max_continuous_cached_steps=None),
                    lambda: generate(pipe, "heun", steps=6))
    assert all(e.computed == (e.step < 3) for e in log)


def test_dbcache_front1_back0_is_fbcache_bit_for_bit(pipe):
    skipped = 0
    for threshold in (0.05, 0.12, 0.3, 0.9):
        for sampler in ("dpmpp_2m", "heun", "euler_a"):
            fb, fb_log = cached(pipe, FBCache(threshold), lambda: generate(pipe, sampler, steps=12))
            db, db_log = cached(pipe, DBCache(threshold, fn_compute_blocks=1, bn_compute_blocks=0,
                                              max_continuous_cached_steps=None, taylorseer_order=0),
                                lambda: generate(pipe, sampler, steps=12))
            assert torch.equal(fb, db) and fb_log == db_log, (threshold, sampler)
            skipped += sum(not e.computed for e in fb_log)
    assert skipped > 20


def test_dbcache_blocks_and_caps(pipe):
    n = pipe.transformer.num_blocks
    _, log = cached(pipe, DBCache(10.0, fn_compute_blocks=2, bn_compute_blocks=1), lambda: generate(pipe, steps=10))
    assert {e.blocks_run for e in log if not e.computed} == {3} and {e.blocks_run for e in log if e.computed} == {n}
    _, log = cached(pipe, DBCache(10.0, max_cached_steps=3), lambda: generate(pipe, steps=10))
    assert sum(not e.computed for e in log) == 3
    _, log = cached(pipe, DBCache(10.0, max_continuous_cached_steps=2), lambda: generate(pipe, steps=10))
    assert [e.computed for e in log] == [True, False, False] * 3 + [True]
    _, log = cached(pipe, DBCache(10.0, max_continuous_cached_steps=0), lambda: generate(pipe, steps=5))
    assert all(e.computed for e in log)


def test_dbcache_taylorseer_forecast(pipe):
    """With taylorseer_order the reused middle residual is forecast from the computed steps: same decisions, and
    closer to the uncached result than plain reuse (the measured gain of the default on digits-dit)."""
    base = generate(pipe, steps=20, labels=range(10))
    errors = {}
    for order in (0, 1):
        got, log = cached(pipe, DBCache(0.12, taylorseer_order=order),
                          lambda: generate(pipe, steps=20, labels=range(10)))
        errors[order] = (float((got - base).norm() / base.norm()), [e.computed for e in log])
    assert errors[0][1] == errors[1][1] and not all(errors[0][1])
    assert errors[1][0] < 0.7 * errors[0][0], errors


def test_fbcache_probe_survives_a_block_that_writes_its_input(pipe, monkeypatch):
    """The FBCache bug of peers: a first block that updates its input in place makes the residual zero (0/0 = NaN,
    the cache never hits). The cache notices, computes that evaluation, and copies the input from then on."""
    block = pipe.transformer.transformer_blocks[0]
    original = type(block).forward

    def in_place(self, x, *args):
        return x.copy_(original(self, x, *args))

    base, base_log = cached(pipe, FBCache(0.2), lambda: generate(pipe, steps=12))
    monkeypatch.setattr(type(block), "forward", in_place)
    got, log = cached(pipe, FBCache(0.2), lambda: generate(pipe, steps=12))
    assert torch.isfinite(got).all()
    assert log[0].computed and math.isnan(log[0].distance)     # the first evaluation found the aliasing
    assert all(math.isfinite(e.distance) for e in log[2:])     # then real distances (not 0/0)
    assert any(not e.computed for e in log)                    # and the cache hits


def test_taylorseer_forecast_is_exact_for_a_residual_linear_in_the_step():
    """order 1 extrapolates a residual that is linear in the step exactly; order 0 reuses the last one."""
    class Model:
        num_blocks = 3
        step = 0

        def run_blocks(self, x, inputs, start=0, stop=None):
            return x + 2.0 + 0.5 * self.step

    model, x = Model(), torch.zeros(1, 4, 3)
    plan = tuple(range(10))
    for order, expect in ((1, lambda s: 2.0 + 0.5 * s), (0, None)):
        config, ctx = TaylorSeer(order=order, interval=4, warmup_steps=2), DenoiseContext("ddim", plan)
        state = {}
        last = None
        for s in plan:
            ctx.advance(s, 0.0)
            model.step = s
            out, computed, _, _ = config.run_stack(model, x, None, ctx, state)
            assert computed == config.computes(s)
            if computed:
                last = 2.0 + 0.5 * s
            want = expect(s) if expect is not None else last
            assert torch.allclose(out, torch.full_like(x, want)), (order, s)


# ----------------------------------------------------------------------------------------------------------------
# PixArt and another DiT
# ----------------------------------------------------------------------------------------------------------------

def test_pixart_caches(tmp_path):
    _, pix, _ = saved_and_loaded(tiny_pixart_pipeline(), str(tmp_path / "pixart"))

    def run(sampler="dpmpp_2m", guidance=4.5):
        return pix("a red fox", num_inference_steps=8, sampler=sampler, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(0), output_type="latent").images

    calibration = write_calibration(fit_teacache(pix, num_samples=2, steps=(4,), batch_size=2,
                                                 prompts=["a red fox", "the digit seven"]), str(tmp_path / "t.json"))
    for sampler in ("dpmpp_2m", "heun"):
        for guidance in (4.5, 1.0):
            base = run(sampler, guidance)
            for config in [FBCache(0.0), TeaCache(0.0, calibration=calibration), DBCache(0.0), TaylorSeer(interval=1)]:
                got, _ = cached(pix, config, lambda: run(sampler, guidance))
                assert torch.equal(got, base), (sampler, guidance, config)
    for config in [FBCache(0.5), TeaCache(10.0, calibration=calibration), DBCache(0.5, bn_compute_blocks=0),
                   TaylorSeer(interval=3)]:
        got, log = cached(pix, config, run)
        assert torch.isfinite(got).all() and any(not e.computed for e in log), label(config)


def test_learned_sigma_dit_caches(tiny_dit):
    def run():
        return tiny_dit(class_labels=[1, 999], num_inference_steps=8, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images
    base = run()
    for config in [FBCache(0.0), TeaCache(0.0, coefficients=(1.0, 0.0)), TaylorSeer(interval=1)]:
        assert torch.equal(cached(tiny_dit, config, run)[0], base)


# ----------------------------------------------------------------------------------------------------------------
# fit and refusal
# ----------------------------------------------------------------------------------------------------------------

def test_caches_refuse_unets_and_unet_caches_refuse_dit(pipe):
    unet_pipe = vd.Pipeline.from_pretrained("digits")
    for config in SKIPPING:
        with pytest.raises(ValueError, match=r"caches a transformer .* denoises with a UNet; caches that fit it"):
            vd.optimize(unet_pipe, config)
    unet_caches = [cls for cls in TECHNIQUES.values() if issubclass(cls, CacheTechnique) and cls.denoiser == UNET]
    if not unet_caches:  # the UNet caches are not in this checkout yet: a stand-in with their base class
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class StandIn(CacheTechnique):
            name = "unet_stand_in"
        unet_caches = [StandIn]
    for cls in unet_caches:
        with pytest.raises(ValueError, match=r"caches a UNet .* caches that fit it: dbcache, fbcache, taylorseer, "
                                             r"teacache"):
            vd.optimize(pipe, cls())
    assert not pipe._applied and not pipe._restore_hooks


def test_two_caches_are_refused(pipe):
    with pytest.raises(ValueError, match="both cache techniques"):
        vd.optimize(pipe, FBCache(), TaylorSeer())
    vd.optimize(pipe, FBCache())
    try:
        with pytest.raises(ValueError, match="both cache techniques"):
            vd.optimize(pipe, TeaCache())
    finally:
        vd.restore(pipe)


def test_a_shared_transformer_takes_one_cache(pipe):
    from velodiff.pipelines.dit import DiTPipeline
    twin = DiTPipeline({"transformer": pipe.transformer, "vae": pipe.vae, "scheduler": pipe.scheduler_config},
                       torch.float32, "cpu")
    twin.set_progress_bar_config(disable=True)
    base = generate(twin)
    vd.optimize(pipe, FBCache(10.0))
    try:
        with pytest.raises(ValueError, match="already has a block-stack hook"):
            vd.optimize(twin, TaylorSeer())
        assert not twin._applied
        assert torch.equal(generate(twin), base)  # the other pipeline's calls are not cached by pipe's cache
    finally:
        vd.restore(pipe)


@pytest.mark.parametrize("make, message", [
    (lambda: FBCache(-0.1), "threshold must be a finite number >= 0"),
    (lambda: FBCache(float("nan")), "threshold must be a finite number >= 0"),
    (lambda: TeaCache(float("inf")), "threshold must be a finite number >= 0"),
    (lambda: DBCache(-1.0), "threshold must be a finite number >= 0"),
    (lambda: DBCache(fn_compute_blocks=0), "fn_compute_blocks must be an integer >= 1"),
    (lambda: DBCache(bn_compute_blocks=-1), "bn_compute_blocks must be an integer >= 0"),
    (lambda: DBCache(warmup_steps=1.5), "warmup_steps must be an integer >= 0"),
    (lambda: DBCache(max_cached_steps=-1), "max_cached_steps must be an integer >= 0 or None"),
    (lambda: DBCache(max_continuous_cached_steps=True), "max_continuous_cached_steps must be"),
    (lambda: TaylorSeer(interval=0), "interval must be an integer >= 1"),
    (lambda: TaylorSeer(order=-1), "order must be an integer >= 0"),
    (lambda: TeaCache(coefficients=(1.0, float("nan"))), "coefficients .* must be at most 8 finite numbers"),
    (lambda: TeaCache(coefficients=(1.0,) * 9), "coefficients .* must be at most 8 finite numbers"),
    (lambda: TeaCache(coefficients=(1.0, 0.0), calibration="x.json"), "coefficients or calibration, not both"),
    (lambda: TeaCache(calibration="/nonexistent/t.json"), "calibration: .* does not exist"),
])
def test_bad_configs_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("spec, message", [
    ("fbcache:threshold=-1", "threshold must be a finite number >= 0"),
    ("teacache:threshold=nan", "threshold='nan' is not a valid float"),
    ("dbcache:fn=2", "has no option 'fn'; its options: threshold, fn_compute_blocks"),
    ("taylorseer:interval=0", "interval must be an integer >= 1"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_technique(spec)


def test_specs_parse():
    assert parse_technique("dbcache:fn_compute_blocks=2,bn_compute_blocks=1,max_cached_steps=none") == \
        DBCache(fn_compute_blocks=2, bn_compute_blocks=1)
    assert parse_technique("teacache:coefficients=2/-0.5/0.01") == TeaCache(coefficients=(2.0, -0.5, 0.01))
    assert parse_technique("taylorseer:order=2,interval=4") == TaylorSeer(order=2, interval=4)


def test_block_counts_are_checked_against_the_model(pipe):
    n = pipe.transformer.num_blocks
    for fn, bn in ((n, 0), (n - 1, 1), (4, 3)):
        with pytest.raises(ValueError, match=rf"fn_compute_blocks \+ bn_compute_blocks must be less than the "
                                             rf"transformer's {n} blocks"):
            vd.optimize(pipe, DBCache(fn_compute_blocks=fn, bn_compute_blocks=bn))
    assert not pipe._applied


def test_teacache_coefficients_come_from_the_model(pipe, tiny_dit, tmp_path):
    shipped = builtin_calibration(pipe.transformer)
    assert shipped is not None and shipped["path"].startswith(BUILTIN_MODELS["digits-dit"])
    assert shipped["model"] == dict(model_identity(pipe.transformer), source="digits-dit")
    assert TeaCache().resolved_coefficients(pipe.transformer) == tuple(shipped["coefficients"])
    # a model without fitted coefficients: a clear error saying how to get them
    with pytest.raises(ValueError, match=r"coefficients: TeaCache has no fitted coefficients .* velodiff "
                                         r"calibrate-cache"):
        vd.optimize(tiny_dit, TeaCache())
    # a calibration file of another model
    other = str(tmp_path / "tiny.json")
    write_calibration(fit_teacache(tiny_dit, num_samples=2, steps=(3,), batch_size=2), other)
    with pytest.raises(ValueError, match=r"calibration: .* was fitted on another model \(DiTTransformer2DModel with 2 "
                                         r"blocks.*\); this pipeline's transformer is DiTTransformer2DModel with 6"):
        vd.optimize(pipe, TeaCache(calibration=other))
    assert not pipe._applied
    vd.optimize(tiny_dit, TeaCache(0.1, calibration=other))  # its own model takes it
    vd.restore(tiny_dit)
    # files that are not calibrations
    bad = tmp_path / "bad.json"
    for content, message in (("{", "cannot be read as JSON"), ("[]", "is not a velodiff cache calibration"),
                             (json.dumps(dict(json.load(open(other)), version=9)), "format version 9"),
                             (json.dumps(dict(json.load(open(other)), coefficients=["a"])), "finite numbers"),
                             (json.dumps({k: v for k, v in json.load(open(other)).items() if k != "model"}),
                              "does not say which model")):
        bad.write_text(content)
        with pytest.raises(ValueError, match="calibration: .*" + message):
            TeaCache(calibration=str(bad))


def test_shipped_calibration_matches_the_builtin_model(pipe):
    """The shipped file is found by the model's identity; a config change (e.g. a new constructor argument) would
    silently orphan it, so this test fails first."""
    with open(f"{BUILTIN_MODELS['digits-dit']}/{BUILTIN_FILE}") as f:
        data = json.load(f)
    assert data["model"]["config_sha256"] == model_identity(pipe.transformer)["config_sha256"]
    assert data["fit"]["sampler"] == "dpmpp_2m" and data["fit"]["num_samples"] == 64 and data["fit"]["degree"] == 4
    assert len(data["coefficients"]) == 5


def test_calibration_fit_is_the_maintainers_procedure(pipe):
    """x and y are the per-sample relative L1 changes between consecutive evaluations (first step excluded), and
    the fit is numpy.polyfit(x, y, 4) over them."""
    from velodiff.accel.cache.calibrate import collect_teacache_pairs
    x, y = collect_teacache_pairs(pipe, num_samples=3, steps=(5,), guidance=1.5, batch_size=2)
    assert len(x) == len(y) == 3 * 2 * 4  # 3 labels x (cond, uncond) x 4 transitions of 5 evaluations
    assert (x > 0).all() and (y > 0).all()
    fit = fit_teacache(pipe, num_samples=3, steps=(5,), guidance=1.5, batch_size=2)
    assert np.allclose(fit["coefficients"], np.polyfit(x, y, 4))
    assert fit["fit"]["points"] == len(x) and fit["model"] == model_identity(pipe.transformer)
