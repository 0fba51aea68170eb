"""One SD UNet step on this CPU: velodiff against diffusers and OpenVINO, at each precision (issue 14).

Full-size SD 1.5 UNet, random weights (one set of tensors for every engine), batch 2 (one CFG pair), 77 text
tokens, inference mode. Engines (each a callable doing one UNet forward; all timed in the same interleaved rounds):

  diffusers fp32                       diffusers' UNet as shipped: the baseline of every table (after
                                       unet.to(channels_last) it ran 0.92-0.97x as fast: no longer a row)
  diffusers bf16                       the same weights cast to bf16
  velodiff fp32 / bf16                 our UNet as loaded (NCHW)
  velodiff_packed fp32 / bf16          what from_pretrained loads on the CPU: channels-last, oneDNN conv weights
                                       and linear weights packed once (fastest_cpu_layout)
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

  stable-diffusion.cpp <wtype>         the same UNet weights in a diffusers folder loaded by stable-diffusion.cpp
                                       (stable-diffusion-cpp-python) with weight type f32, f16, q8_0 or q4_0; one
                                       step from a 1-step and an N-step generation (sdcpp_engines.py); its error
                                       column: PSNR of its image against its own f32 image

Every output's relative Frobenius error is taken against diffusers fp32 on the same inputs. Ratios: diffusers
fp32's time over the engine's, per round, median (min-max) over the rounds. OpenVINO is a bench-only dependency
(pip install openvino nncf); without them their rows are left out and the note says so.

Tables (--group), one process each (all engines at once need more than this machine's 24 GiB): float (the
fp32 and bf16 engines), 8bit (8- and 4-bit weights, bf16 activations) and 8bit_fp32 (fp32 activations), the latter
two beside the same engines without quantization for reference, sdcpp and sdcpp_bf16 (stable-diffusion.cpp's f32 and
q8_0, then f16 and q4_0 weights, beside our rows with fp32, then bf16 activations), sdxl and sdxl_8bit (SDXL's UNet,
bf16 activations, timed against diffusers bf16: its fp32 weights and an engine's copy fill this machine).

  python bench/bench_cpu_engines.py [--group float|8bit|8bit_fp32|sdcpp|sdcpp_bf16|sdxl|sdxl_8bit]
                                    [--latent 32] [--batch 2] [--rounds 4] [--threads N] [--sdcpp-steps 4]
                                    [--out bench/results]
Writes <out>/cpu_engines[_<px>px][_<group>][_<n>threads].{md,json} (the suffixes when not 256 px / float /
2 threads).
"""
from __future__ import annotations

import gc
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import SD15, SDXL, build_pair, diffusers_twin, inputs, share_weights  # noqa: E402
from common import compare, load_average, write_results  # noqa: E402
import sdcpp_engines  # noqa: E402

import velodiff  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.models.conv_prepack import fastest_cpu_layout  # noqa: E402

BASELINE = "diffusers fp32"


def openvino_engines(theirs, args, names, threads: int):
    """{name: callable} for the OpenVINO engines among ``names`` ("openvino fp32|bf16"; "openvino_int8w fp32|bf16":
    with nncf's int8 weights) of diffusers' UNet ``theirs`` on the positional inputs ``args`` (sample, timestep,
    encoder_hidden_states[, text_embeds, time_ids]), on ``threads`` threads (OpenVINO's own pool: torch's setting
    does not reach it), and why rows are missing."""
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

    class Wrapped(torch.nn.Module):  # positional fp32 inputs, a plain fp32 tensor out (what convert_model traces)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.dtype = next(unet.parameters()).dtype  # bf16 weights (SDXL): the inputs are cast in the graph

        def forward(self, sample, timestep, encoder_hidden_states, *sdxl):
            added = dict(zip(("text_embeds", "time_ids"), (t.to(self.dtype) for t in sdxl))) or None
            return self.unet(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype),
                             added_cond_kwargs=added, return_dict=False)[0].float()

    with torch.no_grad():
        model = ov.convert_model(Wrapped(theirs), example_input=tuple(args))
    core = ov.Core()
    engines = {}
    feeds = [a.float().numpy() for a in args]
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
    # stable-diffusion.cpp's four weight types in two tables (its contexts take 8.5 GB together)
    "sdcpp": ("velodiff_packed fp32", "velodiff_w8a8 fp32", "sdcpp f32", "sdcpp q8_0"),
    "sdcpp_bf16": ("velodiff_packed bf16", "velodiff_w8a8 bf16", "velodiff_w4a4 bf16", "sdcpp f16", "sdcpp q4_0"),
    # SDXL's fp32 weights (10 GB) and a second copy for every engine do not fit 24 GiB: bf16 engines only, timed
    # against diffusers bf16, two engines a table; errors still against one diffusers fp32 forward made before
    # the cast
    "sdxl": ("velodiff_packed bf16", "openvino bf16"),
    "sdxl_8bit": ("velodiff_w8a8 bf16", "openvino_int8w bf16"),
}
#: The model of each group and the engine its times are divided by.
MODEL = {"sdxl": (SDXL, "diffusers bf16"), "sdxl_8bit": (SDXL, "diffusers bf16")}
DEFAULT_MODEL = (SD15, BASELINE)


def build_engines(batch: int, latent: int, group: str, sdcpp_steps: int, workdir: str):
    """The group's engines: ({name: callable} of the baseline and the group's engines (models built only for
    those), the fp32 reference output, the stable-diffusion.cpp generations ({name: callable}, {weight type:
    image}; see sdcpp_engines.py; its model folder is written under ``workdir``), a note on what could not run)."""
    config, baseline = MODEL.get(group, DEFAULT_MODEL)
    theirs, ours = build_pair(config)
    x, t, ctx, kw = inputs(config, batch, latent)
    sdxl = [kw["added_cond_kwargs"][k] for k in ("text_embeds", "time_ids")] if kw else []
    names = GROUPS[group]
    fp32_only = baseline == BASELINE
    if not fp32_only:  # one fp32 forward for the errors, then bf16 in place (ours shares the fp32 tensors)
        del ours
        with torch.inference_mode():
            ref = theirs(x, t, ctx, **kw).sample
        theirs.to(torch.bfloat16)
        gc.collect()
    # OpenVINO first: its conversion and compression peak while few other models hold memory
    ov_engines, missing = openvino_engines(theirs, [x, t, ctx, *sdxl], names, torch.get_num_threads())
    wtypes = [n.split(" ")[1] for n in names if n.startswith("sdcpp")]
    sd_engines, sd_images = {}, {}
    if wtypes:
        folder = os.path.join(workdir, "sd15")
        sdcpp_engines.build_folder(theirs, folder)
        sd_engines, sd_images, why = sdcpp_engines.engines(folder, 8 * latent, sdcpp_steps,
                                                           torch.get_num_threads(), wtypes)
        missing = "; ".join(m for m in (missing, why) if m)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    xb, ctxb = x.to(torch.bfloat16), ctx.to(torch.bfloat16)
    xb_cl = xb.contiguous(memory_format=torch.channels_last)
    kwb = {"added_cond_kwargs": {k: v.to(torch.bfloat16) for k, v in kw["added_cond_kwargs"].items()}} if kw else {}
    theirs_bf16 = diffusers_twin(theirs).to(torch.bfloat16) if fp32_only else theirs

    def packed(src, dtype):
        model = share_weights(src)
        fastest_cpu_layout(model, dtype)
        return model

    def engine(model, *args, **kwargs):
        return lambda: model(*args, **kwargs)
    makers = {  # name -> () -> callable, so that only the chosen models are built
        "diffusers bf16": lambda: lambda: theirs_bf16(xb, t, ctxb, **kwb).sample,
        "velodiff fp32": lambda: engine(ours, x, t, ctx, **kw),
        "velodiff_packed fp32": lambda: engine(packed(theirs, torch.float32), x_cl, t, ctx, **kw),
        "velodiff bf16": lambda: engine(share_weights(theirs_bf16), xb, t, ctxb, **kwb),
        "velodiff_packed bf16": lambda: engine(packed(theirs_bf16, torch.bfloat16), xb_cl, t, ctxb, **kwb),
        "velodiff_w8a8 fp32": lambda: engine(quantized_unet(theirs, torch.float32, "w8a8"), x_cl, t, ctx, **kw),
        "velodiff_w8a8 bf16": lambda: engine(quantized_unet(theirs_bf16, torch.bfloat16, "w8a8"), xb_cl, t, ctxb,
                                             **kwb),
        "velodiff_w4a4 bf16": lambda: engine(quantized_unet(theirs_bf16, torch.bfloat16, "naive-w4a4"), xb_cl, t,
                                             ctxb, **kwb),
    }
    engines = {baseline: makers[baseline]() if baseline in makers else (lambda: theirs(x, t, ctx, **kw).sample)}
    engines.update({name: makers[name]() for name in names if name in makers})
    engines.update(ov_engines)
    if fp32_only:
        with torch.inference_mode():
            ref = engines[BASELINE]()
    return engines, ref, (sd_engines, sd_images), missing


def time_engines(engines, baseline: str, rounds: int, opaque=None, ref=None, ref_name: str = ""):
    """Each engine's relative Frobenius error against ``ref`` (an output of the engine ``ref_name``; default: the
    baseline's output), then ``rounds`` interleaved rounds (bench/common.py's compare); one row per engine
    "<engine> <precision>": engine, precision, s, x_<baseline>, rel_err_vs_<ref_name>. ``opaque``: more callables
    timed in the same rounds whose outputs are not UNet outputs (no error, no row: the caller derives its rows from
    the result). Call it under torch.inference_mode. Returns (rows, the compare result)."""
    tag, ref_tag = baseline.replace(" ", "_"), (ref_name or baseline).replace(" ", "_")
    ref = (engines[baseline]() if ref is None else ref).double()
    errs = {name: float((fn().double() - ref).norm() / ref.norm()) for name, fn in engines.items()}
    res = compare({**engines, **(opaque or {})}, baseline, rounds=rounds, warmup=1, min_time=0.0,
                  log=lambda m: print(m, flush=True))
    rows = []
    for name in engines:
        engine, precision = name.rsplit(" ", 1)
        rows.append({"engine": engine, "precision": precision, "s": res.stats(name),
                     f"x_{tag}": res.ratio(name, over=baseline), f"rel_err_vs_{ref_tag}": errs[name]})
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}, flush=True)
    return rows, res


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--group", choices=sorted(GROUPS), default="float",
                    help="which rows: float (fp32 / bf16 engines), 8bit (8- and 4-bit weights with bf16 activations), "
                         "8bit_fp32 (with fp32 activations), sdcpp / sdcpp_bf16 (stable-diffusion.cpp beside ours) or "
                         "sdxl (SDXL's UNet, bf16 engines)")
    ap.add_argument("--sdcpp-steps", type=int, default=4,
                    help="stable-diffusion.cpp rows: the longer of the two generations a step is taken from")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    limits = (("--latent", args.latent, 256), ("--batch", args.batch, 64), ("--rounds", args.rounds, 1000),
              ("--threads", args.threads, os.cpu_count() or 1))
    for flag, value, most in limits:
        if not 1 <= value <= most:
            print(f"bench_cpu_engines.py: {flag}: must be from 1 to {most}, got {value}", file=sys.stderr)
            sys.exit(2)
    if not 2 <= args.sdcpp_steps <= 100:
        print(f"bench_cpu_engines.py: --sdcpp-steps: must be from 2 to 100 (a step is the difference from a 1-step "
              f"generation), got {args.sdcpp_steps}", file=sys.stderr)
        sys.exit(2)
    if args.group.startswith("sdcpp") and args.batch != 2:
        print(f"bench_cpu_engines.py: --batch: the sdcpp group needs 2 (stable-diffusion.cpp's step is one image "
              f"with guidance: two UNet evaluations), got {args.batch}", file=sys.stderr)
        sys.exit(2)
    if args.latent % 8:
        print(f"bench_cpu_engines.py: --latent: must be a multiple of 8 (the UNet halves it three times), "
              f"got {args.latent}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    load_start = load_average()
    _, baseline = MODEL.get(args.group, DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as workdir:
        engines, ref, (sd_engines, sd_images), missing = build_engines(args.batch, args.latent, args.group,
                                                                       args.sdcpp_steps, workdir)
        with torch.inference_mode():
            rows, res = time_engines(engines, baseline, args.rounds, opaque=sd_engines, ref=ref, ref_name=BASELINE)
    rows += sdcpp_engines.step_rows(res, baseline, args.sdcpp_steps, sd_images)
    model = "SDXL" if args.group.startswith("sdxl") else "SD 1.5"
    tag = baseline.replace(" ", "_")
    note = (f"One {model} UNet forward, random weights shared by every engine, {args.latent}x{args.latent} latent "
            f"({8 * args.latent} px), batch {args.batch}, {args.threads} threads, inference mode. Each cell is median "
            f"(min-max) over {args.rounds} interleaved rounds (every engine once per round, order rotated); "
            f"x_{tag}: {baseline}'s time / this engine's, per round. rel_err: relative Frobenius error "
            "of the output against diffusers fp32 (the same weights and inputs). velodiff's CPU kernel paths: "
            + ", ".join(f"{k} {v}" for k, v in velodiff.info()["cpu_kernel_paths"].items()) + "."
            + (f" stable-diffusion.cpp rows: one step = (t_{args.sdcpp_steps} - t_1) / {args.sdcpp_steps - 1} per "
               f"round from its {args.sdcpp_steps}- and 1-step {8 * args.latent} px generations (Euler, guidance "
               "7.5: two UNet evaluations per step); it exposes no UNet output, so its error column is the PSNR of "
               "its image against its own f32 image." if sd_images else "")
            + (f" Not run: {missing}." if missing else ""))
    name = "cpu_engines" + ("" if args.latent == 32 else f"_{8 * args.latent}px") + (
        "" if args.group == "float" else f"_{args.group}") + ("" if args.threads == 2 else f"_{args.threads}threads")
    path = write_results(name, rows, ["engine", "precision", "s", f"x_{tag}", "rel_err_vs_diffusers_fp32"],
                         args.out, note=note,
                         extra={"cpu_kernel_paths": velodiff.info()["cpu_kernel_paths"],
                                "load_start": load_start, "load_end": load_average(), "rounds": args.rounds,
                                "threads": args.threads, "timing": res.to_json()})
    print("wrote", path)


if __name__ == "__main__":
    main()
