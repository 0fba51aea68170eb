"""CPU microbenchmark of the FP8 GEMM at the linear-layer shapes of SD 1.5, SDXL and PixArt (issue 15).

On a CPU, FP8 is a storage format: no x86 instruction multiplies FP8, so velodiff::fp8_gemm decodes the codes
(exactly) to bfloat16 and runs AVX-512 BF16 dot products (vdpbf16ps) with fp32 accumulation, or float32 FMAs on the
portable path (csrc/kernels/cpu/fp8.cpp). Per shape (bench_qgemm_cpu.py's SHAPES), timed interleaved with
bench/common.py's ``compare``:

  fp32          F.linear in fp32 (torch's MKL / oneDNN GEMM): the baseline
  bf16          F.linear in bf16 (oneDNN's AVX-512 BF16 GEMM, weights and activations in bf16)
  fp8_gemm      velodiff::fp8_gemm on pre-quantized activations (e4m3 x e4m3, fp32 output)
  fp8_layer     quantize_fp8 (per token) + fp8_gemm: what Fp8Linear runs in W8A8 mode
  fp8_wo        Fp8Linear's weight-only mode: decode the weight to bf16, then F.linear in bf16

Ratios: fp32's time / the candidate's, per round, median (min-max) over the rounds; > 1: faster than fp32.
Writes bench/results/fp8_cpu.{json,md}.

  python bench/bench_fp8_cpu.py [--threads N] [--rounds 3] [--quick]
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_qgemm_cpu import QUICK, SHAPES  # noqa: E402
from common import check_ranges, compare, load_average, summarise_ratios, write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import velodiff  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.ops import fp8_gemm, quantize_fp8  # noqa: E402

CANDIDATES = ("bf16", "fp8_gemm", "fp8_layer", "fp8_wo")


def candidates(m, k, n, gen):
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    bias = torch.randn(n, generator=gen) * 0.1
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    qw, ws = quantize_fp8(w)
    qx, xs = quantize_fp8(x)

    def layer():
        a, s = quantize_fp8(x)
        return fp8_gemm(a, s, qw, ws, bias, out_dtype=torch.float32)

    def weight_only():
        return F.linear(xb, (qw.float() * ws[:, None]).bfloat16(), bb)

    return {"fp32": lambda: F.linear(x, w, bias), "bf16": lambda: F.linear(xb, wb, bb),
            "fp8_gemm": lambda: fp8_gemm(qx, xs, qw, ws, bias, out_dtype=torch.float32), "fp8_layer": layer,
            "fp8_wo": weight_only}


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    check_ranges("bench_fp8_cpu.py", (("--threads", args.threads, 1, os.cpu_count() or 1),
                                      ("--rounds", args.rounds, 1, 100)))
    torch.set_num_threads(args.threads)
    load_start, rows, timings = load_average(), [], {}
    path = velodiff.info()["cpu_kernel_paths"].get("fp8_gemm", "?")
    gen = torch.Generator().manual_seed(0)
    for model, layer, m, k, n in SHAPES:
        if args.quick and (model, layer) not in QUICK:
            continue
        with torch.inference_mode():
            res = compare(candidates(m, k, n, gen), "fp32", rounds=args.rounds, warmup=2)
        timings[f"{model} {layer}"] = res.to_json()
        row = {"model": model, "layer": layer, "M": m, "K": k, "N": n, "fp32_ms": res.stats("fp32", 1e3)}
        for c in CANDIDATES:
            row[f"{c}_ms"] = res.stats(c, 1e3)
            row[f"{c}_vs_fp32"] = res.ratio(c)
        row["fp8_gemm_gflops"] = round(2 * m * k * n / (1e6 * row["fp8_gemm_ms"]["median"]), 1)
        rows.append(row)
        print({c: (v["median"] if isinstance(v, dict) else v) for c, v in row.items()}, flush=True)
    summary = {}
    for c in CANDIDATES:
        s = summarise_ratios({f"{r['model']} {r['layer']}": r[f"{c}_vs_fp32"]["median"] for r in rows})
        s["median_of_rows"] = statistics.median(r[f"{c}_vs_fp32"]["median"] for r in rows)
        summary[f"{c}_vs_fp32"] = s
    sentences = " ".join(f"{c}: {v['sentence']}, median of rows {v['median_of_rows']:.3g}x." for c, v in summary.items())
    cols = ["model", "layer", "M", "K", "N", "fp32_ms"] + [f"{c}_{x}" for c in CANDIDATES for x in ("ms", "vs_fp32")] \
        + ["fp8_gemm_gflops"]
    note = (f"{args.threads} threads; fp8_gemm path {path}. Each cell is median (min-max) over {args.rounds} "
            "interleaved rounds (all candidates once per round, order rotated, >= 50 ms per timing); *_vs_fp32: "
            "fp32's time / the candidate's within each round. Summary over rows: " + sentences)
    write_results("fp8_cpu", rows, cols, args.out, note=note,
                  extra={"fp8_gemm_path": path, "load_start": load_start, "load_end": load_average(),
                         "rounds": args.rounds, "threads": args.threads, "summary": summary, "timing": timings})
    print(sentences)


if __name__ == "__main__":
    main()
