"""Whole-model CPU speed of a W4A4 denoiser: one DiT-XL/2 forward at 256x256 (32x32 latents, 256 tokens), batch 2
(a guided step), fp32 against the same model with its default layers (attention and MLP linears of the 28
blocks) replaced by SVDQuant-shaped QuantizedLinear layers (int4 codes, rank-32 branch, smoothing).

Speed does not depend on the values, so the quantized layers get random codes and factors instead of running the
calibration and SVD search (which takes minutes for a model this size); the layers run exactly the kernels a
quantized checkpoint runs. Writes bench/results/quant_model_cpu.{json,md}.

  python bench/bench_quant_model_cpu.py [--threads 2] [--batch 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import torch  # noqa: E402

from velodiff.loading import DIT_CONFIG  # noqa: E402
from velodiff.models.dit import DiTTransformer2DModel  # noqa: E402
from velodiff.quant import QuantizedLinear, install_layer, select_layers  # noqa: E402


def random_quantized(linear: torch.nn.Linear, rank: int, gen: torch.Generator) -> QuantizedLinear:
    q = QuantizedLinear(linear.in_features, linear.out_features, bits=4, rank=rank, smooth=True,
                        bias=linear.bias is not None)
    q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=gen, dtype=torch.uint8))
    q.wscales.copy_(torch.rand(q.wscales.shape, generator=gen) * 0.01)
    q.smooth.copy_(torch.rand(q.smooth.shape, generator=gen) + 0.5)
    q.lora_down.copy_(torch.randn(q.lora_down.shape, generator=gen) * 0.02)
    q.lora_up.copy_(torch.randn(q.lora_up.shape, generator=gen) * 0.02)
    if linear.bias is not None:
        q.bias.copy_(linear.bias.detach())
    return q


def time_forward(model, x, t, y, reps: int) -> float:
    with torch.no_grad():
        model(x, t, y)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, t, y)
            best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = {k: v for k, v in DIT_CONFIG.items() if not k.startswith("_")}
    config["sample_size"] = 32
    model = DiTTransformer2DModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, generator=gen)
    t = torch.full((args.batch,), 500.0)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    t_fp32 = time_forward(model, x, t, y, args.reps)
    layers = select_layers(model)
    for name, linear in layers.items():
        install_layer(model, name, random_quantized(linear, args.rank, gen))  # MLP GELU fused, as quantize does
    t_q = time_forward(model, x, t, y, args.reps)
    row = {"model": "DiT-XL/2 256px", "batch": args.batch, "tokens": 256, "quantized_layers": len(layers),
           "fp32_s": round(t_fp32, 3), "w4a4_s": round(t_q, 3), "speedup": round(t_fp32 / t_q, 2)}
    print(row)
    write_results("quant_model_cpu", [row], list(row), args.out,
                  note=f"{args.threads} threads; best of {args.reps} forwards after a warm-up. w4a4: SVDQuant-shaped "
                       f"layers (rank {args.rank}) on velodiff's CPU kernels; fp32: torch's F.linear. adaLN "
                       "modulation, embeddings and the final layer stay fp32 in both.")


if __name__ == "__main__":
    main()
