"""The DiT caches on ``digits-dit`` (FBCache, TeaCache, DBCache, TaylorSeer), side by side with the ``cache-dit``
package on diffusers' DiTPipeline over the same folder.

For each step count (20 and 50, dpmpp_2m, the model's guidance 1.5) and each method at 2-3 settings:

- quality: conditional accuracy and Frechet distance of 1000 images (velodiff.eval's judge; image i has label
  i % 10 and its own seeded noise, image_seeds(0, 1000)), generated in batches of ``--batch-size``;
- fidelity: PSNR of each image against the uncached image of the same seed and label (same library), mean and min;
- work: the fraction of model evaluations that ran the cached part, and the fraction of denoiser FLOPs executed
  (torch.utils.flop_counter inside the transformer module over the first 100 images' denoising loops, probes
  included; the VAE decode is not counted);
- wall clock: the whole generation of one batch (labels 0..9, decode included) against the same library's
  uncached pipeline, interleaved in rounds (velodiff.timing.compare), per-round ratio median (min-max). Timing
  waits until the 1-minute load average is below ``--max-load`` and records the load before and after.

The peer: ``pip install --no-deps cache-dit`` (it needs torch >= 2.7.1, diffusers >= 0.36, transformers >=
4.55.2). diffusers' DiTPipeline hard-codes the null class 1000, which digits-dit (10 classes, null class 10) does
not have: a forward pre-hook on the transformer maps 1000 to 10 (the only workaround needed). cache-dit's default
DBCacheConfig (Fn_compute_blocks 8) fails on digits-dit's 6 blocks; its error is recorded.

  python bench/bench_cache_dit.py [--steps 20 50] [--per-class 100] [--batch-size 10] [--rounds 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.accel.cache import DBCache, FBCache, TaylorSeer, TeaCache, dit_hooks  # noqa: E402
from velodiff.eval.harness import image_seeds, judge  # noqa: E402
from velodiff.loading import BUILTIN_MODELS  # noqa: E402

GUIDANCE = 1.5
#: (method, setting label, config); None is the uncached pipeline
METHODS = [
    ("none", "uncached", None),
    ("fbcache", "threshold 0.05", FBCache(0.05)),
    ("fbcache", "threshold 0.08 (default)", FBCache(0.08)),
    ("fbcache", "threshold 0.12", FBCache(0.12)),
    ("teacache", "threshold 0.05", TeaCache(0.05)),
    ("teacache", "threshold 0.1 (default)", TeaCache(0.1)),
    ("teacache", "threshold 0.2", TeaCache(0.2)),
    ("dbcache", "F1B0 0.24 warm-up 8", DBCache(0.24, 1, 0, warmup_steps=8, max_continuous_cached_steps=None,
                                               taylorseer_order=0)),
    ("dbcache", "F1B0 0.08 warm-up 8", DBCache(0.08, 1, 0, warmup_steps=8, max_continuous_cached_steps=None,
                                               taylorseer_order=0)),
    ("dbcache", "F1B0 0.12 max 2 in a row", DBCache(0.12, 1, 0, max_continuous_cached_steps=2, taylorseer_order=0)),
    ("dbcache", "F1B0 0.12 max 2 in a row, TaylorSeer 1 (default)", DBCache(0.12, 1, 0, taylorseer_order=1)),
    ("dbcache", "F1B0 0.2 max 2 in a row, TaylorSeer 1", DBCache(0.2, 1, 0, taylorseer_order=1)),
    ("taylorseer", "order 1 interval 2", TaylorSeer(order=1, interval=2)),
    ("taylorseer", "order 2 interval 3", TaylorSeer(order=2, interval=3)),
    ("taylorseer", "order 1 interval 3 (default)", TaylorSeer(order=1, interval=3)),
    ("taylorseer", "order 2 interval 4", TaylorSeer(order=2, interval=4)),
]
#: cache-dit DBCacheConfig keyword arguments (None: its defaults)
PEER_METHODS = [
    ("cache-dit default", None),
    ("cache-dit F1B0 0.24 warm-up 8", dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.24)),
    ("cache-dit F1B0 0.08 warm-up 8", dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.08)),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load_average()}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# the two libraries' generation
# ----------------------------------------------------------------------------------------------------------------

def velodiff_pipe(config):
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        vd.optimize(pipe, config)
    return pipe


def velodiff_batch(pipe, labels, seeds, steps, output_type="np"):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(class_labels=[int(d) for d in labels], num_inference_steps=steps, guidance_scale=GUIDANCE,
               sampler="dpmpp_2m", generator=gens, output_type=output_type)
    return out.images


def diffusers_pipe(peer_kwargs, use_cache: bool):
    """diffusers' DiTPipeline over digits-dit (null class 1000 mapped to 10), with cache-dit when ``use_cache``."""
    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained(BUILTIN_MODELS["digits-dit"])
    pipe.set_progress_bar_config(disable=True)
    null = pipe.transformer.config.num_embeds_ada_norm

    def remap(module, args, kwargs):
        labels = kwargs.get("class_labels")
        if labels is not None:
            kwargs["class_labels"] = torch.where(labels >= null, torch.full_like(labels, null), labels)
        return args, kwargs

    pipe.transformer.register_forward_pre_hook(remap, with_kwargs=True)
    if use_cache:
        import cache_dit
        from cache_dit import DBCacheConfig
        config = DBCacheConfig() if peer_kwargs is None else DBCacheConfig(**peer_kwargs)
        cache_dit.enable_cache(pipe, cache_config=config)
    return pipe


def diffusers_batch(pipe, labels, seeds, steps, output_type="np"):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(class_labels=[int(d) for d in labels], num_inference_steps=steps, guidance_scale=GUIDANCE,
               generator=gens, output_type=output_type)
    return out.images


# ----------------------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------------------

def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    mse = ((images.astype(np.float64) - reference.astype(np.float64)) ** 2).reshape(len(images), -1).mean(1)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)


def generate_all(run_batch, n_images: int, batch_size: int, steps: int, seed: int = 0, trace_pipe=None,
                 denoiser: str = "DiTTransformer2DModel", flop_images: int = 100):
    """All images (label i % 10, seed image_seeds(seed)[i]), the FLOPs counted inside the denoiser module (its
    forward calls, cache probes included; not the VAE) over the first ``flop_images`` images (the counter slows a
    call 3-4x) and, for velodiff, the trace of the cache decisions."""
    seeds = image_seeds(seed, n_images)
    labels = np.arange(n_images) % 10
    images, flops, entries = [], 0, []
    for start in range(0, n_images, batch_size):
        idx = np.arange(start, min(start + batch_size, n_images))
        counter = FlopCounterMode(display=False) if start < flop_images else contextlib.nullcontext()
        if trace_pipe is not None and isinstance(trace_pipe.transformer.__dict__.get("block_stack_hook"),
                                                 dit_hooks._Hook):
            with dit_hooks.trace(trace_pipe) as log_, counter, torch.inference_mode():
                batch = run_batch(labels[idx], [seeds[i] for i in idx], steps)
            entries += log_
        else:
            with counter, torch.inference_mode():
                batch = run_batch(labels[idx], [seeds[i] for i in idx], steps)
        if start < flop_images:
            flops += sum(counter.get_flop_counts().get(denoiser, {}).values())
        images.append(batch)
    return np.concatenate(images), labels, flops, entries


def quality_row(images, labels, reference, flops, flops_ref, entries, evaluations_ref):
    r = judge(images, labels, n_boot=200, fd_boot=50)
    p = psnr(images, reference)
    finite = p[np.isfinite(p)]
    row = {"accuracy": round(r["conditional_accuracy"], 4),
           "accuracy_ci": "[{:.3f}, {:.3f}]".format(*r["conditional_accuracy_ci"]),
           "fd": round(r["frechet_distance"], 3), "fd_floor": round(r["frechet_distance_floor"], 3),
           "psnr_mean": float(np.mean(p)) if np.isfinite(p).all() else (float(np.mean(finite)) if len(finite) else
                                                                         math.inf),
           "psnr_min": float(np.min(p)), "identical_images": int((~np.isfinite(p)).sum()),
           "flops_fraction": round(flops / flops_ref, 4) if flops_ref else None}
    if entries:
        row["evaluations_computed"] = round(sum(e.computed for e in entries) / len(entries), 4)
    elif evaluations_ref is not None:
        row["evaluations_computed"] = 1.0
    return row


def wait_for_quiet(max_load: float, patience_s: float) -> str:
    """Wait (up to ``patience_s``) until the 1-minute load average is below ``max_load``; returns the load seen."""
    t0 = time.time()
    while os.getloadavg()[0] >= max_load and time.time() - t0 < patience_s:
        log(f"waiting for the machine to quiet down (1-min load {os.getloadavg()[0]:.2f} >= {max_load})")
        time.sleep(30)
    return load_average()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-load", type=float, default=2.5)
    ap.add_argument("--patience", type=float, default=3600, help="seconds to wait for a quiet machine")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--name", default="cache_dit_digits")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("VELODIFF_BENCH_THREADS", torch.get_num_threads())))
    n_images = 10 * args.per_class
    methods = [m for m in METHODS if args.only is None or m[0] in args.only or m[0] == "none"]
    peer_error = None
    peers = []
    if not args.no_peer:
        try:
            import cache_dit  # noqa: F401
            peers = PEER_METHODS
        except Exception as e:  # not installed, or fails to import on this diffusers
            peer_error = f"cache-dit import failed: {type(e).__name__}: {e}"
            log(peer_error)
    rows, timings = [], {}
    peer_errors = {}
    for steps in args.steps:
        # ---- quality, fidelity and FLOPs (not timed; load does not matter here)
        pipes = {}
        reference = flops_ref = None
        for method, setting, config in methods:
            pipe = velodiff_pipe(config)
            pipes[(method, setting)] = pipe
            t0 = time.time()
            images, labels, flops, entries = generate_all(
                lambda l, s, n: velodiff_batch(pipe, l, s, n), n_images, args.batch_size, steps, trace_pipe=pipe)
            if config is None:
                reference, flops_ref = images, flops
            row = {"library": "velodiff", "steps": steps, "method": method, "setting": setting,
                   "spec": "" if config is None else _spec(config)}
            row.update(quality_row(images, labels, reference, flops, flops_ref, entries, 1))
            row["generate_s"] = round(time.time() - t0, 1)
            rows.append(row)
            log(f"{steps} steps {method} {setting}: acc {row['accuracy']} fd {row['fd']} psnr "
                f"{row['psnr_mean']:.2f}/{row['psnr_min']:.2f} flops {row['flops_fraction']}")
        peer_pipes = {}
        if peers:
            base = diffusers_pipe(None, use_cache=False)
            peer_pipes["diffusers uncached"] = base
            t0 = time.time()
            peer_ref, labels, flops_peer_ref, _ = generate_all(lambda l, s, n: diffusers_batch(base, l, s, n),
                                                               n_images, args.batch_size, steps)
            row = {"library": "diffusers", "steps": steps, "method": "none", "setting": "diffusers uncached"}
            row.update(quality_row(peer_ref, labels, peer_ref, flops_peer_ref, flops_peer_ref, [], None))
            row["psnr_vs_velodiff_uncached"] = float(np.mean(np.minimum(psnr(peer_ref, reference), 200)))
            row["generate_s"] = round(time.time() - t0, 1)
            rows.append(row)
            for label, kwargs in peers:
                t0 = time.time()
                try:
                    pipe = diffusers_pipe(kwargs, use_cache=True)
                    images, labels, flops, _ = generate_all(lambda l, s, n: diffusers_batch(pipe, l, s, n),
                                                            n_images, args.batch_size, steps)
                except Exception as e:
                    msg = f"{type(e).__name__}: {e}"
                    peer_errors[label] = msg
                    rows.append({"library": "cache-dit", "steps": steps, "method": "dbcache", "setting": label,
                                 "error": msg[:300]})
                    log(f"{label}: {msg}")
                    traceback.print_exc(limit=2)
                    continue
                peer_pipes[label] = pipe
                row = {"library": "cache-dit", "steps": steps, "method": "dbcache", "setting": label,
                       "spec": repr(kwargs)}
                row.update(quality_row(images, labels, peer_ref, flops, flops_peer_ref, [], None))
                row.pop("evaluations_computed", None)
                row["generate_s"] = round(time.time() - t0, 1)
                rows.append(row)
                log(f"{steps} steps {label}: acc {row['accuracy']} fd {row['fd']} psnr {row['psnr_mean']:.2f}")
        # ---- wall clock: one batch of labels 0..9, decode included, interleaved rounds
        seeds = image_seeds(123, 10)
        candidates = {}
        for (method, setting), pipe in pipes.items():
            candidates[f"velodiff {method} {setting}"] = (lambda p=pipe: velodiff_batch(p, range(10), seeds, steps))
        for label, pipe in peer_pipes.items():
            candidates[label] = (lambda p=pipe: diffusers_batch(p, range(10), seeds, steps))
        load_wait = wait_for_quiet(args.max_load, args.patience)
        log(f"timing {len(candidates)} candidates, {args.rounds} rounds")
        with torch.inference_mode():
            comp = compare(candidates, baseline="velodiff none uncached", rounds=args.rounds, warmup=2,
                           min_time=0.5, log=log)
        timings[str(steps)] = dict(comp.to_json(), load_when_started=load_wait)
        for row in rows:
            if row["steps"] != steps or "error" in row:
                continue
            name = (f"velodiff {row['method']} {row['setting']}" if row["library"] == "velodiff" else
                    row["setting"])
            if name not in candidates:
                continue
            over = "velodiff none uncached" if row["library"] == "velodiff" else "diffusers uncached"
            ratio = comp.ratio(name, over)
            row["speedup"] = {k: round(ratio[k], 3) for k in ("median", "min", "max")}
            row["batch_s"] = round(comp.stats(name)["median"], 4)
            if row["library"] == "diffusers":
                vs = comp.ratio(name, "velodiff none uncached")
                row["speed_vs_velodiff_uncached"] = round(vs["median"], 3)
        log(f"timing done: load before {comp.load_before}, after {comp.load_after}")
    note = ("digits-dit, dpmpp_2m, guidance 1.5, 1000 images (label i % 10, seed image_seeds(0)[i]) in batches of "
            f"{args.batch_size}. psnr: each image against the same library's uncached image of the same seed "
            "(dB, images in [0, 1]; mean over images; inf = identical). flops_fraction: denoiser FLOPs counted by "
            "torch.utils.flop_counter over the denoising loops of the first 100 images, over the uncached run's. "
            "evaluations_computed: "
            "model evaluations that ran the cached blocks. speedup: uncached / cached wall clock of one whole "
            "generation of 10 images (decode included), same library, per-round ratio median (min-max) over "
            f"{args.rounds} interleaved rounds. velodiff decides per sample (largest distance over the batch); "
            "cache-dit on the mean over the whole batch.")
    extra = {"timings": timings, "peer_import_error": peer_error, "peer_errors": peer_errors,
             "guidance": GUIDANCE, "batch_size": args.batch_size, "images": n_images}
    columns = ["library", "steps", "method", "setting", "accuracy", "fd", "psnr_mean", "psnr_min",
               "evaluations_computed", "flops_fraction", "speedup", "batch_s", "error"]
    path = write_results(args.name, rows, columns, args.out, note=note, extra=extra)
    log(f"wrote {path}")


def _spec(config) -> str:
    import dataclasses
    return config.name + ":" + ",".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config)
                                        if getattr(config, f.name) != f.default)


if __name__ == "__main__":
    main()
