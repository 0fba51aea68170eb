"""Tiled VAE decode: peak memory and exactness of velodiff's ``tiled_vae`` vs the untiled decode, with diffusers'
``enable_tiling`` for comparison (issue 13, section 3).

An SD 1.x VAE (the real config, seeded random weights; GroupNorm affines and biases perturbed so that none is
trivial) decodes one random latent of SIZE/8 x SIZE/8 three ways, each in its own subprocess so that peak
memory is that decode's alone:

- ``plain``: velodiff's untiled ``vae.decode`` (the reference);
- ``tiled``: velodiff's ``tiled_decode`` with TILE-pixel tiles (``--offload`` keeps the full activations in host
  memory on CUDA);
- ``diffusers``: diffusers' AutoencoderKL on the same weights with ``enable_tiling()`` (512-pixel tiles, 25 %
  overlap, per-tile GroupNorm statistics, linear blending).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the decode; on the CPU the rise of the process's
peak resident set over its resident set just before the decode (Linux: the peak is reset through
/proc/self/clear_refs and read as VmHWM; elsewhere ru_maxrss, whose model-build high-water mark can hide a small
decode's peak). The max |difference| to the plain decode
is measured on the [-1, 1]-scale output. Writes bench/results/tiled_vae.{json,md}.

  python bench/bench_tiled_vae.py [--size 2048] [--tile 512] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
                                  [--offload] [--outdir bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sd_vae(dtype, device, diffusers: bool = False):
    """The SD 1.x VAE with seeded random weights, as velodiff's model or (same weights) diffusers'."""
    from velodiff.loading import default_vae_config
    from velodiff.models.vae import AutoencoderKL
    config = {k: v for k, v in default_vae_config("sd1").items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    if diffusers:
        from diffusers import AutoencoderKL as DiffusersVAE
        theirs = DiffusersVAE(**{**config, "sample_size": 512}).eval()
        theirs.load_state_dict(vae.state_dict(), strict=True)
        vae = theirs
    return vae.to(device=device, dtype=dtype)


def reset_peak_rss() -> int:
    """Reset this process's peak resident set (Linux: ``5`` into /proc/self/clear_refs resets VmHWM) and return
    the resident bytes now; where that is not possible, the peak so far (ru_maxrss)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """This process's peak resident bytes since :func:`reset_peak_rss` (VmHWM), else ru_maxrss."""
    try:
        return _status_bytes("VmHWM")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{key} not in /proc/self/status")


def worker(args) -> None:
    """One decode in this process; writes the output (fp32, CPU) and the figures to args.out."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    vae = sd_vae(dtype, device, diffusers=args.worker == "diffusers")
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(1))
    z = z.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    before = reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        if args.worker == "plain":
            out = vae.decode(z)
        elif args.worker == "tiled":
            from velodiff.models.vae_tiling import tiled_decode
            out = tiled_decode(vae, z, args.tile, "cpu" if args.offload and device.type == "cuda" else None)
        else:
            vae.enable_tiling()
            out = vae.decode(z).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rss_rise = peak_rss() - before
    figures = {"seconds": seconds, "peak_rss_rise_bytes": rss_rise}
    if device.type == "cuda":
        figures["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - base
    torch.save(out.float().cpu(), args.out + ".pt")
    with open(args.out + ".json", "w") as f:
        json.dump(figures, f)


def run_mode(args, mode: str, scratch: str):
    out = os.path.join(scratch, mode)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--out", out, "--size", str(args.size),
           "--tile", str(args.tile), "--device", args.device, "--dtype", args.dtype] + (["--offload"] if args.offload
                                                                                     else [])
    subprocess.run(cmd, check=True)
    with open(out + ".json") as f:
        return json.load(f), torch.load(out + ".pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--tile", type=int, default=512, help="velodiff's tile side in image pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--offload", action="store_true", help="tiled: keep full activations in host memory (CUDA)")
    parser.add_argument("--outdir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--worker", choices=("plain", "tiled", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size <= 0 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.tile < 16:
        parser.error(f"--tile must be at least 16 pixels (2 latent pixels of the SD VAE), got {args.tile}")
    if args.worker:
        worker(args)
        return
    from common import write_results
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        plain_figures, plain = run_mode(args, "plain", scratch)
        scale = float(plain.abs().max())
        for mode in ("plain", "tiled", "diffusers"):
            figures, out = (plain_figures, plain) if mode == "plain" else run_mode(args, mode, scratch)
            diff = float((out - plain).abs().max())
            row = {"method": {"plain": "velodiff untiled", "tiled": f"velodiff tiled_vae (tile {args.tile})",
                              "diffusers": "diffusers enable_tiling (tile 512, overlap 25 %)"}[mode],
                   "seconds": round(figures["seconds"], 2),
                   "peak_rss_rise_MiB": round(figures["peak_rss_rise_bytes"] / 2 ** 20, 1),
                   "max_abs_diff_to_untiled": diff, "max_diff_rel_to_range": diff / scale}
            if "peak_cuda_bytes" in figures:
                row["peak_cuda_MiB"] = round(figures["peak_cuda_bytes"] / 2 ** 20, 1)
            rows.append(row)
            print(row, flush=True)
    columns = ["method", "seconds", "peak_rss_rise_MiB"] + (["peak_cuda_MiB"] if args.device == "cuda" else []) + \
        ["max_abs_diff_to_untiled", "max_diff_rel_to_range"]
    note = (f"SD 1.x VAE, random weights, decode of one {args.size}x{args.size} image, {args.dtype} on {args.device}"
            f"{', offload' if args.offload else ''}; each method in its own process. max|untiled| = {scale:.3g}.")
    path = write_results("tiled_vae", rows, columns, args.outdir, note=note,
                         extra={"size": args.size, "tile": args.tile, "dtype": args.dtype, "device": args.device})
    print(path)


if __name__ == "__main__":
    main()
