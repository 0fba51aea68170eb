"""velodiff::attention vs torch's scaled_dot_product_attention at the attention shapes of diffusion models.

Both candidates take the same inputs: q / k / v as the models pass them, transposed views of [B, L, H, D]
projections (no copy), and produce [B, H, Lq, Dv] in the input dtype:
  velodiff   velodiff.ops.attention(q, k, v[, key_padding_mask])
  sdpa       torch.nn.functional.scaled_dot_product_attention(q, k, v[, attn_mask=mask[:, None, None, :]])
Shapes (batch 2 = one CFG pair): SD 1.5 at 512x512 (heads 8: 4096 tokens at D 40, 1024 at D 80, 256 at D 160,
and 1024 at D 160, its deepest level at 1024x1024), its cross-attention to 77 CLIP tokens, SDXL (D 64: 10 heads at
4096 tokens, 20 heads at 1024, cross 77), PixArt / DiT (16 heads of D 72 at 4096 tokens, cross-attention to 120
T5 tokens with a padding mask). Timed interleaved with bench/common.py's ``compare`` (rounds, rotated order);
the ratio sdpa / velodiff is taken per round and given as median (min-max) over the rounds: > 1 means ours is
faster. Usage:
  python bench/bench_attention.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--rounds 10] [--threads N]
                                  [--only SUBSTRING] [--quick] [--out bench/results]
``--quick``: tiny shapes, one round (a smoke test of the script, not a measurement). Writes
<out>/attention_<cpu|GPU name>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

from velodiff.ops import attention  # noqa: E402

# name: (batch, heads, Lq, Lk, D, text keys masked to this many (None: no mask))
SHAPES = {
    "sd15-64x64-self-d40": (2, 8, 4096, 4096, 40, None),
    "sd15-64x64-cross77-d40": (2, 8, 4096, 77, 40, None),
    "sd15-32x32-self-d80": (2, 8, 1024, 1024, 80, None),
    "sd15-32x32-cross77-d80": (2, 8, 1024, 77, 80, None),
    "sd15-16x16-self-d160": (2, 8, 256, 256, 160, None),
    "sd15-32x32-self-d160": (2, 8, 1024, 1024, 160, None),
    "sdxl-64x64-self-d64": (2, 10, 4096, 4096, 64, None),
    "sdxl-32x32-self-d64": (2, 20, 1024, 1024, 64, None),
    "sdxl-32x32-cross77-d64": (2, 20, 1024, 77, 64, None),
    "pixart-64x64-self-d72": (2, 16, 4096, 4096, 72, None),
    "pixart-64x64-cross120-d72": (2, 16, 4096, 120, 72, 30),
}
QUICK = {"quick-self-d40": (1, 2, 64, 64, 40, None), "quick-cross-d72": (1, 2, 33, 20, 72, 9)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def gemm_gflops(dtype, device, n):
    """torch.matmul's GFLOP/s on [n, n] x [n, n] in ``dtype`` (the BLAS's rate: what this machine's vector units
    deliver on the dense products attention is made of), median of 5."""
    a, b = (torch.randn(n, n).to(dtype).to(device) for _ in range(2))
    times = []
    for _ in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times[1:])[2] / 1e9


def inputs(shape, dtype, device, seed=0):
    b, h, lq, lk, d, kept = shape
    g = torch.Generator().manual_seed(seed)

    def proj(length):  # a [B, L, H, D] projection seen as [B, H, L, D]
        return torch.randn(b, length, h, d, generator=g).to(dtype).to(device).transpose(1, 2)
    q, k, v = proj(lq), proj(lk), proj(lk)
    mask = None
    if kept is not None:
        mask = torch.zeros(b, lk, dtype=torch.bool)
        mask[:, :kept] = True
        mask = mask.to(device)
    return q, k, v, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, fp16 on cuda")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default="", help="run only the shapes whose name contains this")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    dtype_name = args.dtype or ("fp32" if dev == "cpu" else "fp16")
    dtype = DTYPES[dtype_name]
    shapes = QUICK if args.quick else {n: s for n, s in SHAPES.items() if args.only in n}
    rounds = 1 if args.quick else args.rounds
    load_start = load_average()
    rows, timings = [], {}
    for name, shape in shapes.items():
        q, k, v, mask = inputs(shape, dtype, dev)
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        candidates = {
            "velodiff": lambda: attention(q, k, v, key_padding_mask=mask),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
        }
        with torch.no_grad():
            diff = float((candidates["velodiff"]().float() - candidates["sdpa"]().float()).abs().max())
            res = compare(candidates, "sdpa", rounds=rounds, warmup=2, device=dev)
        b, h, lq, lk, d, kept = shape
        flops = 4.0 * b * h * lq * (lk if kept is None else kept) * d
        med_ours = res.stats("velodiff")["median"]
        row = {"shape": name, "B": b, "H": h, "Lq": lq, "Lk": lk, "D": d,
               "mask": "" if kept is None else f"{kept}/{lk} kept",
               "velodiff_ms": res.stats("velodiff", 1e3), "sdpa_ms": res.stats("sdpa", 1e3),
               "sdpa/velodiff": res.ratio("velodiff", over="sdpa"),
               "velodiff_GFLOPs": round(flops / med_ours / 1e9, 2),
               "sdpa_GFLOPs": round(flops / res.stats("sdpa")["median"] / 1e9, 2), "max_abs_diff": f"{diff:.2g}"}
        rows.append(row)
        timings[name] = res.to_json()
        print({k_: (v_["median"] if isinstance(v_, dict) else v_) for k_, v_ in row.items()}, flush=True)
    load_end = load_average()
    summary = summarise_ratios({r["shape"]: r["sdpa/velodiff"]["median"] for r in rows})
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    default_dtype = "fp32" if dev == "cpu" else "fp16"
    suffix = ("" if dtype_name == default_dtype else f"_{dtype_name}") + ("_quick" if args.quick else "")
    gemm = gemm_gflops(dtype, dev, 256 if args.quick else 2048)
    path = write_results(
        f"attention_{tag}{suffix}", rows,
        ["shape", "B", "H", "Lq", "Lk", "D", "mask", "velodiff_ms", "sdpa_ms", "sdpa/velodiff", "velodiff_GFLOPs",
         "sdpa_GFLOPs", "max_abs_diff"],
        args.out,
        note=f"Exact attention, {dtype_name}, inputs as transposed [B, L, H, D] views. velodiff: velodiff::attention; "
             "sdpa: torch.nn.functional.scaled_dot_product_attention (its default backend). Each cell is median "
             f"(min-max) over {rounds} interleaved rounds; ratio: sdpa time / velodiff time within each round, "
             "median (min-max) over the rounds; > 1 means velodiff is faster. GFLOP/s counts 4 B H Lq Lk' D "
             f"(Lk' the attended keys). For scale, torch.matmul of two {2048 if not args.quick else 256}^2 {dtype_name} "
             f"matrices in the same run: {gemm:.0f} GFLOP/s. Summary over rows: {summary['sentence']}.",
        extra={"load_start": load_start, "load_end": load_end, "rounds": rounds, "threads": args.threads,
               "dtype": dtype_name, "matmul_GFLOPs": gemm, "summary": summary, "timing": timings})
    print(summary["sentence"])
    print("wrote", path)


if __name__ == "__main__":
    main()
