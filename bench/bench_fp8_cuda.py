"""FP8 GEMM on the GPU (issue 15): velodiff::fp8_gemm against cuBLASLt's FP8 GEMM (torch._scaled_mm, per-row
scales) and a bf16 matmul, at the linear-layer shapes of SD 1.5, SDXL and PixArt (bench_qgemm_cuda.py's shapes).

Per shape (M tokens, K in, N out):
  bf16_us        torch.matmul(x, W^T) in bf16 (cuBLAS)
  scaled_mm_us   torch._scaled_mm(a, w^T, scale_a [M, 1], scale_b [1, N], out_dtype=bf16): cuBLASLt e4m3 with
                 row-wise scales (sm_89+; absent where torch lacks it)
  fp8_us         velodiff::fp8_gemm on the same codes and scales (bf16 output)
  quant_us       velodiff::quantize_fp8 of the activations (per token)
  w4a8_us        velodiff::fp8_gemm with 4-bit e2m1 weights (indices into a 16-entry e4m3 table; lowbit-fp W4A8)
  vs_scaled_mm   scaled_mm_us / fp8_us (the issue's goal: >= 0.9 on H100); vs_bf16: bf16_us / fp8_us
  err            relative error of fp8_gemm against the float64 product of the same codes (bf16 output: ~1e-3;
                 above 1e-2 the row says FAILED)
Times: bench_qgemm_cuda.py's gpu_time (CUDA events behind a GPU sleep, median of batches).

  python bench/bench_fp8_cuda.py [--out bench/results] [--quick]
Writes <out>/fp8_cuda_<gpu>.{json,md}.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qgemm_cuda import gpu_time, rel, shapes  # noqa: E402
from common import write_results  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_cuda.py: no CUDA device", file=sys.stderr)
        sys.exit(2)
    from velodiff.ops import fp8_gemm, quantize_fp8
    gpu = torch.cuda.get_device_name(0)
    from velodiff.quant.lowbit_fp import FpFormat, format_table
    table = format_table(FpFormat.parse("e2m1")).cuda()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n, family in shapes(args.quick):
        x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(torch.bfloat16)
        a, asc = quantize_fp8(x)
        qw, wsc = quantize_fp8(w)
        row = {"M": m, "K": k, "N": n, "family": family}
        row["bf16_us"] = gpu_time(lambda i: torch.matmul(x, w.T), 1) * 1e6
        row["fp8_us"] = gpu_time(lambda i: fp8_gemm(a, asc, qw, wsc, out_dtype=torch.bfloat16), 1) * 1e6
        row["quant_us"] = gpu_time(lambda i: quantize_fp8(x), 1) * 1e6
        w4 = torch.randint(0, 256, (n, (k + 1) // 2), device="cuda", dtype=torch.uint8, generator=g)
        row["w4a8_us"] = gpu_time(lambda i: fp8_gemm(a, asc, w4, wsc, out_dtype=torch.bfloat16, w_table=table),
                                  1) * 1e6
        try:
            wt = qw.T  # column-major [K, N], what _scaled_mm takes
            row["scaled_mm_us"] = gpu_time(lambda i: torch._scaled_mm(a, wt, scale_a=asc[:, None],
                                                                       scale_b=wsc[None, :],
                                                                       out_dtype=torch.bfloat16), 1) * 1e6
            row["vs_scaled_mm"] = round(row["scaled_mm_us"] / row["fp8_us"], 3)
        except (RuntimeError, AttributeError) as e:
            row["scaled_mm_us"], row["vs_scaled_mm"] = None, f"n/a ({str(e)[:60]})"
        row["vs_bf16"] = round(row["bf16_us"] / row["fp8_us"], 3)
        y = fp8_gemm(a[:64], asc[:64], qw, wsc, out_dtype=torch.bfloat16)
        want = (a[:64].double() * asc[:64, None].double()) @ (qw.double() * wsc[:, None].double()).T
        row["err"] = rel(y, want)
        row["status"] = "ok" if row["err"] < 1e-2 else "FAILED"
        rows.append(row)
        print(row, flush=True)
    cols = ["M", "K", "N", "family", "bf16_us", "scaled_mm_us", "fp8_us", "w4a8_us", "quant_us", "vs_scaled_mm",
            "vs_bf16",
            "err", "status"]
    write_results(f"fp8_cuda_{gpu.replace(' ', '_')}", rows, cols, args.out,
                  note=f"{gpu}. velodiff::fp8_gemm (e4m3 x e4m3, per-row scales, bf16 out) vs torch._scaled_mm "
                       "(cuBLASLt FP8, row-wise scales) and a bf16 matmul; median of CUDA-event-timed batches.")


if __name__ == "__main__":
    main()
