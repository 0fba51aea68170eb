"""StreamDiffusion on this machine (issue 16): frames per second of velodiff.stream.StreamPipeline.

Parts (each writes its own table):

* ``speed`` -> stream_speed_cpu.{json,md}: image-to-image streams of ``digits`` (16x16 frames) and of a full-size
  SD 1.5 UNet with random weights (diffusers' init, seed 0) at 256x256 with a random-weight TAESD
  (AutoencoderTiny, default config) and fixed random prompt embeddings. Per model: stream batch against the
  sequential baseline (each frame's steps one after another, ``use_denoising_batch=False``), both without
  guidance, and residual CFG (self-negative, batch n) against full CFG (batch 2n), both stream-batched. t-index
  [32, 45] (two steps). Every candidate processes a chunk of new frames per timing; the candidates are interleaved
  over rounds (velodiff.timing.compare) and the ratios taken within rounds (median with min and max).
* ``filter`` -> stream_filter_digits.{json,md}: the stochastic similarity filter on a slowly changing sequence
  (a held-out digit cross-fading into the next one every 40 frames, with light sensor noise): frames processed and
  skipped, model calls, and the fidelity of the filtered stream to the unfiltered one (PSNR over all frames).
* ``memory`` -> stream_memory_digits.{json,md}: a long run of ``digits`` through the worker thread's queues
  (default 10,000 frames, each processed): resident set size at the start (after 100 frames) and every tenth of the
  run. Run it alone (``--part memory``) so that the other parts' models are not in the process.

  python bench/bench_stream.py [--part speed|filter|memory|all] [--rounds 5] [--frames 10000] [--device cuda]
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_ranges, load_average, write_results  # noqa: E402

import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.stream import StreamPipeline, StreamWorker  # noqa: E402
from velodiff.timing import compare  # noqa: E402

T_INDEX = [32, 45]
DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "velodiff", "data",
                      "digits")
#: the candidates of the speed part: (name, use_denoising_batch, cfg_type, guidance)
CANDIDATES = (("sequential", False, "none", 1.0), ("stream batch", True, "none", 1.0),
              ("full CFG", True, "full", 1.4), ("RCFG self", True, "self", 1.4))


def digit_frames(count: int, size: int = 16, hold: int = 40, noise: float = 0.01, seed: int = 0):
    """[3, size, size] frames in [0, 1]: held-out digits (split.json's test part) cross-fading one into the next
    every ``hold`` frames, plus N(0, noise) sensor noise."""
    from sklearn.datasets import load_digits
    with open(os.path.join(DIGITS, "split.json")) as f:
        held_out = json.load(f)["test"]
    data = load_digits().images / 16.0
    g = torch.Generator().manual_seed(seed)
    frames = []
    for k in range(count):
        a, b = data[held_out[k // hold % len(held_out)]], data[held_out[(k // hold + 1) % len(held_out)]]
        w = (k % hold) / hold
        img = torch.from_numpy((1 - w) * a + w * b).float()[None, None]
        img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0]
        img = img.expand(3, -1, -1) + noise * torch.randn(3, size, size, generator=g)
        frames.append(img.clamp(0, 1))
    return frames


def sd15_pipe(device: str = "cpu", dtype=torch.float32):
    """A StableDiffusionPipeline of a full-size SD 1.5 UNet (random weights) and the digits scheduler, a random
    TAESD, and random prompt embeddings [1, 77, 768] (positive and negative)."""
    from diffusers import UNet2DConditionModel as DUNet

    from bench_unet import SD15, share_weights
    from velodiff.models.taesd import AutoencoderTiny
    from velodiff.pipelines.stable_diffusion import StableDiffusionPipeline
    with open(os.path.join(DIGITS, "scheduler", "scheduler_config.json")) as f:
        scheduler = json.load(f)
    torch.manual_seed(0)
    unet = share_weights(DUNet(**SD15).eval()).to(device=device, dtype=dtype)
    tiny = AutoencoderTiny().eval().to(device=device, dtype=dtype)
    pipe = StableDiffusionPipeline({"unet": unet, "scheduler": scheduler}, dtype, device)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    return pipe, tiny, embeds


def speed(model: str, rounds: int, chunk: int, device: str = "cpu"):
    """Rows of the speed table for one model (fp32 on the CPU, fp16 on a GPU)."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    if model == "digits":
        pipe, vae, embeds, size = vd.Pipeline.from_pretrained("digits", dtype=dtype, device=device), None, None, 16
    else:
        (pipe, vae, embeds), size = sd15_pipe(device, dtype), 256
    frames = digit_frames(64, size=size)
    streams, positions = {}, {}
    for name, batch, cfg, guidance in CANDIDATES:
        s = StreamPipeline(pipe, T_INDEX, prompt="a handwritten 3", cfg_type=cfg, guidance_scale=guidance,
                           use_denoising_batch=batch, vae=vae, output_type="pt")
        if embeds is not None:
            s.set_prompt(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1])
        streams[name], positions[name] = s, 0

    def run(name):
        def fn():
            for _ in range(chunk):
                streams[name].step(frames[positions[name] % len(frames)])
                positions[name] += 1
        return fn

    with torch.inference_mode():
        result = compare({name: run(name) for name, *_ in CANDIDATES}, "sequential", rounds=rounds, warmup=2,
                         device=device,
                         min_time=0.0, inner={name: 1 for name, *_ in CANDIDATES},
                         log=lambda line: print(f"{model}: {line}", flush=True))
    rows = []
    for name, batch, cfg, guidance in CANDIDATES:
        st = result.stats(name, scale=1.0 / chunk)
        over = "sequential" if cfg == "none" else "full CFG"
        ratio = result.ratio(name, over)
        rows.append({"model": model, "setup": name, "cfg": cfg, "batch rows": streams[name].batch_size if batch
                     else (1 if cfg == "none" else 2), "ms/frame": {k: st[k] * 1e3 for k in ("median", "min", "max")},
                     "fps": 1.0 / st["median"], "speed-up": None if name == over else ratio, "over": over})
    return rows, result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def filter_part(count: int):
    pipe = vd.Pipeline.from_pretrained("digits")
    frames = digit_frames(count)
    reference = StreamPipeline(pipe, T_INDEX, prompt="", output_type="pt")
    with torch.inference_mode():
        plain = [reference.step(f).image for f in frames]
    rows = []
    for threshold in (None, 0.995, 0.98, 0.95):
        s = StreamPipeline(pipe, T_INDEX, prompt="", similarity_threshold=threshold, output_type="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            outs = [s.step(f).image for f in frames]
        seconds = time.perf_counter() - t0
        skipped = s.filter.skipped if s.filter is not None else 0
        rows.append({"threshold": "off" if threshold is None else threshold, "frames": count,
                     "processed": count - skipped, "skipped": skipped, "model calls": s.model_calls,
                     "fps": count / seconds,
                     "PSNR vs unfiltered (dB)": psnr(torch.cat(outs), torch.cat(plain))})
    return rows


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_part(count: int):
    pipe = vd.Pipeline.from_pretrained("digits")
    pipe.load_lora("digits-lcm")
    frames = digit_frames(400)
    stream = StreamPipeline(pipe, T_INDEX, prompt="", output_type="pil")  # no filter: every frame is processed
    rows, start, received = [], None, 0
    t0 = time.perf_counter()
    with StreamWorker(stream, max_queue=8) as worker:
        for k in range(count):
            worker.put(frames[k % len(frames)])
            received += len(worker.ready())  # keep the output queue short, as a viewer would
            if k + 1 == 100:
                start = rss_mib()
                rows.append({"frames": k + 1, "RSS (MiB)": start, "growth since frame 100 (MiB)": 0.0})
            if (k + 1) % (count // 10) == 0:
                now = rss_mib()
                rows.append({"frames": k + 1, "RSS (MiB)": now, "growth since frame 100 (MiB)": now - start,
                             "fps so far": (k + 1) / (time.perf_counter() - t0)})
                print(rows[-1], flush=True)
        worker.stop(drain=True)
        while worker.get(timeout=60) is not None:
            received += 1
    return rows, received


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["speed", "filter", "memory", "all"], default="all")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="the speed part's device (cuda: fp16)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--frames", type=int, default=10000, help="frames of the memory run")
    p.add_argument("--filter-frames", type=int, default=400)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    check_ranges("bench_stream.py", [("--rounds", args.rounds, 1, 100), ("--frames", args.frames, 100, 10 ** 7),
                                     ("--filter-frames", args.filter_frames, 10, 10 ** 6)])
    torch.manual_seed(0)
    if args.part in ("speed", "all"):
        load = load_average()
        rows, extra = [], {}
        for model, chunk in (("digits", 16), ("sd15-256", 2)):
            r, result = speed(model, args.rounds, chunk if args.device == "cpu" else 32, args.device)
            rows += r
            extra[model] = result.to_json()
        precision = "fp32" if args.device == "cpu" else "fp16"
        chunks = "digits 16, SD 1.5 2" if args.device == "cpu" else "32"
        note = (f"t-index {T_INDEX} (t = 359, 99; 2 steps per frame), {precision}, {args.rounds} interleaved rounds, "
                f"each timing a chunk of new frames ({chunks}) on a warmed-up stream; ms/frame median (min-max) "
                "over rounds; speed-up: per-round ratio over the `over` setup, median (min-max). Guidance 1.4 for "
                "the CFG rows. sd15-256: full-size SD 1.5 UNet, random weights, 256x256 frames, random TAESD.")
        write_results(f"stream_speed_{args.device}", rows, ["model", "setup", "cfg", "batch rows", "ms/frame", "fps",
                                                 "speed-up", "over"], args.out, note=note,
                      extra={"load_before": load, "load_after": load_average(), "rounds": args.rounds,
                             "timings": extra})
    if args.part in ("filter", "all"):
        rows = filter_part(args.filter_frames)
        write_results("stream_filter_digits", rows, ["threshold", "frames", "processed", "skipped", "model calls",
                                                     "fps", "PSNR vs unfiltered (dB)"], args.out,
                      note="digits img2img stream, t-index [32, 45], no guidance; frames: held-out digits "
                           "cross-fading every 40 frames, sensor noise sd 0.01; max_skip_frame 10; one run (seed 2).")
    if args.part in ("memory", "all"):
        rows, received = memory_part(args.frames)
        write_results("stream_memory_digits", rows, ["frames", "RSS (MiB)", "growth since frame 100 (MiB)",
                                                     "fps so far"], args.out,
                      note=f"digits + digits-lcm, t-index [32, 45], every frame processed (no filter), PIL outputs, "
                           f"through StreamWorker's queues, alone in its process (--part memory); {args.frames} "
                           f"frames in, {received} outputs out (the last ones flushed).")


if __name__ == "__main__":
    main()
