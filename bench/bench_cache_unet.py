"""UNet caches (DeepCache, T-GATE, Faster Diffusion) on the built-in ``digits`` model: quality, fidelity, FLOPs
and wall clock against the uncached run, and side by side with the ``DeepCache`` and ``tgate`` packages on
diffusers' StableDiffusionPipeline over the same folder; optionally a full-size SD 1.5 UNet (random weights).

Sections (``--sections``, any of them; each is merged into the existing result files, so they can run at different
times, e.g. quality under load and timing on an idle machine):

  quality  1000 images per configuration and step count (``--per-class`` 100 x 10 digits, prompt "a handwritten
           {d}", 20 and 50 steps of dpmpp_2m, guidance 3), generated exactly as ``velodiff.eval.evaluate`` generates
           them (its per-image seeds, batches of 100) and judged with ``velodiff.eval.judge`` (what evaluate does; the
           uncached 20-step row is cross-checked against ``evaluate`` itself): accuracy, Frechet distance, and the
           PSNR of every image against the uncached image of the same seed (mean and min over the images).
  flops    the fraction of the denoiser's FLOPs a configuration executes: FlopCounterMode around every UNet call of
           one call generating the ten digits (attention counted through the "math" backend, whose matmuls the
           counter sees; elementwise work is not counted).
  speed    wall clock of the whole generation (ten digits per call: text encoder, loop, VAE) of every configuration,
           interleaved rounds (bench/common.py ``compare``), ratio over uncached per round (median, min, max).
  peers    the same settings through the ``DeepCache`` (DeepCacheSDHelper) and ``tgate`` (TgateSDLoader) packages on
           diffusers' StableDiffusionPipeline loaded from the same folder (DPMSolverMultistepScheduler, the
           folder's): their ratio over diffusers uncached and PSNR to diffusers uncached, ours over ours uncached,
           all candidates interleaved in one comparison, 100 images (10 per digit) for PSNR, same seeds.
  pictures cache_unet_grid_digits.png (the ten digits of seeds 0-9 at 20 steps, one row per configuration, the
           uncached row first); bench_cache.py draws the speed-up / PSNR picture from this file's JSON.
  sd15     a full-size SD 1.5 UNet (its real config, random weights with diffusers' own init) at 256 px, 20 steps of
           dpmpp_2m with CFG: wall clock of the denoising loop alone (no text encoder, no VAE), uncached vs DeepCache
           and T-GATE, interleaved; writes cache_unet_sd15_cpu.{json,md}.

Timing sections wait (up to ``--wait`` seconds) for the 1-minute load average to fall below ``--max-load`` and record
the load before and after. Quality numbers do not depend on the load; ``--threads`` sets torch's threads.

  python bench/bench_cache_unet.py --sections quality --threads 1
  python bench/bench_cache_unet.py --sections flops speed peers sd15 --max-load 2.5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, machine  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.accel import parse_technique  # noqa: E402
from velodiff.eval import DEFAULT_PROMPT, evaluate, image_seeds, judge, prompt_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(os.path.dirname(HERE), "python", "velodiff", "data", "digits")
SAMPLER, GUIDANCE = "dpmpp_2m", 3.0

#: our configurations (technique specs; None: uncached)
CONFIGS = ["uncached", "deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=5", "tgate:gate_step=5",
           "tgate:gate_step=10", "faster_diffusion", "faster_diffusion:interval=4"]
#: the peers' settings at the same settings as ours
PEERS = {"deepcache:interval=2": ("deepcache", 2), "deepcache:interval=3": ("deepcache", 3),
         "deepcache:interval=5": ("deepcache", 5), "tgate:gate_step=5": ("tgate", 5),
         "tgate:gate_step=10": ("tgate", 10)}


def log(*a):
    print(*a, flush=True)


def wait_for_quiet(max_load: float, wait: float) -> str:
    t0 = time.time()
    while math.isfinite(max_load) and os.getloadavg()[0] >= max_load and time.time() - t0 < wait:
        log(f"load {load_average()} >= {max_load}: waiting")
        time.sleep(30)
    return load_average()


def interleaved(candidates: Dict[str, Callable[[], object]], baseline: Optional[str], rounds: int, max_load: float,
                wait: float, min_time: float = 1.0):
    """compare() one round at a time, waiting before every round until the 1-minute load is below ``max_load`` (a
    round runs every candidate once, in an order that changes from round to round); the rounds are merged into one
    Comparison, with the load before every round in ``meta["round_loads"]``. The first round warms every candidate
    up twice and fixes its inner count."""
    from velodiff.timing import Comparison
    merged, loads, inner = None, [], None
    for r in range(rounds):
        loads.append(wait_for_quiet(max_load, wait))
        cmp = compare(candidates, baseline=baseline, rounds=1, warmup=2 if r == 0 else 1, min_time=min_time,
                      inner=inner, seed=r, log=log)
        inner = dict(cmp.inner)
        if merged is None:
            merged = Comparison(samples={k: list(v) for k, v in cmp.samples.items()}, inner=inner,
                                order=list(cmp.order), baseline=baseline, load_before=cmp.load_before)
        else:
            for k, v in cmp.samples.items():
                merged.samples[k].extend(v)
            merged.order.extend(cmp.order)
        merged.load_after = cmp.load_after
    merged.meta["round_loads"] = loads
    return merged


def our_pipe(spec: str):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.set_progress_bar_config(disable=True)
    if spec != "uncached":
        vd.optimize(pipe, parse_technique(spec))
    return pipe


def psnr_per_image(images: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """PSNR (dB, peak 1) of each image [N, H, W, C] in [0, 1] against ``ref``; inf where identical."""
    mse = ((images.astype(np.float64) - ref.astype(np.float64)) ** 2).reshape(len(images), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1.0 / mse)


def finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------------------------------

def generate(pipe, steps: int, per_class: int, seed: int = 0, batch: int = 100) -> np.ndarray:
    """Images [N, H, W, 3] as velodiff.eval.evaluate generates them (class-major, per-image seeds, batches)."""
    labels = np.repeat(np.arange(10), per_class)
    seeds = image_seeds(seed, len(labels))
    out = []
    for start in range(0, len(labels), batch):
        idx = np.arange(start, min(start + batch, len(labels)))
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        with torch.inference_mode():
            images, _, _ = prompt_step(pipe, labels[idx], gens, DEFAULT_PROMPT, num_inference_steps=steps,
                                       guidance_scale=GUIDANCE, sampler=SAMPLER)
        out.append(images)
    return np.concatenate(out)


def section_quality(results: dict, steps_list: List[int], per_class: int, configs: List[str]) -> None:
    labels = np.repeat(np.arange(10), per_class)
    for steps in steps_list:
        ref = None
        for spec in configs:
            key = f"{spec}@{steps}"
            t0 = time.perf_counter()
            images = generate(our_pipe(spec), steps, per_class)
            seconds = time.perf_counter() - t0
            if spec == "uncached":
                ref = images
            j = judge(images, labels, n_boot=1000, fd_boot=200, seed=0)
            row = results["quality"].setdefault(key, {})
            row.update(config=spec, steps=steps, images=len(images), accuracy=j["conditional_accuracy"],
                       accuracy_ci=j["conditional_accuracy_ci"], fd=j["frechet_distance"],
                       fd_ci=j["frechet_distance_ci"], fd_floor=j["frechet_distance_floor"],
                       generation_seconds=seconds, threads=torch.get_num_threads(), load_after=load_average())
            if ref is not None and spec != "uncached":
                p = psnr_per_image(images, ref)
                row.update(psnr_mean=finite_or_none(float(np.mean(p))), psnr_min=finite_or_none(float(np.min(p))),
                           psnr_median=finite_or_none(float(np.median(p))))
            log(key, {k: row[k] for k in ("accuracy", "fd") if k in row}, row.get("psnr_mean"), f"{seconds:.0f} s")
            write(results)
        if steps == 20 and "uncached" in configs:  # cross-check against velodiff.eval.evaluate itself
            r = evaluate(our_pipe("uncached"), sampler=SAMPLER, steps=steps, guidance=GUIDANCE, per_class=per_class,
                         seed=0, warmup=False)
            row = results["quality"][f"uncached@{steps}"]
            results["evaluate_crosscheck"] = {
                "steps": steps, "evaluate_accuracy": r["conditional_accuracy"], "evaluate_fd": r["frechet_distance"],
                "bench_accuracy": row["accuracy"], "bench_fd": row["fd"],
                "equal": bool(r["conditional_accuracy"] == row["accuracy"] and r["frechet_distance"] == row["fd"])}
            log("evaluate cross-check", results["evaluate_crosscheck"])
            write(results)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and speed
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = [DEFAULT_PROMPT.format(d=d) for d in range(10)]


def one_call(pipe, steps: int, n: int = 10, seed: int = 0, output_type: str = "np"):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(PROMPTS[:n], num_inference_steps=steps, guidance_scale=GUIDANCE, sampler=SAMPLER, generator=gens,
                output_type=output_type).images


def unet_flops(pipe, run: Callable[[], object]) -> int:
    """FLOPs of every UNet call made by ``run()`` (attention through the math backend, so the counter sees it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from velodiff.accel.cache.unet_hooks import replace_forward
    from velodiff.models.attention import Attention
    total = [0]

    def make(inner):
        def counted(*args, **kwargs):
            with FlopCounterMode(display=False) as mode:
                out = inner(*args, **kwargs)
            total[0] += mode.get_total_flops()
            return out
        return counted
    attn = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    backends = [m.backend for m in attn]
    for m in attn:
        m.backend = "math"
    undo = replace_forward(pipe.unet, make)
    try:
        with torch.inference_mode():
            run()
    finally:
        undo()
        for m, b in zip(attn, backends):
            m.backend = b
    return total[0]


def section_flops(results: dict, steps_list: List[int], configs: List[str]) -> None:
    for steps in steps_list:
        base = None
        for spec in configs:
            pipe = our_pipe(spec)
            flops = unet_flops(pipe, lambda: one_call(pipe, steps))
            base = flops if spec == "uncached" else base
            row = results["quality"].setdefault(f"{spec}@{steps}", {"config": spec, "steps": steps})
            row.update(unet_flops=flops, flops_fraction=None if base is None else flops / base)
            log(f"{spec}@{steps} flops {flops:.4g} fraction {row['flops_fraction']}")
    write(results)


def section_speed(results: dict, steps_list: List[int], configs: List[str], rounds: int, max_load: float,
                  wait: float) -> None:
    for steps in steps_list:
        pipes = {spec: our_pipe(spec) for spec in configs}
        with torch.inference_mode():
            cmp = interleaved({spec: (lambda p=p: one_call(p, steps)) for spec, p in pipes.items()}, "uncached",
                              rounds, max_load, wait)
        load = cmp.meta["round_loads"][0]
        key = str(steps) if configs == CONFIGS else f"{steps}: {' + '.join(configs)}"
        results["speed"][key] = {"load_before": load, "load_after": cmp.load_after,
                                 "threads": torch.get_num_threads(), **cmp.to_json()}
        for spec in configs:
            row = results["quality"].setdefault(f"{spec}@{steps}", {"config": spec, "steps": steps})
            ratio = cmp.ratio(spec)
            row.update(speedup={k: ratio[k] for k in ("median", "min", "max")},
                       seconds_per_call=cmp.stats(spec)["median"],
                       speed_load=f"{max(float(x.split()[0]) for x in cmp.meta['round_loads']):.2f} max")
        write(results)


# ----------------------------------------------------------------------------------------------------------------
# peers
# ----------------------------------------------------------------------------------------------------------------

def diffusers_pipe():
    from diffusers import StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(DIGITS, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def peer_runner(kind: Optional[str], value: Optional[int], steps: int):
    """(a function generating with the peer package at this setting, its description); kind None: diffusers as is."""
    pipe = diffusers_pipe()
    common = dict(num_inference_steps=steps, guidance_scale=GUIDANCE, output_type="np")
    if kind is None:
        return lambda prompts, gens: pipe(prompts, generator=gens, **common).images
    if kind == "deepcache":
        from DeepCache import DeepCacheSDHelper
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=value, cache_branch_id=0)
        helper.enable()
        return lambda prompts, gens: pipe(prompts, generator=gens, **common).images
    from tgate import TgateSDLoader
    tpipe = TgateSDLoader(pipe)
    return lambda prompts, gens: tpipe.tgate(prompts, generator=gens, gate_step=value, sp_interval=5, fi_interval=1,
                                             warm_up=2, **common).images


def section_peers(results: dict, steps_list: List[int], rounds: int, max_load: float, wait: float,
                  per_class: int = 10) -> None:
    import importlib.metadata as md
    versions = {}
    for name in ("DeepCache", "tgate", "diffusers"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    results["peers_versions"] = versions
    labels = np.repeat(np.arange(10), per_class)
    seeds = image_seeds(0, len(labels))
    prompts = [DEFAULT_PROMPT.format(d=int(d)) for d in labels]

    def gens(idx):
        return [torch.Generator().manual_seed(seeds[i]) for i in idx]
    for steps in steps_list:
        runners: Dict[str, Callable] = {}
        errors: Dict[str, str] = {}
        for name, setting in [("diffusers", (None, None))] + [(f"peer {s}", PEERS[s]) for s in PEERS]:
            try:
                runners[name] = peer_runner(*setting, steps)
            except Exception as e:  # a peer that does not run on this diffusers: record why
                errors[name] = f"{type(e).__name__}: {e}"
        for spec in ["uncached"] + list(PEERS):
            pipe = our_pipe(spec)
            runners[f"velodiff {spec}"] = (lambda p: lambda pr, g: p(pr, num_inference_steps=steps,
                                                                      guidance_scale=GUIDANCE, sampler=SAMPLER,
                                                                      generator=g, output_type="np").images)(pipe)
        # fidelity: 100 images, batches of 10
        images = {}
        for name in list(runners):
            try:
                with torch.inference_mode():
                    images[name] = np.concatenate([runners[name]([prompts[i] for i in idx], gens(idx))
                                                   for idx in np.array_split(np.arange(len(labels)), len(labels) // 10)])
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                runners.pop(name)
        rows = {}
        for spec in PEERS:
            row = {"setting": spec, "steps": steps}
            for side, base in (("peer", "diffusers"), ("velodiff", "velodiff uncached")):
                name = f"{side} {spec}"
                if name in images and base in images:
                    p = psnr_per_image(images[name], images[base])
                    row[f"{side}_psnr_mean"] = finite_or_none(float(np.mean(p)))
                    row[f"{side}_psnr_min"] = finite_or_none(float(np.min(p)))
            if f"peer {spec}" in images and f"velodiff {spec}" in images:
                row["peer_vs_velodiff_max_abs"] = float(np.abs(images[f"peer {spec}"] - images[f"velodiff {spec}"]).max())
            rows[spec] = row
        if "diffusers" in images and "velodiff uncached" in images:
            results.setdefault("peers_uncached_max_abs", {})[str(steps)] = float(
                np.abs(images["diffusers"] - images["velodiff uncached"]).max())
        # speed: ten digits per call, every candidate interleaved
        idx = np.arange(0, len(labels), per_class)  # one image of each digit
        with torch.inference_mode():
            cmp = interleaved({name: (lambda r=r: r([prompts[i] for i in idx], gens(idx)))
                               for name, r in runners.items()}, None, rounds, max_load, wait)
        load = cmp.meta["round_loads"][0]
        for spec, row in rows.items():
            for side, base in (("peer", "diffusers"), ("velodiff", "velodiff uncached")):
                name = f"{side} {spec}"
                if name in runners and base in runners:
                    r = cmp.ratio(name, over=base)
                    row[f"{side}_speedup"] = {k: r[k] for k in ("median", "min", "max")}
        if "velodiff uncached" in runners and "diffusers" in runners:
            r = cmp.ratio("velodiff uncached", over="diffusers")
            results.setdefault("velodiff_over_diffusers_uncached", {})[str(steps)] = {
                k: r[k] for k in ("median", "min", "max")}
        results["peers"][str(steps)] = {"rows": rows, "errors": errors, "load_before": load,
                                        "load_after": cmp.load_after, "timing": cmp.to_json()}
        log("peers", steps, json.dumps(rows, indent=1), errors)
        write(results)


# ----------------------------------------------------------------------------------------------------------------
# pictures
# ----------------------------------------------------------------------------------------------------------------

def section_pictures(results: dict, configs: List[str], steps: int = 20, scale: int = 4) -> None:
    from PIL import Image, ImageDraw
    rows = [(spec, one_call(our_pipe(spec), steps)) for spec in configs]
    label_w, side, gap = 190, 16 * scale, 4
    grid = Image.new("RGB", (label_w + 10 * (side + gap), len(rows) * (side + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (spec, images) in enumerate(rows):
        draw.text((4, r * (side + gap) + side // 2 - 6), spec, fill="black")
        for c, im in enumerate(images):
            tile = Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).resize((side, side),
                                                                                            Image.NEAREST)
            grid.paste(tile, (label_w + c * (side + gap), r * (side + gap)))
    grid.save(path("cache_unet_grid_digits.png"))


# ----------------------------------------------------------------------------------------------------------------
# full-size SD 1.5 UNet
# ----------------------------------------------------------------------------------------------------------------

SD15_CONFIGS = ["uncached", "deepcache:interval=3", "deepcache:interval=5", "tgate:gate_step=10"]


def section_sd15(sd15_results: dict, rounds: int, max_load: float, wait: float, size: int = 256, steps: int = 20):
    from diffusers import UNet2DConditionModel as DUNet

    from bench_unet import SD15, share_weights
    from velodiff.pipelines.stable_diffusion import StableDiffusionPipeline
    with open(os.path.join(DIGITS, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    torch.manual_seed(0)
    theirs = DUNet(**SD15).eval()  # diffusers' own initialisation
    unet = share_weights(theirs)
    g = torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}
    latents = torch.randn(1, 4, size // 8, size // 8, generator=g)
    pipes, outs = {}, {}
    for spec in SD15_CONFIGS:
        pipe = StableDiffusionPipeline({"unet": unet, "scheduler": scheduler}, torch.float32, "cpu")
        pipe.set_progress_bar_config(disable=True)
        if spec != "uncached":
            vd.optimize(pipe, parse_technique(spec))
        pipes[spec] = pipe

    def loop(pipe):
        plan = pipe.make_plan(SAMPLER, steps)
        model_fn = pipe.unet_fn(cond, uncond)
        return pipe.run_denoising(plan, model_fn, latents * plan[1].init_noise_scale, 7.5, None)
    rows = []
    with torch.inference_mode():
        for spec, pipe in pipes.items():
            outs[spec] = loop(pipe)
    with torch.inference_mode():
        cmp = interleaved({spec: (lambda p=p: loop(p)) for spec, p in pipes.items()}, "uncached", rounds, max_load,
                          wait, min_time=0.0)
    load = cmp.meta["round_loads"][0]
    for spec in SD15_CONFIGS:
        ref = outs["uncached"]
        rel = float((outs[spec] - ref).norm() / ref.norm())
        r = cmp.ratio(spec)
        flops = unet_flops(pipes[spec], lambda p=pipes[spec]: loop(p))
        rows.append({"config": spec, "seconds": cmp.stats(spec)["median"],
                     "speedup": {k: r[k] for k in ("median", "min", "max")}, "latent_rel_diff": rel,
                     "unet_flops": flops})
        log(rows[-1])
    base = rows[0]["unet_flops"]
    for row in rows:
        row["flops_fraction"] = row["unet_flops"] / base
    sd15_results.update(rows=rows, load_before=load, load_after=cmp.load_after, timing=cmp.to_json(),
                        setting=f"SD 1.5 UNet (diffusers init, seed 0), {size}x{size} px ({size // 8}x{size // 8} "
                                f"latents), {steps} steps of {SAMPLER}, CFG 7.5 (batch 2), fp32, random text "
                                "embeddings; the denoising loop only")


# ----------------------------------------------------------------------------------------------------------------
# result files
# ----------------------------------------------------------------------------------------------------------------

OUT = {"dir": os.path.join(HERE, "results")}


def path(name: str) -> str:
    return os.path.join(OUT["dir"], name)


def load_results(name: str) -> dict:
    try:
        with open(path(name + ".json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def fmt(v, digits=4):
    if v is None:
        return "-"
    if isinstance(v, dict) and "median" in v:
        return f"{v['median']:.3g} ({v['min']:.3g}-{v['max']:.3g})"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"[{v[0]:.3f}, {v[1]:.3f}]"
    return str(v)


def write(results: dict) -> None:
    results["machine"] = machine()
    with open(path("cache_unet_digits.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# cache_unet_digits", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), "",
             f"digits, prompt '{DEFAULT_PROMPT}', {SAMPLER}, guidance {GUIDANCE:g}. accuracy / fd: 1000 images "
             "(100 per digit, velodiff.eval's seeds and judge; fd floor 0.167); psnr: each image against the uncached "
             "image of the same seed (dB, mean and min over the 1000); flops: fraction of the uncached UNet FLOPs "
             "(one call, ten digits); speed-up: wall clock of a whole call generating the ten digits, uncached time / "
             "cached time per interleaved round, median (min-max); load: 1-minute load averages before -> after the "
             "timing.", ""]
    cols = ["config", "steps", "accuracy", "accuracy_ci", "fd", "fd_ci", "psnr_mean", "psnr_min", "flops_fraction",
            "speedup", "seconds_per_call", "speed_load"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for key in sorted(results["quality"], key=lambda k: (results["quality"][k].get("steps", 0),
                                                         CONFIGS.index(results["quality"][k]["config"])
                                                         if results["quality"][k]["config"] in CONFIGS else 99)):
        row = results["quality"][key]
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    if "evaluate_crosscheck" in results:
        c = results["evaluate_crosscheck"]
        lines += ["", f"Cross-check: velodiff.eval.evaluate on the uncached pipeline at {c['steps']} steps gives "
                      f"accuracy {c['evaluate_accuracy']:.4g}, fd {c['evaluate_fd']:.4g} (this table: "
                      f"{c['bench_accuracy']:.4g}, {c['bench_fd']:.4g}; equal: {c['equal']})."]
    for steps, peer in sorted(results.get("peers", {}).items(), key=lambda kv: int(kv[0])):
        v = results.get("peers_versions", {})
        lines += ["", f"## Peers, {steps} steps", "",
                  f"DeepCache {v.get('DeepCache')} (DeepCacheSDHelper, branch 0) and tgate {v.get('tgate')} "
                  f"(TgateSDLoader, sp_interval 5, fi_interval 1, warm_up 2) on diffusers {v.get('diffusers')} "
                  "StableDiffusionPipeline from the same folder (DPMSolverMultistepScheduler). psnr: 100 images (10 per "
                  "digit) against the same side's uncached images, same seeds; speed-up: own uncached time / cached "
                  "time per interleaved round (ten digits per call), median (min-max); max_abs: largest pixel "
                  f"difference between the peer's and velodiff's images. Load {peer['load_before']} -> "
                  f"{peer['load_after']}.", ""]
        pc = ["setting", "peer_speedup", "velodiff_speedup", "peer_psnr_mean", "velodiff_psnr_mean", "peer_psnr_min",
              "velodiff_psnr_min", "peer_vs_velodiff_max_abs"]
        lines += ["| " + " | ".join(pc) + " |", "|" + "---|" * len(pc)]
        for row in peer["rows"].values():
            lines.append("| " + " | ".join(fmt(row.get(c)) for c in pc) + " |")
        extra = []
        if str(steps) in results.get("peers_uncached_max_abs", {}):
            extra.append(f"uncached velodiff vs diffusers images: max abs difference "
                         f"{results['peers_uncached_max_abs'][str(steps)]:.3g}")
        if str(steps) in results.get("velodiff_over_diffusers_uncached", {}):
            extra.append("velodiff uncached over diffusers uncached: "
                         f"{fmt(results['velodiff_over_diffusers_uncached'][str(steps)])}x")
        if peer["errors"]:
            extra.append("errors: " + "; ".join(f"{k}: {e}" for k, e in peer["errors"].items()))
        if extra:
            lines += [""] + ["- " + e for e in extra]
    with open(path("cache_unet_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_sd15(res: dict) -> None:
    res["machine"] = machine()
    with open(path("cache_unet_sd15_cpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    cols = ["config", "seconds", "speedup", "flops_fraction", "latent_rel_diff"]
    lines = ["# cache_unet_sd15_cpu", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in res["machine"].items()), "",
             res["setting"] + f". seconds: median of {res['timing']['rounds']} interleaved rounds; speed-up: uncached "
             "/ cached per round, median (min-max); flops: fraction of the uncached UNet FLOPs; latent_rel_diff: "
             "relative Frobenius difference of the final latents from the uncached ones (random weights: a "
             f"fidelity proxy only). Load {res['load_before']} -> {res['load_after']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in res["rows"]:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    with open(path("cache_unet_sd15_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["quality", "flops", "speed", "peers"],
                    choices=["quality", "flops", "speed", "peers", "pictures", "sd15"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    ap.add_argument("--configs", nargs="+", default=CONFIGS)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=2.5)
    ap.add_argument("--wait", type=float, default=3600.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT["dir"] = args.out
    os.makedirs(args.out, exist_ok=True)
    results = load_results("cache_unet_digits")
    for key in ("quality", "speed", "peers"):
        results.setdefault(key, {})
    if "quality" in args.sections:
        section_quality(results, args.steps, args.per_class, args.configs)
    if "flops" in args.sections:
        section_flops(results, args.steps, args.configs)
    if "speed" in args.sections:
        section_speed(results, args.steps, args.configs, args.rounds, args.max_load, args.wait)
    if "peers" in args.sections:
        section_peers(results, args.steps, args.rounds, args.max_load, args.wait)
    write(results)
    if "pictures" in args.sections:
        section_pictures(results, args.configs)
    if "sd15" in args.sections:
        sd15 = {}
        section_sd15(sd15, max(3, args.rounds // 2), args.max_load, args.wait)
        write_sd15(sd15)
    log("wrote", path("cache_unet_digits.md"))


if __name__ == "__main__":
    main()
