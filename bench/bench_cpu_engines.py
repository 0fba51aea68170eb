"""One SD UNet step on this CPU: velodiff against diffusers and OpenVINO, at each precision (issue 14).

Full-size SD 1.5 UNet, random weights (one set of tensors for every engine), batch 2 (one CFG pair), 77 text
tokens, inference mode. Engines (each a callable doing one UNet forward; all timed in the same interleaved rounds):

  diffusers fp32 / diffusers_cl fp32   diffusers' UNet as shipped, and after unet.to(channels_last)
  diffusers bf16                       the same weights cast to bf16
  velodiff fp32 / bf16                 our UNet as loaded (NCHW)
  velodiff_packed fp32 / bf16          what from_pretrained loads on the CPU: channels-last, oneDNN conv weights
                                       packed once, in bf16 the linear weights too (fastest_cpu_layout)
  openvino fp32 / bf16                 diffusers' UNet converted with openvino.convert_model (the conversion
                                       optimum-intel runs for its export) and compiled for this CPU with
                                       INFERENCE_PRECISION_HINT f32 or bf16

Every output's relative Frobenius error is taken against diffusers fp32 on the same inputs. Ratios: diffusers
fp32's time over the engine's, per round, median (min-max) over the rounds. OpenVINO is a bench-only dependency
(pip install openvino); without it its rows are left out and the note says so.

  python bench/bench_cpu_engines.py [--latent 32] [--batch 2] [--rounds 4] [--threads N] [--out bench/results]
Writes <out>/cpu_engines.{md,json} (other latent sizes: cpu_engines_<px>px.{md,json}).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import SD15, build_pair, diffusers_twin, inputs, share_weights  # noqa: E402
from common import compare, load_average, write_results  # noqa: E402

from velodiff.models.conv_prepack import fastest_cpu_layout  # noqa: E402

BASELINE = "diffusers fp32"


def openvino_engines(theirs, x, t, ctx):
    """{name: callable} for OpenVINO fp32 and bf16, or ({}, reason) when openvino is not installed."""
    try:
        import openvino as ov
    except ImportError as e:
        return {}, f"openvino not installed ({e})"

    class Wrapped(torch.nn.Module):  # positional inputs, a plain tensor out (what convert_model traces)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    with torch.no_grad():
        model = ov.convert_model(Wrapped(theirs), example_input=(x, t, ctx))
    core = ov.Core()
    engines = {}
    for name, hint in (("openvino fp32", "f32"), ("openvino bf16", "bf16")):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
        request = compiled.create_infer_request()
        feeds = [x.numpy(), t.numpy(), ctx.numpy()]

        def run(request=request, feeds=feeds):
            return torch.from_numpy(request.infer(feeds)[0].copy())
        engines[name] = run
    return engines, ""


def build_engines(batch: int, latent: int):
    theirs, ours = build_pair(SD15)
    x, t, ctx, _ = inputs(SD15, batch, latent)
    cl = torch.channels_last
    theirs_cl = diffusers_twin(theirs).to(memory_format=cl)
    x_cl = x.contiguous(memory_format=cl)
    theirs_bf16 = diffusers_twin(theirs).to(torch.bfloat16)
    ours_bf16 = share_weights(theirs_bf16)
    ours_packed = share_weights(theirs)
    fastest_cpu_layout(ours_packed, torch.float32)
    ours_packed_bf16 = share_weights(theirs_bf16)
    fastest_cpu_layout(ours_packed_bf16, torch.bfloat16)
    xb, ctxb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    xb_cl = xb.contiguous(memory_format=cl)
    engines = {
        BASELINE: lambda: theirs(x, t, ctx).sample,
        "diffusers_cl fp32": lambda: theirs_cl(x_cl, t, ctx).sample,
        "diffusers bf16": lambda: theirs_bf16(xb, t, ctxb).sample,
        "velodiff fp32": lambda: ours(x, t, ctx),
        "velodiff_packed fp32": lambda: ours_packed(x_cl, t, ctx),
        "velodiff bf16": lambda: ours_bf16(xb, t, ctxb),
        "velodiff_packed bf16": lambda: ours_packed_bf16(xb_cl, t, ctxb),
    }
    ov_engines, missing = openvino_engines(theirs, x, t, ctx)
    engines.update(ov_engines)
    return engines, missing


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    limits = (("--latent", args.latent, 256), ("--batch", args.batch, 64), ("--rounds", args.rounds, 1000),
              ("--threads", args.threads, os.cpu_count() or 1))
    for flag, value, most in limits:
        if not 1 <= value <= most:
            print(f"bench_cpu_engines.py: {flag}: must be from 1 to {most}, got {value}", file=sys.stderr)
            sys.exit(2)
    if args.latent % 8:
        print(f"bench_cpu_engines.py: --latent: must be a multiple of 8 (the UNet halves it three times), "
              f"got {args.latent}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    load_start = load_average()
    engines, missing = build_engines(args.batch, args.latent)
    errs = {}
    with torch.inference_mode():
        ref = engines[BASELINE]().double()
        for name, fn in engines.items():
            out = fn().double()
            errs[name] = float((out - ref).norm() / ref.norm())
        res = compare(engines, BASELINE, rounds=args.rounds, warmup=1, min_time=0.0,
                      log=lambda m: print(m, flush=True))
    rows = []
    for name in engines:
        engine, precision = name.rsplit(" ", 1)
        rows.append({"engine": engine, "precision": precision, "s": res.stats(name),
                     "x_diffusers_fp32": res.ratio(name, over=BASELINE), "rel_err_vs_diffusers_fp32": errs[name]})
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}, flush=True)
    note = (f"One SD 1.5 UNet forward, random weights shared by every engine, {args.latent}x{args.latent} latent "
            f"({8 * args.latent} px), batch {args.batch}, {args.threads} threads, inference mode. Each cell is median "
            f"(min-max) over {args.rounds} interleaved rounds (every engine once per round, order rotated); "
            "x_diffusers_fp32: diffusers fp32's time / this engine's, per round. rel_err: relative Frobenius error "
            "of the output against diffusers fp32." + (f" Not run: {missing}." if missing else ""))
    name = "cpu_engines" if args.latent == 32 else f"cpu_engines_{8 * args.latent}px"
    path = write_results(name, rows, ["engine", "precision", "s", "x_diffusers_fp32",
                                               "rel_err_vs_diffusers_fp32"], args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average(), "rounds": args.rounds,
                                "threads": args.threads, "timing": res.to_json()})
    print("wrote", path)


if __name__ == "__main__":
    main()
