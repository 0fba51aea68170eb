"""Relative output error of FP8 and low-bit float quantization on full-size SD 1.5, SDXL and PixArt linear layers
(issue 15), beside INT W8A8: bench_quant_layers.py's synthetic setting (torch's nn.Linear init, activations with
log-normal channel magnitudes and 1 % outlier channels at 20x; calibration and test rows drawn separately).

Methods: int w8a8 (per group of 64, velodiff::qgemm), fp8 e4m3 W8A8 (per channel / per token, velodiff::fp8_gemm),
fp8 weight-only, lowbit-fp W4A8 (4-bit float format and clip searched on the calibration rows; activations e4m3 per
token), lowbit-int W4A8 (the same search over INT4), and with --learn lowbit-fp W4A8 with learned rounding (slow on
the wide layers). Error: ||y_q - y|| / ||y|| on the test rows against the fp32 layer.

  python bench/bench_fp8_layers.py [--families sd15 sdxl pixart] [--tokens 1024] [--learn] [--out bench/results]
Writes <out>/fp8_layers.{md,json}.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quant_layers import layer_cases  # noqa: E402
from common import check_ranges, write_results  # noqa: E402

import torch  # noqa: E402

from velodiff.commands.args import Parser  # noqa: E402
from velodiff.quant.fp8 import Fp8Linear  # noqa: E402
from velodiff.quant.lowbit_fp import FpFormat, quantize_linear  # noqa: E402
from velodiff.quant.svdquant import quantize_layer  # noqa: E402

E4M3 = FpFormat(4, 3)


def types_of(family: str):
    """(name, K, N) of one transformer block's linear layers at width c: SD 1.5 (text 768), SDXL (text 2048), PixArt
    (T5 text 4096 projected to c by the caption projection, MLP 4c)."""
    if family == "pixart":
        return lambda c: [("attn q/k/v/out", c, c), ("mlp up", c, 4 * c), ("mlp down", 4 * c, c)]
    text = {"sd15": 768, "sdxl": 2048}[family]
    return lambda c: [("attn q/k/v/out", c, c), ("attn2.to_k/v", text, c), ("geglu proj", c, 8 * c),
                      ("ff out", 4 * c, c)]


WIDTHS = {"sd15": (320, 640, 1280), "sdxl": (640, 1280), "pixart": (1152,)}


def main():
    ap = Parser(description=__doc__.split("\n\n")[0])  # one-line errors, exit 2
    ap.add_argument("--families", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    ap.add_argument("--tokens", type=int, default=1024, help="test rows per layer")
    ap.add_argument("--calibration-rows", type=int, default=256)
    ap.add_argument("--learn", action="store_true", help="also lowbit-fp W4A8 with learned rounding")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    check_ranges("bench_fp8_layers.py", (("--tokens", args.tokens, 1, 65536),
                                         ("--calibration-rows", args.calibration_rows, 1, 65536)))
    methods = {
        "int w8a8": lambda lin, cal: quantize_layer(lin.weight, lin.bias, "w8a8", None, rank=0),
        "fp8 w8a8": lambda lin, cal: Fp8Linear.from_linear(lin, "fp8"),
        "fp8 weight-only": lambda lin, cal: Fp8Linear.from_linear(lin, "fp8-weight-only"),
        "lowbit-fp w4a8": lambda lin, cal: quantize_linear(lin, 4, E4M3, cal),
        "lowbit-int w4a8": lambda lin, cal: quantize_linear(lin, 4, E4M3, cal, int_weights=True),
    }
    if args.learn:
        methods["lowbit-fp w4a8 learned"] = lambda lin, cal: quantize_linear(lin, 4, E4M3, cal, learn=True)
    rows = []
    for family in args.families:
        for c, name, k, n, linear, cal, test in layer_cases(WIDTHS[family], types_of(family), args.calibration_rows,
                                                            args.tokens):
            with torch.no_grad():
                ref = linear(test).double()
            row = {"family": family, "width": c, "layer": name, "K": k, "N": n}
            for label, make in methods.items():
                q = make(linear, cal)
                with torch.no_grad():
                    row[label] = round(float((q(test).double() - ref).norm() / ref.norm()), 5)
                if label.startswith("lowbit-fp"):
                    row[f"{label} format"] = q.w_format.name
            rows.append(row)
            print(row, flush=True)
    cols = ["family", "width", "layer", "K", "N"] + [c for c in rows[0] if c not in ("family", "width", "layer", "K",
                                                                                        "N")]
    write_results("fp8_layers", rows, cols, args.out,
                  note=f"Relative output error vs the fp32 layer on {args.tokens} synthetic test rows "
                       f"({args.calibration_rows} calibration rows for the low-bit searches). Weights: torch's "
                       "nn.Linear init (random), activations: log-normal channel scales with 1% outlier channels "
                       "x20. int w8a8: per group of 64; fp8: e4m3, weights per output channel, activations per "
                       "token; lowbit W4A8: 4-bit weights per output channel (format / clip searched), e4m3 "
                       "activations per token, fake-quantized. velodiff CPU kernels where they exist.")


if __name__ == "__main__":
    main()
