"""Where one SD 1.5 UNet step spends its time on this CPU: velodiff against OpenVINO, by kind of operation (issue 14).

The same random weights and inputs as bench_cpu_engines.py (256 px, batch 2). Each engine runs ``--steps`` profiled
forwards after a warm-up:

  velodiff fp32 / bf16    what from_pretrained loads on the CPU (fastest_cpu_layout), under torch.profiler: the
                          self CPU time of every op, summed per kind
  openvino fp32 / bf16    the compiled model with PERF_COUNT on: the real time of every executed node
                          (request.profiling_info), summed per kind of node

Kinds: conv (convolutions), gemm (linear layers and matrix products outside attention), attention (the attention
op, or its softmax and batched products), norm (group / layer norms), elementwise (activations, adds, scales),
layout (copies, reorders, transposes, concatenations, pads), other. Times are ms per step, summed over the two
threads' work as each profiler counts it (torch: self CPU time of the calling thread, which waits for its pool;
OpenVINO: per-node real time), so each kind's share is what to compare; the wall time per step is measured
beside them.

  python bench/profile_cpu_engines.py [--steps 3] [--threads N] [--out bench/results]
Writes <out>/profile_cpu_engines.{md,json}.
"""
from __future__ import annotations

import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import SD15, build_pair, diffusers_twin, inputs, share_weights  # noqa: E402
from common import check_ranges, load_average, write_results  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402
from velodiff.models.conv_prepack import fastest_cpu_layout  # noqa: E402

KINDS = ("conv", "gemm", "attention", "norm", "elementwise", "layout", "other")
# substrings of torch op names / OpenVINO node types, tried in this order
TORCH_KINDS = (("attention", ("velodiff::attention", "scaled_dot_product", "_softmax", "softmax", "bmm", "baddbmm")),
               ("conv", ("convolution", "conv2d", "mkldnn_conv")),
               ("gemm", ("addmm", "linear", "::mm", "matmul", "qgemm", "quantize_act")),
               ("norm", ("group_norm", "layer_norm", "native_group_norm")),
               ("layout", ("copy_", "contiguous", "clone", "cat", "permute", "transpose", "to_dense", "reorder",
                           "pad", "_to_copy", "empty")),
               ("elementwise", ("add", "mul", "silu", "gelu", "div", "sub", "exp", "sin", "cos", "neg", "sigmoid",
                                "chunk", "where", "rsqrt", "pow", "mean", "sum", "sqrt")))
OV_KINDS = (("attention", ("scaleddotproductattention", "softmax", "mha")),
            ("conv", ("convolution",)),
            ("gemm", ("fullyconnected", "matmul", "gemm")),
            ("norm", ("mvn", "groupnormalization", "normalize", "layernorm", "rms")),
            ("layout", ("reorder", "transpose", "reshape", "concat", "split", "gather", "broadcast", "pad",
                        "convert", "strided", "slice", "squeeze", "unsqueeze", "tile")),
            ("elementwise", ("eltwise", "add", "multiply", "subtract", "divide", "swish", "gelu", "sigmoid", "power",
                             "sin", "cos", "exp", "sqrt", "reduce", "mish", "clamp", "erf")))


def kind_of(name: str, table) -> str:
    low = name.lower()
    for kind, keys in table:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile_torch(fn, steps: int):
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        wall = (time.perf_counter() - t0) / steps
    per_kind = defaultdict(float)
    top = defaultdict(float)
    for ev in prof.key_averages():
        ms = ev.self_cpu_time_total / 1e3 / steps
        per_kind[kind_of(ev.key, TORCH_KINDS)] += ms
        top[ev.key] += ms
    return wall, per_kind, top


def profile_openvino(compiled_run, request, steps: int):
    compiled_run()
    per_kind, top = defaultdict(float), defaultdict(float)
    t0 = time.perf_counter()
    for _ in range(steps):
        compiled_run()
        for info in request.profiling_info:
            ms = info.real_time.total_seconds() * 1e3
            per_kind[kind_of(info.node_type, OV_KINDS)] += ms / steps
            top[f"{info.node_type} ({info.exec_type})"] += ms / steps
    wall = (time.perf_counter() - t0) / steps
    return wall, per_kind, top


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    check_ranges("profile_cpu_engines.py", (("--steps", args.steps, 1, 100),
                                            ("--threads", args.threads, 1, os.cpu_count() or 1)))
    torch.set_num_threads(args.threads)
    load_start = load_average()
    theirs, _ = build_pair(SD15)
    x, t, ctx, _ = inputs(SD15, 2, 32)
    results = {}
    import openvino as ov
    core = ov.Core()

    class Wrapped(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    with torch.no_grad():
        model = ov.convert_model(Wrapped(theirs), example_input=(x, t, ctx))
    feeds = [x.numpy(), t.numpy(), ctx.numpy()]
    for precision in ("fp32", "bf16"):
        hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERF_COUNT": "YES",
                                                    "INFERENCE_NUM_THREADS": args.threads}).create_infer_request()
        results[f"openvino {precision}"] = profile_openvino(lambda r=request: r.infer(feeds), request, args.steps)
        del request
    del model
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        src = theirs if dtype == torch.float32 else diffusers_twin(theirs).to(dtype)
        ours = share_weights(src)
        fastest_cpu_layout(ours, dtype)
        xs = x.to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            results[f"velodiff {precision}"] = profile_torch(lambda m=ours, a=xs, c=ctx.to(dtype): m(a, t, c),
                                                             args.steps)
        del ours
    rows = []
    for name, (wall, per_kind, top) in results.items():
        total = sum(per_kind.values())
        row = {"engine": name, "wall_ms": round(wall * 1e3, 1), "profiled_ms": round(total, 1)}
        for k in KINDS:
            row[f"{k}_ms"] = round(per_kind.get(k, 0.0), 1)
            row[f"{k}_%"] = round(100 * per_kind.get(k, 0.0) / total, 1) if total else 0.0
        row["top_ops"] = "; ".join(f"{k} {v:.0f}" for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:6])
        rows.append(row)
        print({k: v for k, v in row.items() if k != "top_ops"}, flush=True)
    cols = ["engine", "wall_ms", "profiled_ms"] + [f"{k}_ms" for k in KINDS] + [f"{k}_%" for k in KINDS] + ["top_ops"]
    note = (f"One SD 1.5 UNet step, 256 px, batch 2, random weights, {args.threads} threads, {args.steps} profiled "
            "steps after a warm-up. velodiff: torch.profiler self CPU time per op (the calling thread's time: it "
            "waits while its pool works, so a parallel op counts its wall time once); OpenVINO: PERF_COUNT real "
            "time per executed node. *_ms: per step, summed per kind; *_%: share of the profiled total. "
            "top_ops: the six largest op / node types in ms per step. wall_ms: the profiled loop's wall time per "
            "step (profiling adds a little).")
    path = write_results("profile_cpu_engines", rows, cols, args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average(), "steps": args.steps})
    print("wrote", path)


if __name__ == "__main__":
    main()
