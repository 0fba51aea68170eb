"""Quantized GEMM on the GPU: velodiff::qgemm (W4A4 and W8A8, rank-32 low-rank branch, bias) and
velodiff::quantize_act against a bf16 matmul (cuBLAS), at the linear-layer shapes of SD 1.5, SDXL and PixArt.

Per shape (M tokens, K in, N out):
  bf16_us     torch.matmul(x, W^T) in bf16 (cuBLAS), the baseline
  int8mm_us   torch._int_mm (cuBLASLt int8, no scales): the int8 tensor-core ceiling, when torch has it
  q4_us/q8_us velodiff::qgemm alone (bits 4 / 8): int GEMM + per-group scales + rank-32 up projection + bias
  qa4_us/...  velodiff::quantize_act alone (smoothing, per-group quantization, fused rank-32 down projection)
  ratio4/8    bf16_us / q_us (> 1: the quantized GEMM is faster); e2e4/8 the same with quantize_act included
  tops4/8     2 M N K / q_us, in tera-operations per second
  err4/err8   relative error of qgemm against the float64 reference on the first rows (bf16 output rounding
              gives about 1e-3; above 1e-2 the row is marked FAILED and the timings mean nothing)
  q4_<path>_us, err4_<path>  the 4-bit GEMM on each tensor-core path this GPU has (VELODIFF_QGEMM_TC: s4 below
              sm_90, s8 = 4-bit storage on INT8 tensor cores, e4m3 = on FP8 tensor cores from sm_89 on,
              wgmma-s8 / wgmma-e4m3 = the same on Hopper's warpgroup MMA, sm_90 with a 90a build, with CTAs of
              64 rows (two per SM) or, suffix -128, 128 rows);
              best4 names the fastest per shape. q4_us is the default path (auto).
Times are medians of CUDA-event-timed batches, launched behind a GPU sleep so that host overhead stays out;
inputs rotate over several sets when one set fits in L2. Usage:
  python bench/bench_qgemm_cuda.py [--out bench/results] [--quick]
Writes <out>/qgemm_cuda_<gpu>.json and .md.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

# (K, N) of the linear layers in the transformer blocks (attention projections, feed-forward in/out).
FAMILIES = {
    "sd15": [(320, 320), (320, 1280), (1280, 320), (640, 640), (640, 2560), (1280, 1280), (1280, 5120),
             (5120, 1280)],
    "sdxl": [(640, 640), (1280, 1280), (1280, 5120), (5120, 1280), (2048, 1280)],
    "pixart": [(1152, 1152), (1152, 4608), (4608, 1152)],
}
TOKENS = [1024, 4096, 8192]  # e.g. SD 1.5 at 512 px: 64x64 latent tokens, x2 for classifier-free guidance
RANK = 32


def shapes(quick: bool):
    fam = {}
    for name, kns in FAMILIES.items():
        for kn in kns:
            fam.setdefault(kn, []).append(name)
    kns = sorted(fam)
    tokens = TOKENS
    if quick:
        kns = [(1280, 1280), (1280, 5120), (5120, 1280)]
        tokens = [4096]
    return [(m, k, n, "+".join(fam.get((k, n), []))) for m in tokens for (k, n) in kns]


def gpu_time(fn, sets: int, reps: int = 20, batches: int = 7) -> float:
    """Median seconds per call. Each batch: a GPU sleep (so the host queues the calls ahead), then `reps`
    calls cycling over the input sets, timed with CUDA events."""
    for i in range(3):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        start.record()
        for i in range(reps):
            fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def quantize_weight(w: torch.Tensor, bits: int, ref):
    codes, scales = ref.quantize_groups(w.float(), bits)
    return ref.pack_codes(codes, bits), scales.to(w.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tensor_paths() -> list[str]:
    """The 4-bit tensor-core paths (VELODIFF_QGEMM_TC values) this GPU can run."""
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    paths = [p for p, ok in (("s4", cc < 90), ("s8", True), ("e4m3", cc >= 89)) if ok]
    if cc == 90:
        from velodiff import _C
        if "90a" in str(_C.build_info().get("cuda_archs", "")):  # the wgmma kernels exist only in sm_90a code
            paths += ["wgmma-s8", "wgmma-e4m3", "wgmma-s8-128", "wgmma-e4m3-128"]
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="three shapes at M=4096 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_qgemm_cuda: no CUDA device; nothing to measure (this benchmark is GPU-only)")
        return
    from velodiff.ops import _native
    from velodiff.ops import reference as ref
    if not _native.native_available() or not hasattr(torch.ops.velodiff, "qgemm"):
        print("bench_qgemm_cuda: velodiff's native extension is not importable; build it first "
              "(pip install --no-build-isolation .)")
        return
    from velodiff import _C
    if not _C.build_info().get("cuda", False):
        print("bench_qgemm_cuda: velodiff was built without CUDA kernels; nothing to measure")
        return
    ops = torch.ops.velodiff
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    has_int_mm = hasattr(torch, "_int_mm")
    bf = torch.bfloat16
    rows = []
    failed = False
    paths = tensor_paths()
    env_before = os.environ.get("VELODIFF_QGEMM_TC")
    os.environ.pop("VELODIFF_QGEMM_TC", None)  # the default path first
    for m, k, n, family in shapes(args.quick):
        g = torch.Generator(device=dev).manual_seed(m * 7 + k * 3 + n)
        kp = (k + 63) // 64 * 64
        per_set = m * k * 2 + n * k * 2 + m * n * 2 + m * kp + n * kp  # bytes touched, roughly
        nsets = max(1, min(8, math.ceil(2 * l2 / per_set)))
        sets = []
        for _ in range(nsets):
            x = torch.randn(m, k, device=dev, dtype=bf, generator=g)
            w = torch.randn(n, k, device=dev, dtype=bf, generator=g) / math.sqrt(k)
            smooth = torch.rand(k, device=dev, generator=g) + 0.5
            lora_down = torch.randn(k, RANK, device=dev, dtype=bf, generator=g) / math.sqrt(k)
            lora_up = torch.randn(n, RANK, device=dev, dtype=bf, generator=g) / math.sqrt(RANK)
            bias = torch.randn(n, device=dev, dtype=bf, generator=g)
            s = {"x": x, "wt": w.t(), "smooth": smooth, "ld": lora_down, "lu": lora_up, "bias": bias}
            for bits in (4, 8):
                s[f"qw{bits}"], s[f"ws{bits}"] = quantize_weight(w, bits, ref)
                s[f"qx{bits}"], s[f"as{bits}"], s[f"la{bits}"] = ops.quantize_act(x, smooth, lora_down, bits)
            if has_int_mm:
                s["x8"] = s["qx8"][:, :k].contiguous() if k % 8 == 0 else None
                s["w8t"] = s["qw8"][:, :k].t() if k % 8 == 0 else None
            sets.append(s)
        row = {"M": m, "K": k, "N": n, "models": family, "sets": nsets}

        # Correctness on the first rows against the float64 reference (and bit-exact codes for quantize_act).
        s0, nr = sets[0], min(m, 64)
        for bits in (4, 8):
            y = ops.qgemm(s0[f"qx{bits}"], s0[f"as{bits}"], s0[f"qw{bits}"], s0[f"ws{bits}"], s0["bias"],
                          s0[f"la{bits}"], s0["lu"], None, bits, 0)
            yr = ref.qgemm(s0[f"qx{bits}"][:nr], s0[f"as{bits}"][:nr], s0[f"qw{bits}"], s0[f"ws{bits}"],
                           s0["bias"], s0[f"la{bits}"][:nr], s0["lu"], None, bits, 0)
            qr, ar, lr = ref.quantize_act(s0["x"][:nr], s0["smooth"], s0["ld"], bits)
            err = rel(y[:nr], yr)
            if bits == 4:
                yr4 = yr
            exact = torch.equal(qr, s0[f"qx{bits}"][:nr]) and torch.equal(ar, s0[f"as{bits}"][:nr])
            row[f"err{bits}"] = err
            row[f"qa{bits}_exact"] = exact
            row[f"lora_err{bits}"] = rel(s0[f"la{bits}"][:nr], lr)
            if err > 1e-2 or not exact or row[f"lora_err{bits}"] > 1e-4:
                failed = True
                row["status"] = "FAILED"

        bf_t = gpu_time(lambda i: torch.matmul(sets[i]["x"], sets[i]["wt"]), nsets)
        row["bf16_us"] = bf_t * 1e6
        row["bf16_tflops"] = 2 * m * n * k / bf_t / 1e12
        if has_int_mm and sets[0].get("x8") is not None:
            try:
                t = gpu_time(lambda i: torch._int_mm(sets[i]["x8"], sets[i]["w8t"]), nsets)
                row["int8mm_us"] = t * 1e6
            except RuntimeError as exc:  # shape constraints of cuBLASLt int8
                print("  torch._int_mm unavailable at this shape:", str(exc).splitlines()[0])
        for bits in (4, 8):
            tq = gpu_time(lambda i: ops.qgemm(sets[i][f"qx{bits}"], sets[i][f"as{bits}"], sets[i][f"qw{bits}"],
                                              sets[i][f"ws{bits}"], sets[i]["bias"], sets[i][f"la{bits}"],
                                              sets[i]["lu"], None, bits, 0), nsets)
            ta = gpu_time(lambda i: ops.quantize_act(sets[i]["x"], sets[i]["smooth"], sets[i]["ld"], bits), nsets)
            row[f"q{bits}_us"] = tq * 1e6
            row[f"qa{bits}_us"] = ta * 1e6
            row[f"ratio{bits}"] = bf_t / tq
            row[f"e2e{bits}"] = bf_t / (tq + ta)
            row[f"tops{bits}"] = 2 * m * n * k / tq / 1e12
        best = None
        for tc in paths:
            os.environ["VELODIFF_QGEMM_TC"] = tc
            y = ops.qgemm(s0["qx4"], s0["as4"], s0["qw4"], s0["ws4"], s0["bias"], s0["la4"], s0["lu"], None, 4, 0)
            row[f"err4_{tc}"] = err = rel(y[:nr], yr4)
            if err > 1e-2:
                failed = True
                row["status"] = "FAILED"
            t = gpu_time(lambda i: ops.qgemm(sets[i]["qx4"], sets[i]["as4"], sets[i]["qw4"], sets[i]["ws4"],
                                             sets[i]["bias"], sets[i]["la4"], sets[i]["lu"], None, 4, 0), nsets)
            row[f"q4_{tc}_us"] = t * 1e6
            if best is None or t < best[1]:
                best = (tc, t)
        os.environ.pop("VELODIFF_QGEMM_TC", None)
        row["best4"] = best[0]
        rows.append(row)
        print({c: (round(v, 4) if isinstance(v, float) else v) for c, v in row.items()}, flush=True)
        sets = s0 = None  # free the GPU buffers before the next shape
        torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name(0)
    tag = gpu.replace(" ", "_").replace("/", "_")
    cols = ["M", "K", "N", "models", "bf16_us", "bf16_tflops", "int8mm_us", "q4_us", "qa4_us", "ratio4", "e2e4",
            "tops4", "q8_us", "qa8_us", "ratio8", "e2e8", "tops8", "err4", "err8"]
    cols += [f"q4_{tc}_us" for tc in paths] + ["best4"] + [f"err4_{tc}" for tc in paths] + ["status"]
    note = (f"GPU {gpu} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), torch "
            f"{torch.__version__}, CUDA {torch.version.cuda}. velodiff::qgemm with bias and a rank-{RANK} low-rank "
            "branch, bf16 model dtype; ratio = bf16_us / q_us, e2e = bf16_us / (q_us + qa_us) (> 1: faster than "
            "cuBLAS bf16); tops = 2MNK / q_us. err = relative error against the float64 reference (first 64 rows).")
    wins = {tc: sum(r["best4"] == tc for r in rows) for tc in paths}
    note += (" 4-bit tensor-core paths measured: " + ", ".join(paths) + "; fastest per shape: "
             + ", ".join(f"{tc} {w}/{len(rows)}" for tc, w in wins.items()) + ".")
    big = [r for r in rows if r["M"] >= 4096]
    if big:  # the H100 goal: >= 1.5x cuBLAS bf16 for M >= 4096
        gm = {key: math.exp(sum(math.log(r[key]) for r in big) / len(big)) for key in ("ratio4", "e2e4", "ratio8")}
        note += (f" Geometric means over the {len(big)} shapes with M >= 4096: ratio4 {gm['ratio4']:.2f}, "
                 f"e2e4 {gm['e2e4']:.2f}, ratio8 {gm['ratio8']:.2f}.")
        print("bench_qgemm_cuda: geometric means for M >= 4096:", {k: round(v, 3) for k, v in gm.items()})
    path = write_results(f"qgemm_cuda_{tag}", rows, cols, args.out, note=note)
    print("wrote", path)
    print("bench_qgemm_cuda: fastest 4-bit path per shape:", wins)
    if env_before is not None:
        os.environ["VELODIFF_QGEMM_TC"] = env_before
    if failed:
        print("bench_qgemm_cuda: some shapes FAILED the correctness check (see the status column)")
        sys.exit(1)


if __name__ == "__main__":
    main()
