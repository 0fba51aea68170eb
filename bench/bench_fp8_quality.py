"""Quality of FP8 quantization on the built-in models, judged by velodiff.eval (issue 15).

For ``digits`` (UNet) and ``digits-dit``, fp32 and the quantizers as ``vd.quant.quantize`` applies them to the
denoiser's transformer-block linears (default layers; for digits-dit also all of its linear layers): FP8 W8A8 e4m3
(weights per output channel, activations per token at run time, velodiff::fp8_gemm), the same in e5m2, FP8 weight
only, and for reference INT W8A8 (per group of 64) and SVDQuant W4A4 rank 8; then the low-bit formats
(fake-quantized, velodiff.quant.lowbit_fp): W4A8 with a 4-bit float weight format and clip searched per layer,
with and without learned rounding, against INT4 weights per channel (the same search over clips), and W4A4 both
ways (activations per token: a 4-bit float format searched per layer, or INT4). Conditional accuracy and Frechet
distance with 95% intervals (the judge fitted on digits the models never saw), and the PSNR of the same seeds'
images against fp32 (bench_precision_quality.py's table and code).

With --timesteps: the calibrated methods (SVDQuant W4A4 r8, lowbit-fp W4A8 with and without learned rounding,
lowbit-fp W4A4), each calibrated on all steps, on Q-Diffusion's uniformly spaced half and with PTQ4DM's normal
weighting (velodiff.quant.calibrate); FP8 and INT W8A8 scale dynamically and calibrate nothing.

With --attention: FP8 W8A8 with and without FP8 attention (Q, K, P, V in e4m3, the fake-quantized "fp8" backend).

With --options: TFMQ-DM's temporal-layer treatment on and off (SVDQuant W4A4 r8 and lowbit-fp W4A8 with learned
rounding, the temporal layers quantized either way: plainly, as any layer, or with tfmq_temporal), and for digits
Q-Diffusion's split shortcut on and off (INT W8A8 and SVDQuant W4A4 r8 on every layer, convolutions included).

  python bench/bench_fp8_quality.py [--models digits digits-dit] [--per-class 100] [--psnr-images 4]
                                    [--timesteps | --attention | --options]
Writes <out>/fp8_quality_digits.{json,md} (--timesteps: fp8_quality_timesteps_digits; --attention:
fp8_quality_attention_digits; --options: fp8_quality_options_digits).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_precision_quality import quality_parser, quality_rows  # noqa: E402
from common import load_average, write_results  # noqa: E402

import torch  # noqa: E402

import velodiff as vd  # noqa: E402

F32 = torch.float32
VARIANTS = (("fp32", F32, None), ("fp8 w8a8 e4m3", F32, vd.quant.FP8()),
            ("fp8 w8a8 e5m2", F32, vd.quant.FP8(fp8_format="e5m2")),
            ("fp8 weight-only", F32, vd.quant.FP8(weight_only=True)),
            ("int w8a8", F32, vd.quant.W8A8()), ("svdquant w4a4 r8", F32, vd.quant.SVDQuant(8)),
            ("lowbit-fp w4a8", F32, vd.quant.LowbitFP(4, 8)),
            ("lowbit-fp w4a8 + learned rounding", F32, vd.quant.LowbitFP(4, 8, learn_rounding=True)),
            ("lowbit-int w4a8", F32, vd.quant.LowbitINT(4, 8)),
            ("lowbit-fp w4a4", F32, vd.quant.LowbitFP(4, 4)), ("lowbit-int w4a4", F32, vd.quant.LowbitINT(4, 4)))
#: --timesteps: the calibrated methods with each timestep sampling of velodiff.quant.calibrate (issue 15's "on and
#: off"): all steps (the default), Q-Diffusion's uniformly spaced half, PTQ4DM's normal weighting
TIMESTEP_VARIANTS = (("fp32", F32, None),) + tuple(
    (f"{label}, timesteps {mode}", F32, make(mode))
    for label, make in (("svdquant w4a4 r8", lambda m: vd.quant.SVDQuant(8, calibration_timesteps=m)),
                        ("lowbit-fp w4a8", lambda m: vd.quant.LowbitFP(4, 8, calibration_timesteps=m)),
                        ("lowbit-fp w4a8 + learned rounding",
                         lambda m: vd.quant.LowbitFP(4, 8, learn_rounding=True, calibration_timesteps=m)),
                        ("lowbit-fp w4a4", lambda m: vd.quant.LowbitFP(4, 4, calibration_timesteps=m)))
    for mode in ("all", "qdiffusion", "ptq4dm"))
#: --attention: FP8 W8A8 with and without FP8 attention (the fake-quantized "fp8" attention backend)
ATTENTION_VARIANTS = (("fp32", F32, None), ("fp8 w8a8 e4m3", F32, vd.quant.FP8()),
                      ("fp8 w8a8 e4m3 + fp8 attention", F32, vd.quant.FP8(fp8_attention=True)))
#: digits-dit's "all" preset is linear layers only (FP8 takes no convolutions yet)
ALL_LAYERS = (("fp8 w8a8 e4m3, all layers", F32, vd.quant.FP8(layers="all")),
              ("int w8a8, all layers", F32, vd.quant.W8A8(layers="all")))


TEMPORAL_LAYERS = ("*time_emb_proj", "*time_embedding.linear_*", "*timestep_embedder.linear_*")


def option_variants(model: str):
    """--options: each calibration option of issue 15 on and off, for ``model``."""
    cls = "UNet2DConditionModel" if model == "digits" else "DiTTransformer2DModel"
    plain = tuple(vd.quant.DEFAULT_LAYERS[cls]) + TEMPORAL_LAYERS  # the temporal layers, quantized as any other
    rows = [("fp32", F32, None)]
    for label, make in (("svdquant w4a4 r8", lambda **kw: vd.quant.SVDQuant(8, **kw)),
                        ("lowbit-fp w4a8 + learned rounding",
                         lambda **kw: vd.quant.LowbitFP(4, 8, learn_rounding=True, **kw))):
        rows += [(f"{label}, temporal layers plain", F32, make(include=plain)),
                 (f"{label}, temporal layers tfmq", F32, make(tfmq_temporal=True))]
    if model == "digits":
        for label, make in (("int w8a8", vd.quant.W8A8), ("svdquant w4a4 r8", lambda **kw: vd.quant.SVDQuant(8, **kw))):
            rows += [(f"{label}, all layers", F32, make(layers="all")),
                     (f"{label}, all layers + split shortcut", F32, make(layers="all", split_shortcut=True))]
    return tuple(rows)


def main():
    ap = quality_parser(__doc__.split("\n\n")[0], "bench_fp8_quality.py")
    table = ap.add_mutually_exclusive_group()
    table.add_argument("--timesteps", action="store_true",
                       help="instead: the calibrated methods under each timestep sampling "
                            "(fp8_quality_timesteps_digits)")
    table.add_argument("--attention", action="store_true",
                       help="instead: FP8 W8A8 with and without FP8 attention (fp8_quality_attention_digits)")
    table.add_argument("--options", action="store_true",
                       help="instead: TFMQ-DM's temporal layers and Q-Diffusion's split shortcut, each on and off "
                            "(fp8_quality_options_digits)")
    args = ap.parse()
    load_start, rows = load_average(), []
    for model in args.models:
        variants = (TIMESTEP_VARIANTS if args.timesteps else ATTENTION_VARIANTS if args.attention
                    else option_variants(model) if args.options
                    else VARIANTS + (ALL_LAYERS if model == "digits-dit" else ()))
        rows += quality_rows([model], variants, args.per_class, args.psnr_images)
    note = (f"velodiff.eval: {args.per_class} images per digit, 20 steps of dpmpp_2m, seed 0, 95% intervals "
            "(bootstrap); the judge was fitted on digits the models never saw. psnr_vs_fp32_db: "
            f"{args.psnr_images} images of each class against fp32's from the same seeds (pixels in [0, 1]). "
            "Quantized: the transformer blocks' linear layers (velodiff.quant.DEFAULT_LAYERS), 'all layers': "
            "velodiff.quant.ALL_LAYERS. FP8: max-abs scales, no calibration (activations are scaled per token at "
            "run time); SVDQuant and the low-bit methods calibrated on 16 generated images x 20 steps (256 input "
            "rows kept per layer; learned rounding: 300 Adam steps per layer). FP8 and INT W8A8 run their CPU "
            "kernels, and so do the low-bit rows with 4-bit weights and e4m3 activations (W4A8 on fp8_gemm); "
            "W4A4 and INT-activation rows are fake-quantized; s_per_image on this 2-core CPU.")
    if args.options:
        note += (" Temporal layers: the timestep embedding MLP and the UNet resnets' time_emb_proj; 'plain': "
                 "calibrated on the trajectory rows like any layer; 'tfmq': TFMQ-DM's treatment "
                 "(velodiff.quant.temporal). Split shortcut: the up blocks' conv1 / conv_shortcut as one quantized "
                 "convolution per part of their concatenated input (velodiff.quant.conv.SplitConv2d).")
    name = ("fp8_quality_timesteps_digits" if args.timesteps else "fp8_quality_attention_digits" if args.attention
            else "fp8_quality_options_digits" if args.options else "fp8_quality_digits")
    path = write_results(name, rows,
                         ["model", "precision", "guidance", "images", "accuracy", "accuracy_ci", "fd", "fd_ci",
                          "psnr_vs_fp32_db", "s_per_image"], args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average()})
    print("wrote", path)


if __name__ == "__main__":
    main()
