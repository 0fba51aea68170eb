"""CPU microbenchmark of the quantized GEMMs at the linear-layer shapes of SD 1.5, SDXL and PixArt.

For each (model, layer, M tokens, K, N), two baselines:
  fp32       torch's F.linear in fp32 (the CPU model dtype; MKL/oneDNN)
  int8_dyn   torch's own int8 path: ``torch.ao.quantization.quantize_dynamic(nn.Sequential(linear),
             {nn.Linear}, dtype=torch.qint8)``, i.e. a DynamicQuantizedLinear (int8 weights per tensor,
             activations quantized per call, fbgemm/x86 int8 GEMM): the whole layer
against velodiff's W4A4 (rank-32 low-rank branch, the SVDQuant layer) and W8A8, each timed as the GEMM alone
(``velodiff::qgemm`` on pre-quantized activations) and as the whole layer (``quantize_act`` + ``qgemm``, what a
QuantizedLinear runs). All six are timed interleaved with bench/common.py's ``compare`` (rounds, rotated
order, >= 50 ms per timing); every ratio is taken within a round and reported as median (min-max) over the
rounds. Ratios > 1 mean velodiff is faster. Sanity column: a whole layer does strictly more work than its GEMM,
so a layer measured faster than its GEMM in every round flags the row (noise or a measurement error). Where the
qgemm path is AVX-512VNNI, each whole layer is also timed on the AVX2 path (VELODIFF_CPU_ISA=avx2, same bits):
*_layer_vnni_vs_avx2.
Writes bench/results/qgemm_cpu.{json,md}.

  python bench/bench_qgemm_cpu.py [--threads 2] [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import velodiff  # noqa: E402
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


def torch_int8_dynamic(w: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    """torch's dynamic int8 linear over ``w`` and ``bias`` (quantize_dynamic's defaults, as a user writes it)."""
    from torch.ao.quantization import quantize_dynamic

    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0].eval()


def on_avx2(fn):
    """``fn`` run with the kernels capped at AVX2 (read by the ops at every call)."""
    def run():
        old = os.environ.get("VELODIFF_CPU_ISA")
        os.environ["VELODIFF_CPU_ISA"] = "avx2"
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["VELODIFF_CPU_ISA"]
            else:
                os.environ["VELODIFF_CPU_ISA"] = old
    return run


def layer_vs_gemm(res, label: str) -> str:
    """'ok' when the whole layer is slower than its GEMM alone (median of per-round ratios), 'ok (noise)' when
    it is faster in some rounds only, 'VIOLATED' when faster in every round (which the work makes impossible)."""
    r = res.ratio(f"{label}_layer", over=f"{label}_gemm")  # > 1: layer faster than GEMM
    if r["min"] > 1.0:
        return "VIOLATED"
    return "ok (noise)" if r["median"] > 1.0 else "ok"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="three shapes only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    rows, timings = [], {}
    paths = velodiff.info()["cpu_kernel_paths"]
    vnni = paths["qgemm"] == "avx512vnni"
    gen = torch.Generator().manual_seed(0)
    for model, layer, m, k, n in SHAPES:
        if args.quick and (model, layer) not in QUICK:
            continue
        row = {"model": model, "layer": layer, "M": m, "K": k, "N": n}
        x, w, bias, *_ = operands(m, k, n, 4, 0, gen)
        int8_layer = torch_int8_dynamic(w, bias)
        candidates = {"fp32": lambda x=x, w=w, bias=bias: F.linear(x, w, bias),
                      "int8_dyn": lambda x=x, q=int8_layer: q(x)}
        for bits, rank, label in ((4, args.rank, "w4a4"), (8, 0, "w8a8")):
            xq, _, _, qw, wscales, smooth, down, up = operands(m, k, n, bits, rank, gen)
            qx, ascales, lora_act = quantize_act(xq, smooth, down, bits=bits)
            la = lora_act if rank else None

            def gemm(qx=qx, ascales=ascales, qw=qw, wscales=wscales, bias=bias, la=la, up=up, bits=bits):
                return qgemm(qx, ascales, qw, wscales, bias, la, up, None, bits=bits)

            def layer_call(xq=xq, smooth=smooth, down=down, qw=qw, wscales=wscales, bias=bias, up=up, bits=bits,
                           rank=rank):
                qx2, as2, la2 = quantize_act(xq, smooth, down, bits=bits)
                return qgemm(qx2, as2, qw, wscales, bias, la2 if rank else None, up, None, bits=bits)

            candidates[f"{label}_gemm"], candidates[f"{label}_layer"] = gemm, layer_call
            if vnni:
                candidates[f"{label}_layer_avx2"] = on_avx2(layer_call)
        with torch.inference_mode():
            res = compare(candidates, "fp32", rounds=args.rounds, warmup=2)
        timings[f"{model} {layer}"] = res.to_json()
        row["fp32_ms"] = res.stats("fp32", 1e3)
        row["int8_dyn_ms"] = res.stats("int8_dyn", 1e3)
        row["int8_dyn_vs_fp32"] = res.ratio("int8_dyn")
        for label in ("w4a4", "w8a8"):
            for part in ("gemm", "layer"):
                row[f"{label}_{part}_ms"] = res.stats(f"{label}_{part}", 1e3)
                row[f"{label}_{part}_vs_fp32"] = res.ratio(f"{label}_{part}")
                row[f"{label}_{part}_vs_int8"] = res.ratio(f"{label}_{part}", over="int8_dyn")
            row[f"{label}_layer>=gemm"] = layer_vs_gemm(res, label)
            if vnni:
                row[f"{label}_layer_vnni_vs_avx2"] = res.ratio(f"{label}_layer", over=f"{label}_layer_avx2")
        row["w4a4_gops"] = round(2 * m * k * n / (1e6 * row["w4a4_gemm_ms"]["median"]), 1)
        rows.append(row)
        print({c: (v["median"] if isinstance(v, dict) else v) for c, v in row.items()}, flush=True)
    load_end = load_average()

    def over_rows(col):
        return summarise_ratios({f"{r['model']} {r['layer']}": r[col]["median"] for r in rows})

    summary = {c: over_rows(c) for c in ("w4a4_gemm_vs_fp32", "w4a4_layer_vs_fp32", "w4a4_layer_vs_int8",
                                          "w8a8_layer_vs_fp32", "w8a8_layer_vs_int8", "int8_dyn_vs_fp32")
               + (("w4a4_layer_vnni_vs_avx2", "w8a8_layer_vnni_vs_avx2") if vnni else ())}
    for c in list(summary):
        summary[c]["median_of_rows"] = statistics.median(r[c]["median"] for r in rows)
    violations = [f"{r['model']} {r['layer']} ({lab})" for r in rows for lab in ("w4a4", "w8a8")
                  if r[f"{lab}_layer>=gemm"] == "VIOLATED"]
    sentences = " ".join(f"{c}: {v['sentence']}, median of rows {v['median_of_rows']:.3g}x."
                         for c, v in summary.items())
    cols = ["model", "layer", "M", "K", "N", "fp32_ms", "int8_dyn_ms", "int8_dyn_vs_fp32", "w4a4_gemm_ms",
            "w4a4_gemm_vs_fp32", "w4a4_layer_ms", "w4a4_layer_vs_fp32", "w4a4_layer_vs_int8", "w4a4_layer>=gemm",
            "w8a8_gemm_ms", "w8a8_gemm_vs_fp32", "w8a8_layer_ms", "w8a8_layer_vs_fp32", "w8a8_layer_vs_int8",
            "w8a8_layer>=gemm", "w4a4_gops"] + (["w4a4_layer_vnni_vs_avx2", "w8a8_layer_vnni_vs_avx2"] if vnni else [])
    note = (f"{args.threads} threads; qgemm path {paths['qgemm']}. Baselines: fp32 = F.linear (torch's MKL/oneDNN GEMM); int8_dyn = torch's "
            "dynamic int8 linear (torch.ao.quantization.quantize_dynamic with its defaults: int8 weights per "
            "tensor, activations quantized per call; the whole layer). w4a4: velodiff::qgemm with a "
            f"rank-{args.rank} low-rank branch and bias; w8a8: velodiff's 8-bit path; *_gemm: the GEMM alone on "
            "pre-quantized activations; *_layer: quantize_act (smoothing + down-projection) + qgemm, what "
            "QuantizedLinear runs. Each cell is median (min-max) over "
            f"{args.rounds} interleaved rounds (all candidates once per round, order rotated, >= 50 ms per "
            "timing). *_vs_fp32 / *_vs_int8: the baseline's time / velodiff's time within each round, then median "
            "(min-max) over the rounds; > 1 means velodiff is faster. *_layer>=gemm: 'ok' if the whole layer is "
            "slower than its GEMM alone (median over rounds), 'ok (noise)' if faster in some rounds only, "
            "'VIOLATED' if faster in every round. Summary over rows: " + sentences
            + (" Rows flagged: " + ", ".join(violations) + "." if violations else " No row flagged."))
    write_results("qgemm_cpu", rows, cols, args.out, note=note,
                  extra={"cpu_kernel_paths": paths, "load_start": load_start, "load_end": load_end, "rounds": args.rounds,
                         "threads": args.threads, "summary": summary, "flagged": violations, "timing": timings})
    print(sentences)
    print("flagged:", violations)


if __name__ == "__main__":
    main()
