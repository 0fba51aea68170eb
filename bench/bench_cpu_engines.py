"""One SD UNet step on this CPU: velodiff against diffusers and OpenVINO, at each precision (issue 14).

Full-size SD 1.5 UNet, random weights (one set of tensors for every engine), batch 2 (one CFG pair), 77 text
tokens, inference mode. Engines (each a callable doing one UNet forward; all timed in the same interleaved rounds):

  diffusers fp32                       diffusers' UNet as shipped: the baseline of every table (after
                                       unet.to(channels_last) it ran 0.92-0.97x as fast: no longer a row)
  diffusers bf16                       the same weights cast to bf16
  velodiff fp32 / bf16                 our UNet as loaded (NCHW)
  velodiff_packed fp32 / bf16          what from_pretrained loads on the CPU: channels-last, oneDNN conv weights
                                       packed once, in bf16 the linear weights too (fastest_cpu_layout)
  velodiff_w8a8 fp32 / bf16            velodiff_packed with the transformer blocks' linears quantized W8A8
                                       (vd.quant.quantize, method w8a8, layers "default": int8 weights per
                                       (channel, group of 64), activations per (token, group) at run time;
                                       the AVX-512VNNI qgemm where the CPU has it)
  velodiff_w4a4 bf16                   the same with method naive-w4a4 (4-bit codes; SVDQuant adds its rank-32
                                       branch and smoothing, which need calibration images: per-layer cost of
                                       the branch in qgemm_cpu.md)
  openvino fp32 / bf16                 diffusers' UNet converted with openvino.convert_model (the conversion
                                       optimum-intel runs for its export) and compiled for this CPU with
                                       INFERENCE_PRECISION_HINT f32 or bf16
  openvino_int8w fp32 / bf16           the same model after nncf.compress_weights (INT8_ASYM weights per output
                                       channel, what optimum-intel's --weight-format int8 applies; activations
                                       stay in the hinted precision)

Every output's relative Frobenius error is taken against diffusers fp32 on the same inputs. Ratios: diffusers
fp32's time over the engine's, per round, median (min-max) over the rounds. OpenVINO is a bench-only dependency
(pip install openvino nncf); without them their rows are left out and the note says so.

Two tables (--group), one process each (all engines at once need more than this machine's 24 GiB): float (the
fp32 and bf16 engines), 8bit (8- and 4-bit weights, bf16 activations) and 8bit_fp32 (fp32 activations), the latter
two beside the same engines without quantization for reference.

  python bench/bench_cpu_engines.py [--group float|8bit] [--latent 32] [--batch 2] [--rounds 4] [--threads N]
                                    [--out bench/results]
Writes <out>/cpu_engines[_<px>px][_8bit][_<n>threads].{md,json} (the suffixes when not 256 px / float / 2 threads).
"""
from __future__ import annotations

import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import SD15, build_pair, diffusers_twin, inputs, share_weights  # noqa: E402
from common import compare, load_average, write_results  # noqa: E402

import velodiff  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.models.conv_prepack import fastest_cpu_layout  # noqa: E402

BASELINE = "diffusers fp32"


def openvino_engines(theirs, x, t, ctx, names, threads: int):
    """{name: callable} for the OpenVINO engines among ``names`` ("openvino fp32|bf16"; "openvino_int8w fp32|bf16":
    with nncf's int8 weights), on ``threads`` threads (OpenVINO's own pool: torch's setting does not reach it), and
    why rows are missing."""
    names = [n for n in names if n.startswith("openvino")]
    if not names:
        return {}, ""
    try:
        import openvino as ov
    except ImportError as e:
        return {}, f"openvino not installed ({e})"
    if any(n.startswith("openvino_int8w") for n in names):
        try:
            import nncf
        except ImportError as e:
            return {}, f"openvino_int8w: nncf not installed ({e})"

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
    feeds = [x.numpy(), t.numpy(), ctx.numpy()]
    for name in sorted(names):  # "openvino ..." first; compiled models hold their own weights
        label, precision = name.split(" ")
        if label == "openvino_int8w" and nncf is not None:
            model, nncf = nncf.compress_weights(model), None  # in place, once
        hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
        request = core.compile_model(model, "CPU", config).create_infer_request()

        def run(request=request):
            return torch.from_numpy(request.infer(feeds)[0].copy())
        engines[name] = run
    del model
    gc.collect()
    return engines, ""


def quantized_unet(diffusers_unet, dtype: torch.dtype, method: str):
    """Our UNet on ``diffusers_unet``'s weights, its transformer-block linears quantized with ``method``, in the
    fastest CPU layout (what from_pretrained gives a quantized folder)."""
    import types

    from velodiff.quant import QuantConfig, quantize
    model = share_weights(diffusers_unet)  # new modules over the same tensors: quantize swaps modules only
    quantize(types.SimpleNamespace(unet=model), QuantConfig(method=method, rank=0, layers="default"), progress=False)
    fastest_cpu_layout(model, dtype)
    return model


#: The rows of each table (one process each: all of them at once need more than this machine's 24 GiB).
GROUPS = {
    "float": ("diffusers bf16", "velodiff fp32", "velodiff_packed fp32", "velodiff bf16", "velodiff_packed bf16",
              "openvino fp32", "openvino bf16"),
    "8bit": ("velodiff_packed bf16", "velodiff_w8a8 bf16", "velodiff_w4a4 bf16", "openvino bf16",
             "openvino_int8w bf16"),
    "8bit_fp32": ("velodiff_packed fp32", "velodiff_w8a8 fp32", "openvino fp32", "openvino_int8w fp32"),
}


def build_engines(batch: int, latent: int, group: str):
    """{name: callable} of the baseline and the group's engines (models built only for those), and a note on what
    could not run."""
    theirs, ours = build_pair(SD15)
    x, t, ctx, _ = inputs(SD15, batch, latent)
    names = GROUPS[group]
    # OpenVINO first: its conversion and compression peak while few other models hold memory
    ov_engines, missing = openvino_engines(theirs, x, t, ctx, names, torch.get_num_threads())
    x_cl = x.contiguous(memory_format=torch.channels_last)
    xb, ctxb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    xb_cl = xb.contiguous(memory_format=torch.channels_last)
    theirs_bf16 = diffusers_twin(theirs).to(torch.bfloat16)

    def packed(src, dtype):
        model = share_weights(src)
        fastest_cpu_layout(model, dtype)
        return model

    def engine(model, *args):
        return lambda: model(*args)
    makers = {  # name -> () -> callable, so that only the chosen models are built
        "diffusers bf16": lambda: lambda: theirs_bf16(xb, t, ctxb).sample,
        "velodiff fp32": lambda: engine(ours, x, t, ctx),
        "velodiff_packed fp32": lambda: engine(packed(theirs, torch.float32), x_cl, t, ctx),
        "velodiff bf16": lambda: engine(share_weights(theirs_bf16), xb, t, ctxb),
        "velodiff_packed bf16": lambda: engine(packed(theirs_bf16, torch.bfloat16), xb_cl, t, ctxb),
        "velodiff_w8a8 fp32": lambda: engine(quantized_unet(theirs, torch.float32, "w8a8"), x_cl, t, ctx),
        "velodiff_w8a8 bf16": lambda: engine(quantized_unet(theirs_bf16, torch.bfloat16, "w8a8"), xb_cl, t, ctxb),
        "velodiff_w4a4 bf16": lambda: engine(quantized_unet(theirs_bf16, torch.bfloat16, "naive-w4a4"), xb_cl, t,
                                             ctxb),
    }
    engines = {BASELINE: lambda: theirs(x, t, ctx).sample}
    engines.update({name: makers[name]() for name in names if name in makers})
    engines.update(ov_engines)
    return engines, missing


def time_engines(engines, baseline: str, rounds: int):
    """Each engine's relative Frobenius error against the baseline's output, then ``rounds`` interleaved rounds
    (bench/common.py's compare); one row per engine "<engine> <precision>": engine, precision, s, x_<baseline>,
    rel_err_vs_<baseline>. Call it under torch.inference_mode. Returns (rows, the compare result)."""
    tag = baseline.replace(" ", "_")
    ref = engines[baseline]().double()
    errs = {name: float((fn().double() - ref).norm() / ref.norm()) for name, fn in engines.items()}
    res = compare(engines, baseline, rounds=rounds, warmup=1, min_time=0.0, log=lambda m: print(m, flush=True))
    rows = []
    for name in engines:
        engine, precision = name.rsplit(" ", 1)
        rows.append({"engine": engine, "precision": precision, "s": res.stats(name),
                     f"x_{tag}": res.ratio(name, over=baseline), f"rel_err_vs_{tag}": errs[name]})
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}, flush=True)
    return rows, res


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--group", choices=sorted(GROUPS), default="float",
                    help="which rows: float (fp32 / bf16 engines), 8bit (8- and 4-bit weights with bf16 activations) or "
                         "8bit_fp32 (with fp32 activations)")
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
    engines, missing = build_engines(args.batch, args.latent, args.group)
    with torch.inference_mode():
        rows, res = time_engines(engines, BASELINE, args.rounds)
    note = (f"One SD 1.5 UNet forward, random weights shared by every engine, {args.latent}x{args.latent} latent "
            f"({8 * args.latent} px), batch {args.batch}, {args.threads} threads, inference mode. Each cell is median "
            f"(min-max) over {args.rounds} interleaved rounds (every engine once per round, order rotated); "
            "x_diffusers_fp32: diffusers fp32's time / this engine's, per round. rel_err: relative Frobenius error "
            "of the output against diffusers fp32. velodiff's CPU kernel paths: "
            + ", ".join(f"{k} {v}" for k, v in velodiff.info()["cpu_kernel_paths"].items()) + "."
            + (f" Not run: {missing}." if missing else ""))
    name = "cpu_engines" + ("" if args.latent == 32 else f"_{8 * args.latent}px") + (
        "" if args.group == "float" else f"_{args.group}") + ("" if args.threads == 2 else f"_{args.threads}threads")
    path = write_results(name, rows, ["engine", "precision", "s", "x_diffusers_fp32",
                                               "rel_err_vs_diffusers_fp32"], args.out, note=note,
                         extra={"cpu_kernel_paths": velodiff.info()["cpu_kernel_paths"],
                                "load_start": load_start, "load_end": load_average(), "rounds": args.rounds,
                                "threads": args.threads, "timing": res.to_json()})
    print("wrote", path)


if __name__ == "__main__":
    main()
