"""Denoiser wall clock of the DiT caches on a full-size DiT-XL/2 (the real config, random weights) at 256 px.

One image with classifier-free guidance (batch 2 through the transformer), 20 steps of dpmpp_2m on DiT's linear
schedule, the denoising loop only (latents out: no VAE), uncached against FBCache and TeaCache, interleaved rounds
(velodiff.timing.compare). Random weights give the model's real cost but not a trained model's trajectory, so the
caches' decisions here say nothing about quality: each row gives the fraction of evaluations that ran the blocks,
and the speed-up is best read against the ideal one, 1 / (blocks run / blocks of the uncached run). TeaCache's
polynomial is fitted on this random model first (velodiff calibrate-cache's procedure, 2 labels, 20 steps).

  python bench/bench_cache_dit_xl.py [--steps 20] [--rounds 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, write_results  # noqa: E402

import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.accel.cache import FBCache, TeaCache, TaylorSeer, dit_hooks  # noqa: E402
from velodiff.accel.cache.calibrate import fit_teacache, write_calibration  # noqa: E402
from velodiff.loading import BUILTIN_MODELS, DIT_CONFIG  # noqa: E402
from velodiff.loading.folders import read_config  # noqa: E402
from velodiff.models.dit import DiTTransformer2DModel  # noqa: E402
from velodiff.pipelines.dit import DiTPipeline  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {msg}", flush=True)


def xl_pipeline(model):
    """A velodiff DiTPipeline around ``model``: DiT's scheduler (digits-dit's: dpmpp_2m on DiT's linear betas) and
    a stand-in VAE that only gives the factor 8 (the loop returns latents; nothing is decoded)."""
    scheduler = read_config(os.path.join(BUILTIN_MODELS["digits-dit"], "scheduler"), "scheduler_config.json")
    vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=[128, 256, 512, 512]))
    pipe = DiTPipeline({"transformer": model, "vae": vae, "scheduler": scheduler}, torch.float32, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--max-load", type=float, default=2.5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    config = {k: v for k, v in DIT_CONFIG.items() if not k.startswith("_")}
    model = DiTTransformer2DModel(**config).eval()
    pipes = {"uncached": xl_pipeline(model)}
    t0 = time.time()
    calibration = fit_teacache(pipes["uncached"], num_samples=2, steps=(args.steps,), guidance=args.guidance,
                               batch_size=2)
    path = write_calibration(calibration, os.path.join(tempfile.mkdtemp(prefix="velodiff-xl-"), "teacache.json"))
    log(f"TeaCache fitted on the random DiT-XL/2 in {time.time() - t0:.0f} s: {calibration['coefficients']}, "
        f"x in {calibration['fit']['x_range']}")
    configs = {"fbcache 0.08": FBCache(0.08), "teacache 0.1": TeaCache(0.1, calibration=path),
               "taylorseer order 1 interval 3": TaylorSeer(order=1, interval=3)}

    def run(pipe):
        with torch.inference_mode():
            return pipe([207], num_inference_steps=args.steps, guidance_scale=args.guidance,
                        generator=torch.Generator().manual_seed(0), output_type="latent").images

    work = {"uncached": 1.0}
    reference = run(pipes["uncached"])
    rows = []
    for name, cfg in configs.items():
        pipe = xl_pipeline(model)  # the same weights: one model, one hook per pipeline at a time
        vd.optimize(pipe, cfg)
        with dit_hooks.trace(pipe) as entries:
            out = run(pipe)
        blocks = sum(e.blocks_run for e in entries) / (len(entries) * model.num_blocks)
        work[name] = blocks
        rows.append({"method": name, "evaluations_computed": round(sum(e.computed for e in entries) / len(entries),
                                                                    3),
                     "blocks_run_fraction": round(blocks, 3), "ideal_speedup": round(1 / blocks, 3),
                     "latent_rel_error": round(float((out - reference).norm() / reference.norm()), 4)})
        vd.restore(pipe)
    # one pipeline per candidate would share the transformer, whose hook slot holds one cache: apply around calls
    candidates = {"uncached": lambda: run(pipes["uncached"])}
    for name, cfg in configs.items():
        def fn(cfg=cfg):
            pipe = pipes["uncached"]
            vd.optimize(pipe, cfg)
            try:
                return run(pipe)
            finally:
                vd.restore(pipe)
        candidates[name] = fn
    while os.getloadavg()[0] >= args.max_load:
        log(f"waiting for a quiet machine (1-min load {os.getloadavg()[0]:.2f})")
        time.sleep(30)
    comp = compare(candidates, baseline="uncached", rounds=args.rounds, warmup=1, min_time=0.0, log=log)
    rows.insert(0, {"method": "uncached", "evaluations_computed": 1.0, "blocks_run_fraction": 1.0,
                    "ideal_speedup": 1.0, "latent_rel_error": 0.0})
    for row in rows:
        stats = comp.stats(row["method"])
        row["loop_s"] = round(stats["median"], 2)
        ratio = comp.ratio(row["method"])
        row["speedup"] = {k: round(ratio[k], 3) for k in ("median", "min", "max")}
    note = (f"DiT-XL/2 (28 blocks x 1152, learned sigma), random weights (torch.manual_seed(0)), 256 px (32x32 latents, "
            f"256 tokens), class 207, guidance {args.guidance} (batch 2 through the transformer), {args.steps} steps "
            "dpmpp_2m, denoising loop only (latents), fp32 on the CPU. speedup: uncached / cached loop time per round, "
            f"median (min-max) of {args.rounds} interleaved rounds; ideal_speedup = 1 / blocks_run_fraction. Random "
            "weights: the decisions (and latent_rel_error) say nothing about a trained model's quality.")
    out = write_results("cache_dit_xl_cpu", rows, ["method", "evaluations_computed", "blocks_run_fraction",
                                                   "ideal_speedup", "speedup", "loop_s", "latent_rel_error"],
                        args.out, note=note, extra={"timing": comp.to_json(),
                                                    "teacache_coefficients": calibration["coefficients"],
                                                    "teacache_fit": calibration["fit"]})
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
