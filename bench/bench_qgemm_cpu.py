"""CPU microbenchmark of the quantized GEMMs at the linear-layer shapes of SD 1.5, SDXL and PixArt.

For each (model, layer, M tokens, K, N): torch's F.linear in fp32 (the CPU model dtype; MKL/oneDNN) against
velodiff's W4A4 (rank-32 low-rank branch, the SVDQuant layer) and W8A8, each timed as the GEMM alone
(``velodiff::qgemm`` on pre-quantized activations) and end to end (``quantize_act`` + ``qgemm``, what a
QuantizedLinear runs). Ratios > 1 mean velodiff is faster. Writes bench/results/qgemm_cpu.{json,md}.

  python bench/bench_qgemm_cpu.py [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_fn, write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from velodiff.ops import qgemm, quantize_act, reference  # noqa: E402

# (model, layer, M tokens, K, N): SD 1.5 at 512x512 (64x64 latents: 4096 / 1024 / 256 tokens per level, batch 1),
# SDXL at 1024x1024 (its transformer levels at 64x64 and 32x32), PixArt at 1024x1024 (4096 tokens)
SHAPES = [
    ("sd15", "attn q/k/v/out 320", 4096, 320, 320), ("sd15", "geglu proj 320", 4096, 320, 2560),
    ("sd15", "ff out 320", 4096, 1280, 320), ("sd15", "attn 640", 1024, 640, 640),
    ("sd15", "geglu proj 640", 1024, 640, 5120), ("sd15", "ff out 640", 1024, 2560, 640),
    ("sd15", "attn 1280", 256, 1280, 1280), ("sd15", "geglu proj 1280", 256, 1280, 10240),
    ("sd15", "ff out 1280", 256, 5120, 1280),
    ("sdxl", "attn 640", 4096, 640, 640), ("sdxl", "geglu proj 640", 4096, 640, 5120),
    ("sdxl", "ff out 640", 4096, 2560, 640), ("sdxl", "attn 1280", 1024, 1280, 1280),
    ("sdxl", "geglu proj 1280", 1024, 1280, 10240), ("sdxl", "ff out 1280", 1024, 5120, 1280),
    ("pixart", "attn 1152", 4096, 1152, 1152), ("pixart", "mlp up", 4096, 1152, 4608),
    ("pixart", "mlp down", 4096, 4608, 1152),
]
QUICK = {("sd15", "attn q/k/v/out 320"), ("sd15", "geglu proj 640"), ("pixart", "attn 1152")}


def operands(m, k, n, bits, rank, gen):
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen) * 0.1
    codes, wscales = reference.quantize_groups(w, bits)
    qw = reference.pack_codes(codes, bits)
    smooth = torch.rand(k, generator=gen) + 0.5 if rank else None
    down = torch.randn(k, rank, generator=gen) * 0.05 if rank else None
    up = torch.randn(n, rank, generator=gen) * 0.05 if rank else None
    return x, w, bias, qw, wscales, smooth, down, up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model, layer, m, k, n in SHAPES:
        if args.quick and (model, layer) not in QUICK:
            continue
        row = {"model": model, "layer": layer, "M": m, "K": k, "N": n}
        x, w, bias, *_ = operands(m, k, n, 4, 0, gen)
        with torch.no_grad():
            t_ref = time_fn(lambda: F.linear(x, w, bias), "cpu")
        row["fp32_ms"] = round(1e3 * t_ref, 3)
        for bits, rank, label in ((4, args.rank, "w4a4"), (8, 0, "w8a8")):
            x, w, bias, qw, wscales, smooth, down, up = operands(m, k, n, bits, rank, gen)
            qx, ascales, lora_act = quantize_act(x, smooth, down, bits=bits)
            la = lora_act if rank else None

            def gemm():
                return qgemm(qx, ascales, qw, wscales, bias, la, up, None, bits=bits)

            def layer_call():
                qx2, as2, la2 = quantize_act(x, smooth, down, bits=bits)
                return qgemm(qx2, as2, qw, wscales, bias, la2 if rank else None, up, None, bits=bits)

            t_gemm, t_layer = time_fn(gemm, "cpu"), time_fn(layer_call, "cpu")
            row[f"{label}_gemm_ms"] = round(1e3 * t_gemm, 3)
            row[f"{label}_layer_ms"] = round(1e3 * t_layer, 3)
            row[f"{label}_gemm_speedup"] = round(t_ref / t_gemm, 2)
            row[f"{label}_layer_speedup"] = round(t_ref / t_layer, 2)
        row["w4a4_gops"] = round(2 * m * k * n / (1e9 * row["w4a4_gemm_ms"] / 1e3), 1)
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "layer", "M", "K", "N", "fp32_ms", "w4a4_gemm_ms", "w4a4_gemm_speedup", "w4a4_layer_ms",
            "w4a4_layer_speedup", "w8a8_gemm_ms", "w8a8_gemm_speedup", "w8a8_layer_ms", "w8a8_layer_speedup",
            "w4a4_gops"]
    write_results("qgemm_cpu", rows, cols, args.out,
                  note=f"{args.threads} threads. fp32: F.linear (torch's MKL/oneDNN GEMM). w4a4: velodiff::qgemm "
                       f"with a rank-{args.rank} low-rank branch and bias; *_layer: quantize_act (smoothing + "
                       "down-projection) + qgemm, what QuantizedLinear runs. speedup = fp32 time / velodiff "
                       "time, measured in the same run (median of repeated batches).")


if __name__ == "__main__":
    main()
