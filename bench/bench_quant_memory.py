"""Weight bytes of full-size quantized denoisers (SD 1.5, SD 2.1, SDXL UNets; DiT-XL/2; PixArt-alpha XL) relative to
their fp16 checkpoints. The models are built on the meta device from their real configs and the layers that
velodiff.quant quantizes by default are replaced by QuantizedLinear shells of the same shapes, so the byte counts
are exact without any weights (16-bit scales, branch and bias; int4 codes; float32 smoothing and strengths).

Also the ``layers="all"`` preset (velodiff.quant.ALL_LAYERS: convolutions of the ResNet blocks and resamplers,
cross-attention k/v, time and adaLN modulation layers too), and the share of the fp16 bytes that sits in the
quantized layers.

  python bench/bench_quant_memory.py [--ranks 32 16]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

import torch  # noqa: E402

from velodiff.loading import DIT_CONFIG, PIXART_CONFIG, default_unet_config  # noqa: E402
from velodiff.quant import select_layers  # noqa: E402
from velodiff.quant.rank_budget import quantized_bytes  # noqa: E402


def build(name: str):
    from velodiff.models.dit import DiTTransformer2DModel
    from velodiff.models.pixart import PixArtTransformer2DModel
    from velodiff.models.unet import UNet2DConditionModel
    with torch.device("meta"):
        if name in ("sd1", "sd2", "sdxl"):
            cfg = {k: v for k, v in default_unet_config(name).items() if not k.startswith("_")}
            return UNet2DConditionModel.from_config(cfg)
        if name == "dit":
            return DiTTransformer2DModel.from_config(DIT_CONFIG)
        return PixArtTransformer2DModel.from_config(PIXART_CONFIG)


def measure(model, preset: str, rank: int):
    layers = select_layers(model, layers=preset)
    total_fp16 = 2 * sum(p.numel() for p in model.parameters())
    layer_fp16 = 2 * sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in layers.values())
    return len(layers), total_fp16, layer_fp16, quantized_bytes(layers, rank)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    rows = []
    for name in ("sd1", "sd2", "sdxl", "dit", "pixart"):
        model = build(name)
        for label, rank in ((label, rank) for rank in args.ranks for label in ("default", "all")):
            n, total, layer, quant = measure(model, label, rank)
            after = total - layer + quant
            rows.append({"model": name, "class": type(model).__name__, "rank": rank, "layers": label,
                         "quantized_layers": n,
                         "fp16_MiB": round(total / 2 ** 20, 1), "share_in_quantized_layers": round(layer / total, 3),
                         "quantized_MiB": round(after / 2 ** 20, 1), "model_ratio": round(after / total, 3),
                         "layer_ratio": round(quant / layer, 3)})
            print(rows[-1], flush=True)
    write_results("quant_memory", rows, ["model", "class", "rank", "layers", "quantized_layers", "fp16_MiB",
                                         "share_in_quantized_layers", "quantized_MiB", "model_ratio", "layer_ratio"],
                  args.out,
                  note=f"SVDQuant W4A4, ranks {args.ranks} (capped at min(N, K)), group 64, 16-bit scales/branch/bias. model_ratio: whole "
                       "denoiser bytes after / fp16 bytes (unquantized layers stay 16-bit); layer_ratio: the quantized "
                       "layers alone. Exact counts from the real configs on the meta device (no weights needed).")


if __name__ == "__main__":
    main()
