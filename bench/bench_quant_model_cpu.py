"""Whole-model CPU speed of a W4A4 denoiser: one DiT-XL/2 forward at 256x256 (32x32 latents, 256 tokens), batch 2
(a guided step), fp32 against the same model with its default layers (attention and MLP linears of the 28
blocks) replaced by SVDQuant-shaped QuantizedLinear layers (int4 codes, rank-32 branch, smoothing).

Speed does not depend on the values, so the quantized layers get random codes and factors instead of running the
calibration and SVD search (which takes minutes for a model this size); the layers run exactly the kernels a
quantized checkpoint runs. A second baseline is torch's own int8 path on the same layers:
``torch.ao.quantization.quantize_dynamic`` (dynamic int8 linears, quantize_dynamic's defaults). The three models
are timed interleaved with bench/common.py's ``compare`` (one forward per candidate per round, order rotated);
ratios are taken per round, median (min-max) over the rounds. Writes bench/results/quant_model_cpu.{json,md}.

  python bench/bench_quant_model_cpu.py [--threads 2] [--batch 2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, write_results  # noqa: E402

import torch  # noqa: E402

from velodiff.loading import DIT_CONFIG  # noqa: E402
from velodiff.models.dit import DiTTransformer2DModel  # noqa: E402
from velodiff.quant import QuantizedLinear, install_layer, select_layers  # noqa: E402


def random_quantized(linear: torch.nn.Linear, rank: int, gen: torch.Generator) -> QuantizedLinear:
    q = QuantizedLinear(linear.in_features, linear.out_features, bits=4, rank=rank, smooth=True,
                        bias=linear.bias is not None)
    q.qweight.copy_(torch.randint(0, 256, q.qweight.shape, generator=gen, dtype=torch.uint8))
    q.wscales.copy_(torch.rand(q.wscales.shape, generator=gen) * 0.01)
    q.smooth.copy_(torch.rand(q.smooth.shape, generator=gen) + 0.5)
    q.lora_down.copy_(torch.randn(q.lora_down.shape, generator=gen) * 0.02)
    q.lora_up.copy_(torch.randn(q.lora_up.shape, generator=gen) * 0.02)
    if linear.bias is not None:
        q.bias.copy_(linear.bias.detach())
    return q


def torch_int8_dynamic(model: torch.nn.Module, names) -> torch.nn.Module:
    """A copy of ``model`` with the linears ``names`` replaced by torch's dynamic int8 linears."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        return quantize_dynamic(copy.deepcopy(model), {n: default_dynamic_qconfig for n in names},
                                dtype=torch.qint8).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-int8", action="store_true", help="skip torch's int8 baseline")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = load_average()
    torch.manual_seed(0)
    config = {k: v for k, v in DIT_CONFIG.items() if not k.startswith("_")}
    config["sample_size"] = 32
    model = DiTTransformer2DModel.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, 32, 32, generator=gen)
    t = torch.full((args.batch,), 500.0)
    y = torch.randint(0, 1000, (args.batch,), generator=gen)
    layers = select_layers(model)
    models = {"fp32": model}
    if not args.no_int8:
        models["int8_dyn"] = torch_int8_dynamic(model, list(layers))
    quantized = copy.deepcopy(model)
    for name, linear in select_layers(quantized).items():
        install_layer(quantized, name, random_quantized(linear, args.rank, gen))  # MLP GELU fused, as quantize does
    models["w4a4"] = quantized
    with torch.inference_mode():
        res = compare({k: (lambda m=m: m(x, t, y)) for k, m in models.items()}, "fp32", rounds=args.rounds,
                      warmup=1, min_time=0.0, log=lambda msg: print(msg, flush=True))
    load_end = load_average()
    row = {"model": "DiT-XL/2 256px", "batch": args.batch, "tokens": 256, "quantized_layers": len(layers),
           "fp32_s": res.stats("fp32"), "w4a4_s": res.stats("w4a4"), "w4a4_vs_fp32": res.ratio("w4a4")}
    if "int8_dyn" in models:
        row.update({"int8_dyn_s": res.stats("int8_dyn"), "int8_dyn_vs_fp32": res.ratio("int8_dyn"),
                    "w4a4_vs_int8_dyn": res.ratio("w4a4", over="int8_dyn")})
    print({k: (v["median"] if isinstance(v, dict) else v) for k, v in row.items()})
    write_results("quant_model_cpu", [row], list(row), args.out,
                  note=f"{args.threads} threads; one forward per candidate per round, {args.rounds} interleaved "
                       "rounds after a warm-up; each cell is median (min-max) over the rounds. w4a4: "
                       f"SVDQuant-shaped layers (rank {args.rank}) on velodiff's CPU kernels; fp32: torch's "
                       "F.linear; int8_dyn: torch.ao.quantization.quantize_dynamic on the same layers (int8 "
                       "weights per tensor, activations quantized per call). *_vs_X: X's time / this one's within "
                       "each round, median (min-max) over the rounds; > 1 means faster than X. adaLN modulation, "
                       "embeddings and the final layer stay fp32 in all.",
                  extra={"load_start": load_start, "load_end": load_end, "rounds": args.rounds,
                         "threads": args.threads, "timing": res.to_json()})


if __name__ == "__main__":
    main()
