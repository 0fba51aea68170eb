"""One UNet step: velodiff's UNet2DConditionModel vs diffusers', same weights, same process.

Full-size SD 1.5 UNet with random weights (one set of tensors shared by all models), 512x512 image = 64x64
latent, batch 2 (classifier-free guidance), 77 text tokens, fp32, inference mode. Five variants, two of them
baselines:
  diffusers           diffusers' UNet as shipped (NCHW)
  diffusers_cl        diffusers' UNet after its one-line setting ``unet.to(memory_format=torch.channels_last)``,
                      with channels-last inputs
  velodiff            velodiff's UNet in the default (NCHW) layout
  velodiff_cl         velodiff after ``unet.to(memory_format=torch.channels_last)``, channels-last inputs
  velodiff_cl_packed  that plus ``velodiff.models.conv_prepack.prepack_convs(unet)`` (oneDNN weights packed once)
Timed with bench/common.py's ``compare``: every round runs each variant once, in a rotated order, and each
velodiff row's ratio against each diffusers row is taken per round (median, min, max over the rounds).
Usage:
  python bench/bench_unet.py [--model sd15|sdxl] [--latent 64] [--batch 2] [--rounds 6] [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compare, load_average, write_results  # noqa: E402

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


def diffusers_twin(theirs):
    """A second diffusers UNet over the same tensors as ``theirs`` (no copy), to be given its own layout."""
    from diffusers import UNet2DConditionModel as DUNet

    with torch.device("meta"):
        twin = DUNet(**{k: v for k, v in theirs.config.items() if not k.startswith("_")})
    twin.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return twin.eval()


def inputs(config: dict, batch: int, latent: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], latent, latent, generator=g)
    ctx = torch.randn(batch, 77, config["cross_attention_dim"], generator=g)
    kw = {}
    if config.get("addition_embed_type") == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, generator=g),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * batch)}
    return x, torch.tensor(501.0), ctx, kw


VARIANTS = ("diffusers", "diffusers_cl", "velodiff", "velodiff_cl", "velodiff_cl_packed")
BASELINES = ("diffusers", "diffusers_cl")


def build_variants(config: dict, batch: int, latent: int, dtype: torch.dtype = torch.float32):
    """The five callables (one UNet forward each) over one set of weights in ``dtype``, and their input layouts."""
    theirs, ours = build_pair(config)
    theirs = theirs.to(dtype)
    ours = share_weights(theirs)
    x, t, ctx, kw = inputs(config, batch, latent)
    x, ctx = x.to(dtype), ctx.to(dtype)
    kw = {k: {n: v.to(dtype) for n, v in d.items()} for k, d in kw.items()}
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cl = torch.channels_last
    # channels-last: 4-D (conv) weights get NHWC copies, everything else stays shared
    theirs_cl = diffusers_twin(theirs).to(memory_format=cl)
    ours_cl = share_weights(theirs).to(memory_format=cl)
    ours_pk = share_weights(theirs).to(memory_format=cl)
    prepack_convs(ours_pk)  # + oneDNN weight prepacking: packed copies of the conv weights
    return {"diffusers": lambda: theirs(x, t, ctx, **kw).sample,
            "diffusers_cl": lambda: theirs_cl(x_cl, t, ctx, **kw).sample,
            "velodiff": lambda: ours(x, t, ctx, **kw),
            "velodiff_cl": lambda: ours_cl(x_cl, t, ctx, **kw),
            "velodiff_cl_packed": lambda: ours_pk(x_cl, t, ctx, **kw)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="sd15", choices=sorted(CONFIGS))
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights and inputs of every variant")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0, help="seed of the order of the variants within the rounds")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    load_start = load_average()
    config = CONFIGS[args.model]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    variants = build_variants(config, args.batch, args.latent, dtype)
    errs = {}
    with torch.inference_mode():
        ref = variants["diffusers"]().double()  # also the first warm-up; parity of this very setup
        for name in VARIANTS[1:]:
            out = variants[name]().double()
            errs[name] = float((out - ref).norm() / ref.norm())
        res = compare(variants, "diffusers", rounds=args.rounds, warmup=1, min_time=0.0, seed=args.seed,
                      log=lambda m: print(m, flush=True))
    load_end = load_average()
    rows = []
    for name in VARIANTS:
        row = {"model": args.model, "variant": name, "layout": "NHWC" if "_cl" in name else "NCHW",
               "s": res.stats(name)}
        for base in BASELINES:
            row[f"vs_{base}"] = res.ratio(name, over=base)
        row["rel_err_vs_diffusers"] = errs.get(name, 0.0)
        rows.append(row)
        print({k: (v["median"] if isinstance(v, dict) else v) for k, v in row.items()}, flush=True)
    note = (f"One UNet forward ({args.model}, {args.latent}x{args.latent} latent, batch {args.batch}, {args.dtype}, "
            "inference mode), random weights shared by all models. Each cell is median (min-max) over "
            f"{args.rounds} interleaved rounds (every variant once per round, order rotated per round). "
            "s: seconds per forward. vs_X: X's time / this variant's time, taken within each round, then "
            "median (min-max) over the rounds; > 1 means this variant is faster than X. _cl: "
            "unet.to(memory_format=torch.channels_last) and channels-last latents (diffusers' one-line setting "
            "for diffusers_cl); _packed adds velodiff.models.conv_prepack.prepack_convs(unet). rel_err: "
            "relative Frobenius error of the output against diffusers' (NCHW).")
    extra = {"load_start": load_start, "load_end": load_end, "rounds": args.rounds,
             "timing": res.to_json()}
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    path = write_results(f"unet_{args.model}_cpu{suffix}", rows,
                         ["model", "variant", "layout", "s", "vs_diffusers", "vs_diffusers_cl",
                          "rel_err_vs_diffusers"], args.out, note=note, extra=extra)
    print("wrote", path)


if __name__ == "__main__":
    main()
