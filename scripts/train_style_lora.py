#!/usr/bin/env python3
"""Train a style LoRA for the built-in ``digits`` model, ``digits-bold`` (bold strokes), shipped beside
``digits-lcm`` to measure what combining a style LoRA with an LCM-LoRA does to the style (issue 16's "style
dilution").

    nice -n 19 python scripts/train_style_lora.py                 # seed 0, 2 CPU threads; writes the shipped adapter

The style: the training digits of ``split.json`` with every stroke thickened (a 3x3 grey-level dilation, max-pool,
of the 8x8 image before it is rendered at 16x16), so that the adapter's effect is measurable in closed form: the
mean ink (pixel brightness) of an image. Plain LoRA fine-tuning with the model's own objective: epsilon prediction
on SD's scaled_linear schedule, random prompt templates, 12% empty prompts (as scripts/train_digits.py), a rank-4
LoRA on the attention projections and feed-forward layers through velodiff's LoRA branch (A uniform in
+-1/sqrt(K), B zero). Output: ``loras/digits-bold.safetensors`` in the diffusers / PEFT layout (float16) with its
training record in the metadata.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distill_linfusion import alphas_cumprod, noised_batch, prompt_embeddings  # noqa: E402
from lora_training import (check_training_args, initial_lora, save_lora, trainable_branches,  # noqa: E402
                           training_parser)
from train_digits import load_data, upsample  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "..", "python", "velodiff", "data", "digits", "loras", "digits-bold.safetensors")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def bold_digits():
    """(images [N, 3, 16, 16] in [-1, 1] with thickened strokes, labels [N]) of the training digits."""
    from sklearn.datasets import load_digits
    _, labels, train_idx, _ = load_data()
    x8 = torch.tensor(load_digits().images, dtype=torch.float32)[train_idx] / 16.0
    thick = F.max_pool2d(x8[:, None], 3, stride=1, padding=1)[:, 0]  # grey-level dilation: every stroke wider
    return upsample(thick), labels[train_idx]


def main(argv=None) -> int:
    ap = training_parser(__doc__.split("\n\n")[0], DEFAULT_OUT, steps=800, rank=4, lr=2e-3)
    args = ap.parse_args(argv)
    check_training_args(ap, args)
    import velodiff as vd
    pipe = vd.Pipeline.from_pretrained("digits")
    unet = pipe.unet.eval().requires_grad_(False)
    emb, empty = prompt_embeddings(pipe)
    images, labels = bold_digits()
    with torch.no_grad():
        post = pipe.vae.encode(images)
    mean, std = post.mean.float(), post.std.float()
    alphas = alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed + 1)
    pipe.load_lora(initial_lora(unet, args.rank, gen, TARGETS), name="bold")
    branches, params = trainable_branches(unet)
    log(f"LoRA rank {args.rank} on {len(branches)} layers; {len(labels)} bold digits; {args.steps} steps of batch "
        f"{args.batch}, lr {args.lr:g}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05,
                                                final_div_factor=20)
    first = running = None
    for step in range(args.steps):
        zt, t, ctx, noise = noised_batch(pipe, mean, std, labels, emb, empty, alphas, args.batch, gen)
        loss = F.mse_loss(unet(zt, t, ctx), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        first = value if first is None else first
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == args.steps - 1:
            log(f"step {step:5d}  loss {running:.5f}")
    record = {"command": "python scripts/train_style_lora.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "steps": args.steps, "batch": args.batch, "rank": args.rank, "lr": args.lr,
              "loss_first": first, "loss_last": running, "seconds": round(time.time() - T0, 1)}
    count = save_lora(branches, args.rank, args.out, {"velodiff_training": json.dumps(record)})
    log(f"wrote {args.out} ({count} tensors); loss {first:.5f} -> {running:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
