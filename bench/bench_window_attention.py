"""velodiff::window_attention vs msw_msa's gather path at HiDiffusion's MSW-MSA shapes (SD 1.5, first attention
level: 8 heads of D 40, a 2 x 2 grid of windows, one of the reference's shifts).

All candidates take the same inputs, q / k / v as the models pass them (transposed views of [B, L, H, D]
projections, no copy), and give [B, H, L, Dv]:
  velodiff           velodiff.ops.window_attention(q, k, v, size, window, shift): windows by index arithmetic in the
                     kernel, no copy of the data
  gather+sdpa        msw_msa.window_attention(..., backend="sdpa"): index_select into [B * nW, H, Lw, D] windows,
                     torch's SDPA (a key mask when the grid does not divide the map), index_select back (the path
                     every backend but "velodiff" takes)
  gather+velodiff    the same gather path with velodiff::attention on the windows (the same arithmetic as the
                     fused op, so the difference to "velodiff" is the cost of the gathers)
Shapes (batch 2 = one CFG pair): SD 1.5 at 1024 x 1024 (a 128 x 128 map, windows 64 x 64), at 768 x 1280 (96 x 160,
windows 48 x 80), and at 1000 x 1000 (125 x 125: the grid does not divide it, windows 63 x 63 with padded edges).
Timed interleaved with bench/common.py's ``compare`` (rounds, rotated order); ratios are taken per round and given
as median (min-max) over the rounds: time(gather path) / time(velodiff), > 1 means the op is faster. Usage:
  python bench/bench_window_attention.py [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--rounds 5] [--threads N]
                                         [--only SUBSTRING] [--quick] [--out bench/results]
``--quick``: tiny shapes, one round (a smoke test of the script, not a measurement). Writes
<out>/window_attention_<cpu|GPU name>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, summarise_ratios, write_results  # noqa: E402

from velodiff.accel.highres import msw_msa  # noqa: E402
from velodiff.models import attention as models_attention  # noqa: E402
from velodiff.ops import window_attention  # noqa: E402

# name: (batch, heads, (h, w), D, grid, k of the reference's shift k/4 of the window)
SHAPES = {
    "sd15-1024px-128x128-d40": (2, 8, (128, 128), 40, (2, 2), 1),
    "sd15-768x1280px-96x160-d40": (2, 8, (96, 160), 40, (2, 2), 2),
    "sd15-1000px-125x125-padded-d40": (2, 8, (125, 125), 40, (2, 2), 3),
}
QUICK = {"quick-13x7-d40": (1, 2, (13, 7), 40, (2, 2), 1)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GATHER_VELODIFF = "bench-gather-velodiff"  # a bench-only attention backend: velodiff::attention on gathered windows


def inputs(shape, dtype, device, seed=0):
    b, h, (mh, mw), d, _, _ = shape
    g = torch.Generator().manual_seed(seed)

    def proj():  # a [B, L, H, D] projection seen as [B, H, L, D]
        return torch.randn(b, mh * mw, h, d, generator=g).to(dtype).to(device).transpose(1, 2)
    return proj(), proj(), proj()


def register_gather_velodiff():
    """msw_msa's gather path with velodiff::attention on the windows: the "velodiff" attention backend's function
    under another name (msw_msa sends backend "velodiff" itself to the fused op)."""
    if GATHER_VELODIFF not in models_attention.BACKENDS:
        base = models_attention.BACKENDS["velodiff"]
        models_attention.register_backend(models_attention.AttentionBackend(
            GATHER_VELODIFF, base.fn, base.why_not, description="bench: velodiff::attention on gathered windows"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on cpu, fp16 on cuda")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--only", default="", help="run only the shapes whose name contains this")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    register_gather_velodiff()
    dev = args.device
    dtype_name = args.dtype or ("fp32" if dev == "cpu" else "fp16")
    dtype = DTYPES[dtype_name]
    shapes = QUICK if args.quick else {n: s for n, s in SHAPES.items() if args.only in n}
    rounds = 1 if args.quick else args.rounds
    load_start = load_average()
    rows, timings = [], {}
    for name, shape in shapes.items():
        b, h, size, d, grid, k_shift = shape
        q, k, v = inputs(shape, dtype, dev)
        window = msw_msa.window_size(size, grid)
        shift = msw_msa.shift_for(k_shift, size, grid)
        candidates = {
            "velodiff": lambda: window_attention(q, k, v, size, window, shift),
            "gather+sdpa": lambda: msw_msa.window_attention(q, k, v, size, grid, shift, backend="sdpa"),
            "gather+velodiff": lambda: msw_msa.window_attention(q, k, v, size, grid, shift, backend=GATHER_VELODIFF),
        }
        with torch.no_grad():
            ours = candidates["velodiff"]().float()
            diff_sdpa = float((ours - candidates["gather+sdpa"]().float()).abs().max())
            same_bits = bool(torch.equal(ours, candidates["gather+velodiff"]().float()))
            res = compare(candidates, "gather+sdpa", rounds=rounds, warmup=2, device=dev)
        tokens = size[0] * size[1]
        # every token attends to the real tokens of its window: sum over windows of n_w^2 (q.k and p.v, 2 flops each)
        pairs = sum(len(range(y, min(y + window[0], size[0]))) ** 2 * len(range(x, min(x + window[1], size[1]))) ** 2
                    for y in range(0, size[0], window[0]) for x in range(0, size[1], window[1]))
        flops = 4.0 * b * h * pairs * d
        row = {"shape": name, "B": b, "H": h, "map": f"{size[0]}x{size[1]}", "window": f"{window[0]}x{window[1]}",
               "shift": f"{shift[0]},{shift[1]}", "D": d, "L": tokens,
               "velodiff_ms": res.stats("velodiff", 1e3), "gather+sdpa_ms": res.stats("gather+sdpa", 1e3),
               "gather+velodiff_ms": res.stats("gather+velodiff", 1e3),
               "sdpa_path/velodiff": res.ratio("velodiff", over="gather+sdpa"),
               "gather_velodiff/velodiff": res.ratio("velodiff", over="gather+velodiff"),
               "velodiff_GFLOPs": round(flops / res.stats("velodiff")["median"] / 1e9, 2),
               "max_abs_diff_sdpa": f"{diff_sdpa:.2g}", "bits_equal_gather_velodiff": same_bits}
        rows.append(row)
        timings[name] = res.to_json()
        print({k_: (v_["median"] if isinstance(v_, dict) else v_) for k_, v_ in row.items()}, flush=True)
    load_end = load_average()
    summary = summarise_ratios({r["shape"]: r["sdpa_path/velodiff"]["median"] for r in rows})
    tag = torch.cuda.get_device_name(0).replace(" ", "_") if dev.startswith("cuda") else "cpu"
    path = write_results(
        f"window_attention_{tag}{'_quick' if args.quick else ''}", rows,
        ["shape", "B", "H", "map", "window", "shift", "D", "velodiff_ms", "gather+sdpa_ms", "gather+velodiff_ms",
         "sdpa_path/velodiff", "gather_velodiff/velodiff", "velodiff_GFLOPs", "max_abs_diff_sdpa",
         "bits_equal_gather_velodiff"],
        args.out,
        note=f"MSW-MSA windowed attention, {dtype_name}, inputs as transposed [B, L, H, D] views, a 2 x 2 grid. "
             "velodiff: velodiff::window_attention (windows by index arithmetic in the kernel); gather+sdpa: "
             "msw_msa.window_attention with backend sdpa (index_select, SDPA on the windows with a key mask when "
             "padded, index_select back); gather+velodiff: the same gathers around velodiff::attention. Each cell "
             f"is median (min-max) over {rounds} interleaved rounds; ratios: the gather path's time / velodiff's "
             "within each round, median (min-max) over the rounds; > 1 means velodiff is faster. GFLOP/s counts "
             "4 B H D sum_windows n_w^2. Summary of sdpa_path/velodiff over rows: "
             f"{summary['sentence']}.",
        extra={"load_start": load_start, "load_end": load_end, "rounds": rounds, "threads": args.threads,
               "dtype": dtype_name, "summary": summary, "timing": timings})
    print(summary["sentence"])
    print("wrote", path)


if __name__ == "__main__":
    main()
