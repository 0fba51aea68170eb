"""`velodiff quantize` end to end on a full-size SD 1.5 UNet (random weights: nothing can be downloaded here).

What it builds: a diffusers pipeline folder whose UNet has SD 1.5's real config (860 M parameters, diffusers'
own random init, seeded), saved in fp16; the built-in digits model's VAE, scheduler and tokenizer; and a 2-layer
random CLIP text encoder of width 768 (SD 1.5's cross-attention width). The UNet's sample size is lowered to
``--latent`` so calibration is affordable on a CPU; the weights and the layer shapes are full size.

What it measures, through the public API (the same calls `velodiff quantize` makes):
  - quantization wall time, split into calibration and the per-layer work, and the process's peak RSS;
  - checkpoint bytes on disk: the quantized folder's denoiser file against the fp16 UNet file (a measured
    counterpart of bench_quant_memory.py's computed ratios);
  - the loaded checkpoint's UNet output against the fp32 UNet's on the same inputs (relative error: with random
    weights this is a sanity check of the whole path at full size, not a quality figure);
  - one generated image from the loaded quantized pipeline (finite, right shape).

  python bench/bench_quantize_full.py [--layers all] [--rank 32] [--latent 32] [--out bench/results]
Writes <out>/quantize_full_sd15_cpu.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import torch  # noqa: E402


def build_folder(path: str, latent: int, seed: int) -> None:
    """A pipeline folder with a full-size random SD 1.5 UNet (fp16 file) and the digits model's other parts."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from velodiff.loading import default_unet_config
    from velodiff.pipelines import BUILTIN_MODELS

    digits = BUILTIN_MODELS["digits"]
    os.makedirs(path)
    for part in ("model_index.json", "scheduler", "tokenizer", "vae"):
        src = os.path.join(digits, part)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(path, part))
    torch.manual_seed(seed)
    cfg = {k: v for k, v in default_unet_config("sd1").items() if not k.startswith("_")}
    cfg["sample_size"] = latent
    UNet2DConditionModel.from_config(cfg).to(torch.float16).save_pretrained(os.path.join(path, "unet"))
    with open(os.path.join(digits, "text_encoder", "config.json")) as f:
        te = json.load(f)
    te.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
    for key in ("architectures", "transformers_version", "dtype"):
        te.pop(key, None)
    CLIPTextModel(CLIPTextConfig(**te)).to(torch.float16).save_pretrained(os.path.join(path, "text_encoder"))


def file_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs
               if f.endswith(".safetensors"))


def unet_inputs(unet, seed: int):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([999, 400]), ctx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="svdquant", choices=["svdquant", "naive-w4a4", "w8a8"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", default="all", choices=["default", "all"])
    ap.add_argument("--memory-budget", type=float, default=None, help="svdquant: QuantConfig.memory_budget")
    ap.add_argument("--latent", type=int, default=32, help="latent size used for calibration and generation")
    ap.add_argument("--calibration-images", type=int, default=2)
    ap.add_argument("--calibration-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()

    from velodiff import quant
    from velodiff.pipelines import Pipeline

    work = tempfile.mkdtemp(prefix="velodiff-quantize-full-")
    try:
        src, dst = os.path.join(work, "sd15-random"), os.path.join(work, "sd15-quantized")
        t0 = time.time()
        build_folder(src, args.latent, args.seed)
        print(f"built {src} in {time.time() - t0:.0f} s", flush=True)

        pipe = Pipeline.from_pretrained(src, dtype=torch.float32, device="cpu")
        inputs = unet_inputs(pipe.unet, args.seed + 1)
        with torch.no_grad():
            y_ref = pipe.unet(*inputs)
        params = sum(p.numel() for p in pipe.unet.parameters())
        rank = args.rank if args.method == "svdquant" else 0
        config = quant.QuantConfig(args.method, rank=rank, layers=args.layers, memory_budget=args.memory_budget,
                                   calibration_images=args.calibration_images,
                                   calibration_steps=args.calibration_steps, seed=args.seed)
        t0 = time.time()
        report = quant.quantize(pipe, config)
        quantize_s = time.time() - t0
        quant.save_quantized(pipe, dst, dtype=torch.float16)
        print(f"quantized {report['layers']} layers in {quantize_s:.0f} s", flush=True)
        del pipe

        loaded = Pipeline.from_pretrained(dst, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            y_q = loaded.unet(*inputs)
        err = float((y_q - y_ref).norm() / y_ref.norm())
        t0 = time.time()
        image = loaded("a photo", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                       output_type="pt").images
        gen_s = time.time() - t0
        fp16_unet = file_bytes(os.path.join(src, "unet"))
        quant_unet = file_bytes(os.path.join(dst, "unet"))
        row = {
            "model": "SD 1.5 UNet (real config, random weights)", "params_M": round(params / 1e6, 1),
            "method": args.method, "rank": rank, "memory_budget": args.memory_budget,
            "ranks": f"{report['ranks']['min']}-{report['ranks']['max']} (mean {report['ranks']['mean']})",
            "layers": args.layers, "quantized_layers": report["layers"], "model_ratio": report["model_ratio"],
            "calibration": f"{args.calibration_images} images x {args.calibration_steps} steps, "
                           f"{args.latent}x{args.latent} latents",
            "calibration_s": report.get("calibration_seconds"), "quantize_s": round(quantize_s, 1),
            "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "fp16_unet_MiB": round(fp16_unet / 2 ** 20, 1), "quantized_unet_MiB": round(quant_unet / 2 ** 20, 1),
            "file_ratio": round(quant_unet / fp16_unet, 4), "unet_rel_err": round(err, 4),
            "image": "x".join(map(str, image.shape)), "image_finite": bool(torch.isfinite(image).all()),
            "generate_4_steps_s": round(gen_s, 1),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(row)
    note = ("velodiff.quant.quantize + save_quantized + Pipeline.from_pretrained on a full-size SD 1.5 UNet with "
            "diffusers' random init (no real weights offline), fp16 files. file_ratio = the quantized denoiser "
            "file / the fp16 UNet file, both as written. unet_rel_err: the reloaded quantized UNet against the "
            "fp32 one on random inputs (random weights: a sanity check, not a quality figure).")
    budget = f"_budget{args.memory_budget}" if args.memory_budget is not None else ""
    tag = f"quantize_full_sd15_{args.method}_{args.layers}_r{rank}{budget}_cpu"
    print("wrote", write_results(tag, [row], list(row), args.out, note=note))


if __name__ == "__main__":
    main()
