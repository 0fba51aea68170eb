#!/usr/bin/env python3
"""Latent consistency distillation of the built-in ``digits`` model into a LoRA (LCM-LoRA), shipped as the built-in
adapter ``digits-lcm``.

    nice -n 19 python scripts/distill_lcm.py                    # seed 0, 2 CPU threads; writes the shipped adapter
    python scripts/distill_lcm.py --steps 50 --out /tmp/lcm.safetensors   # a quick try elsewhere

The recipe of Luo et al. 2023 ("Latent Consistency Models", Algorithm 3, and "LCM-LoRA"), scaled down to a 16x16
model on two CPU cores:

- teacher: the digits UNet, frozen, with classifier-free guidance at a scale drawn per sample from
  [--guidance-min, --guidance-max] (LCM's augmented probability-flow ODE: eps_u + w (eps_c - eps_u)); the student
  is the same UNet with a trainable LoRA (rank --rank on every attention projection, feed-forward, proj_in /
  proj_out, resnet convolution, time_emb_proj and resampling convolution: LCM-LoRA's targets) and no guidance input,
  so the guidance is baked in and the adapter's recommended guidance scale is 1 (no CFG at sampling).
- skipping-step DDIM solver: the 50-point grid t = 20 i + 19 of SD's 1000 training steps (LCM's k = 20); a sample
  is noised to t_{n+k}, the teacher's one DDIM step goes to t_n = t_{n+k} - 20 (0 at the end).
- consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with the boundary scalings of velodiff's ``lcm``
  sampler (its lcm_boundary_scalings) (sigma_data 0.5, timestep scaling 10); loss: pseudo-Huber (c = 0.001) between the student's f at
  t_{n+k} and the target's f at t_n, the target being the student itself without gradient (LCM-LoRA uses no EMA).
- data: the 1347 training digits of ``split.json`` (as scripts/distill_linfusion.py: VAE posterior samples), a random
  prompt template per sample; the LoRA is trained through velodiff's own LoRA branch (velodiff.lora), A initialised
  like PEFT (uniform, 1/sqrt(K)), B zero, so the student starts as the teacher.

Output (--out): a LoRA safetensors in the diffusers / PEFT layout (``unet.<module>.lora_A / lora_B``, alpha = rank,
float16), its metadata holding ``velodiff_lora_defaults`` ({"guidance_scale": 1.0}) and the training record.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from distill_linfusion import alphas_cumprod, encode_training_digits, prompt_embeddings  # noqa: E402
from lora_training import (check_training_args, initial_lora, save_lora, trainable_branches,  # noqa: E402
                           training_parser)
from velodiff.sampling.samplers.lcm import lcm_boundary_scalings  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "..", "python", "velodiff", "data", "digits", "loras", "digits-lcm.safetensors")
#: LCM-LoRA's target modules (diffusers' train_lcm_distill_lora_sd*.py), by the last part(s) of their names
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def consistency(unet, x, t, ctx, alphas):
    a = alphas[t].view(-1, 1, 1, 1)
    eps = unet(x, t, ctx)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    scalings = torch.tensor([lcm_boundary_scalings(float(v)) for v in t]).float()  # the lcm sampler's (c_skip, c_out)
    return scalings[:, 0].view(-1, 1, 1, 1) * x + scalings[:, 1].view(-1, 1, 1, 1) * x0


def main(argv=None) -> int:
    ap = training_parser(__doc__.split("\n\n")[0], DEFAULT_OUT, steps=1500, rank=8, lr=1e-3)
    ap.add_argument("--guidance-min", type=float, default=2.0)
    ap.add_argument("--guidance-max", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    if not 1 <= args.guidance_min <= args.guidance_max:
        ap.error("1 <= --guidance-min <= --guidance-max is required")
    check_training_args(ap, args, more=(("--log-every", args.log_every, 1),))

    import velodiff as vd
    from velodiff.lora import lora_strengths
    pipe = vd.Pipeline.from_pretrained("digits")
    unet = pipe.unet.eval().requires_grad_(False)
    emb, empty = prompt_embeddings(pipe)
    mean, std, labels = encode_training_digits(pipe)
    alphas = alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed + 1)
    pipe.load_lora(initial_lora(unet, args.rank, gen, TARGETS), name="lcm")
    branches, params = trainable_branches(unet)
    log(f"teacher: digits UNet with CFG in [{args.guidance_min}, {args.guidance_max}]; student: LoRA rank {args.rank} "
        f"on {len(branches)} layers ({sum(b.down[:args.rank].numel() + b.up[:, :args.rank].numel() for _, b in branches):,} "
        f"parameters); {len(labels)} digits; {args.steps} steps of batch {args.batch}, lr {args.lr:g}")
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05,
                                                final_div_factor=20)
    skip, grid = 20, torch.arange(50) * 20 + 19
    huber_c = 1e-3
    running, first, t_last = None, None, time.time()
    for step in range(args.steps):
        j = torch.randint(0, len(labels), (args.batch,), generator=gen)
        z0 = pipe.vae.vae_to_latents(mean[j] + std[j] * torch.randn(mean[j].shape, generator=gen))
        tmpl = torch.randint(0, emb.shape[1], (args.batch,), generator=gen)
        ctx = emb[labels[j], tmpl]
        start = grid[torch.randint(0, len(grid), (args.batch,), generator=gen)]
        prev = (start - skip).clamp_min(0)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[start].view(-1, 1, 1, 1)
        x = a.sqrt() * z0 + (1 - a).sqrt() * noise
        w = (args.guidance_min + (args.guidance_max - args.guidance_min)
             * torch.rand(args.batch, generator=gen)).view(-1, 1, 1, 1)
        with torch.no_grad():
            with lora_strengths(pipe, {"lcm": 0.0}):  # the teacher: the UNet without the adapter
                e_c, e_u = unet(torch.cat([x, x]), torch.cat([start, start]),
                                torch.cat([ctx, empty[None].expand_as(ctx)])).chunk(2)
            eps = e_u + w * (e_c - e_u)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            ap_ = alphas[prev].view(-1, 1, 1, 1)
            x_prev = ap_.sqrt() * x0 + (1 - ap_).sqrt() * eps  # one DDIM step of the guided teacher
            target = consistency(unet, x_prev, prev, ctx, alphas)
        pred = consistency(unet, x, start, ctx, alphas)
        loss = (((pred - target) ** 2 + huber_c ** 2).sqrt() - huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        first = value if first is None else first
        if step % args.log_every == 0 or step == args.steps - 1:
            now = time.time()
            log(f"step {step:5d}  loss {running:.5f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"({(now - t_last) / (args.log_every if step else 1):.3f} s/step)")
            t_last = now
    record = {"command": "python scripts/distill_lcm.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "steps": args.steps, "batch": args.batch, "rank": args.rank, "lr": args.lr,
              "guidance_range": [args.guidance_min, args.guidance_max], "loss_first": first, "loss_last": running,
              "seconds": round(time.time() - T0, 1), "torch": torch.__version__}
    count = save_lora(branches, args.rank, args.out, {"velodiff_lora_defaults": json.dumps({"guidance_scale": 1.0}),
                                                      "velodiff_distillation": json.dumps(record)})
    log(f"wrote {args.out} ({count} tensors); loss {first:.5f} -> {running:.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
