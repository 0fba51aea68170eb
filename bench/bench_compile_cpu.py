"""torch.compile (inductor's CPU backend) as a technique against velodiff's CPU default, one SD 1.5 UNet step (issue 14).

Full-size SD 1.5 UNet, random weights shared by all, batch 2, 32x32 latent (256 px), bf16, inference mode:

  diffusers bf16            diffusers' UNet cast to bf16 (eager)
  diffusers_compiled bf16   the same after unet.to(channels_last) and torch.compile (inductor, default mode; with
                            freezing, torch._inductor.config.freezing = True, as inductor's CPU docs advise for
                            inference), timed after its compilation
  velodiff bf16             what Pipeline.from_pretrained loads on the CPU (fastest_cpu_layout, eager)
  velodiff_compiled bf16    our UNet in the plain channels-last layout (inductor packs weights itself) after
                            torch.compile, the same settings

One process, rounds interleaved after a warm-up call each (the warm-up of a compiled model is its compilation,
reported as compile_s). Ratios: diffusers bf16's time over each, per round, median (min-max).

  python bench/bench_compile_cpu.py [--rounds 3] [--out bench/results]
Writes <out>/compile_cpu.{md,json}.
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_engines import time_engines  # noqa: E402
from bench_unet import SD15, build_pair, diffusers_twin, inputs, share_weights  # noqa: E402
from common import load_average, write_results  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402
from velodiff.models.conv_prepack import fastest_cpu_layout  # noqa: E402

BASELINE = "diffusers bf16"


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    if not 1 <= args.rounds <= 100:
        print(f"bench_compile_cpu.py: --rounds: must be from 1 to 100, got {args.rounds}", file=sys.stderr)
        sys.exit(2)
    load_start = load_average()
    theirs, _ = build_pair(SD15)
    x, t, ctx, _ = inputs(SD15, 2, 32)
    xb, ctxb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    xb_cl = xb.contiguous(memory_format=torch.channels_last)
    eager = diffusers_twin(theirs).to(torch.bfloat16)
    del theirs
    compiled_src = diffusers_twin(eager).to(memory_format=torch.channels_last)
    ours = share_weights(eager)
    fastest_cpu_layout(ours, torch.bfloat16)
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    compiled = torch.compile(compiled_src)
    ours_compiled = torch.compile(share_weights(eager).to(memory_format=torch.channels_last))
    engines = {BASELINE: lambda: eager(xb, t, ctxb).sample,
               "diffusers_compiled bf16": lambda: compiled(xb_cl, t, ctxb).sample,
               "velodiff bf16": lambda: ours(xb_cl, t, ctxb),
               "velodiff_compiled bf16": lambda: ours_compiled(xb_cl, t, ctxb)}
    compile_s = {}
    with torch.inference_mode():
        for name in ("diffusers_compiled bf16", "velodiff_compiled bf16"):
            t0 = time.perf_counter()
            engines[name]()
            compile_s[name] = round(time.perf_counter() - t0, 1)
        print(f"compiled in {compile_s} s", flush=True)
        rows, res = time_engines(engines, BASELINE, args.rounds)
    note = (f"One SD 1.5 UNet forward in bf16, random weights, 256 px, batch 2, {torch.get_num_threads()} threads; "
            f"median (min-max) over {args.rounds} interleaved rounds. torch.compile: inductor, default mode, "
            f"freezing on, channels-last; compilation took {compile_s} s (not in the timings). rel_err: against "
            "eager diffusers bf16 (bf16 rounding differs between the engines).")
    path = write_results("compile_cpu", rows, ["engine", "precision", "s", "x_diffusers_bf16",
                                               "rel_err_vs_diffusers_bf16"], args.out, note=note,
                         extra={"compile_s": compile_s, "load_start": load_start, "load_end": load_average(),
                                "rounds": args.rounds, "timing": res.to_json()})
    print("wrote", path)


if __name__ == "__main__":
    main()
