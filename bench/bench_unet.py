"""One UNet step: velodiff's UNet2DConditionModel vs diffusers', same weights, same process.

Full-size SD 1.5 UNet with random weights (one set of tensors shared by both models), 512x512 image = 64x64
latent, batch 2 (classifier-free guidance), 77 text tokens, fp32, inference mode. Four variants: diffusers as
shipped, velodiff in the default (NCHW) layout, velodiff after ``unet.to(memory_format=torch.channels_last)``,
and that plus ``velodiff.models.conv_prepack.prepack_convs(unet)`` (oneDNN weights packed once).
Runs are interleaved so drift in machine load hits all alike; the median of each is reported.
Usage:
  python bench/bench_unet.py [--model sd15|sdxl] [--latent 64] [--batch 2] [--reps 5] [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

from velodiff.models.conv_prepack import prepack_convs  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
            attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}


def random_init_(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter like PyTorch's default init (uniform +-1/sqrt(fan_in)), norms near 1; fast."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.rand(p.shape, generator=g) * (2 * bound) - bound)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build_pair(config: dict, seed: int = 0):
    """diffusers' UNet and ours over ONE set of weight tensors (ours is built on meta, then assigned)."""
    from diffusers import UNet2DConditionModel as DUNet

    with torch.device("meta"):
        theirs = DUNet(**config)
    theirs = theirs.to_empty(device="cpu").eval()
    random_init_(theirs, seed)
    return theirs, share_weights(theirs)


def share_weights(theirs):
    """Our UNet built on meta and assigned the tensors of diffusers' ``theirs`` (no copy)."""
    from velodiff.models.unet import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(dict(theirs.config))
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval()


def inputs(config: dict, batch: int, latent: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], latent, latent, generator=g)
    ctx = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    kw = {}
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)}
    return x, torch.tensor(501.0), ctx, kw


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    config = CONFIGS[args.model]
    theirs, ours = build_pair(config)
    x, t, ctx, kw = inputs(config, args.batch, args.latent)

    # channels-last: conv weights get NHWC copies (the rest stays shared), inputs follow automatically
    ours_cl = share_weights(theirs).to(memory_format=torch.channels_last)
    # + oneDNN weight prepacking (velodiff.models.conv_prepack): packed copies of the conv weights
    ours_pk = share_weights(theirs).to(memory_format=torch.channels_last)
    prepack_convs(ours_pk)
    variants = {"diffusers": lambda: theirs(x, t, ctx, **kw).sample, "velodiff": lambda: ours(x, t, ctx, **kw),
                "velodiff_cl": lambda: ours_cl(x, t, ctx, **kw), "velodiff_cl_packed": lambda: ours_pk(x, t, ctx, **kw)}
    times = {k: [] for k in variants}
    errs = {}
    with torch.inference_mode():
        ref = variants["diffusers"]()  # warm-up, and the parity of this very setup
        for name in ("velodiff", "velodiff_cl", "velodiff_cl_packed"):
            out = variants[name]()
            errs[name] = float((out.double() - ref.double()).norm() / ref.double().norm())
        for _ in range(args.reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": args.model, "latent": f"{args.latent}x{args.latent}", "batch": args.batch, "dtype": "fp32",
           "diffusers_s": med["diffusers"], "velodiff_s": med["velodiff"], "velodiff_cl_s": med["velodiff_cl"],
           "diffusers/velodiff": med["diffusers"] / med["velodiff"],
           "diffusers/velodiff_cl": med["diffusers"] / med["velodiff_cl"],
           "velodiff_cl_packed_s": med["velodiff_cl_packed"],
           "diffusers/velodiff_cl_packed": med["diffusers"] / med["velodiff_cl_packed"],
           "rel_err": errs["velodiff"], "rel_err_cl": errs["velodiff_cl"], "rel_err_cl_packed": errs["velodiff_cl_packed"],
           "min_s": " / ".join(f"{min(times[k]):.2f}" for k in variants)}
    print(row, flush=True)
    path = write_results(f"unet_{args.model}_cpu", [row],
                         ["model", "latent", "batch", "dtype", "diffusers_s", "velodiff_s", "velodiff_cl_s",
                          "velodiff_cl_packed_s", "diffusers/velodiff", "diffusers/velodiff_cl",
                          "diffusers/velodiff_cl_packed", "rel_err", "rel_err_cl", "rel_err_cl_packed", "min_s"],
                         args.out,
                         note=f"One UNet forward, random weights shared by all models, median of {args.reps} "
                              "interleaved runs (min_s: fastest run of diffusers / velodiff / velodiff_cl / "
                              "velodiff_cl_packed). velodiff_cl = velodiff after "
                              "unet.to(memory_format=torch.channels_last); _packed adds "
                              "velodiff.models.conv_prepack.prepack_convs(unet); diffusers "
                              "runs as shipped (NCHW). A ratio > 1 means velodiff is faster. rel_err: relative "
                              "Frobenius error against diffusers' output.")
    print("wrote", path)


if __name__ == "__main__":
    main()
