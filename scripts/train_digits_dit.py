#!/usr/bin/env python3
"""Train velodiff's built-in ``digits-dit`` model: a class-conditional DiT in miniature on scikit-learn's digits.

    python scripts/train_digits_dit.py                  # train, save python/velodiff/data/digits-dit, quick check
    python scripts/train_digits_dit.py --eval-only      # only the quality check of the saved folder

Same data, split and upsampling as ``scripts/train_digits.py`` (its helpers are imported from there), and the
same latent space: the autoencoder is ``digits``' AutoencoderKL (16x16x3 <-> 8x8x4), copied unchanged into the
new folder, so only the transformer is trained here.

Model: diffusers' ``DiTTransformer2DModel`` (adaLN-Zero, patch 2 on the 8x8x4 latents = 16 tokens, width 96,
6 blocks, 4 heads), ``num_embeds_ada_norm = 10`` (class d = digit d, class 10 = the learned null class),
epsilon prediction on DiT's linear beta schedule (1e-4 .. 0.02, T = 1000), the label replaced by the null class
10% of the time (classifier-free guidance). EMA weights, stored in float16, saved as an ordinary diffusers
``DiTPipeline`` folder. Seeded; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_digits as td  # noqa: E402  (the shared data, split and classifier helpers)

DATA = os.path.join(HERE, "..", "python", "velodiff", "data")
DEFAULT_OUT = os.path.join(DATA, "digits-dit")
DEFAULT_VAE = os.path.join(DATA, "digits", "vae")
SEED = 10
NUM_CLASSES = 10
DROP_LABEL = 0.10
BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def transformer_config():
    return dict(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=4, num_layers=6,
                sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
                activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
                norm_eps=1e-6)


def train_dit(latents_mean, latents_std, labels, steps: int, batch: int = 128):
    from diffusers import DDPMScheduler, DiTTransformer2DModel
    torch.manual_seed(SEED)
    dit = DiTTransformer2DModel(**transformer_config())
    log(f"DiT: {sum(p.numel() for p in dit.parameters()):,} parameters; {steps} steps of batch {batch}")
    alphas = DDPMScheduler(**BETAS).alphas_cumprod.float()
    params = list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05,
                                                final_div_factor=20)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(SEED + 1)
    dit.train()
    t_last, running = time.time(), 0.0
    for step in range(steps):
        j = torch.randint(0, len(labels), (batch,), generator=gen)
        z0 = latents_mean[j] + latents_std[j] * torch.randn(latents_mean[j].shape, generator=gen)
        y = labels[j].clone()
        y[torch.rand(batch, generator=gen) < DROP_LABEL] = NUM_CLASSES
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = dit(zt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        td.train_step(loss, opt, sched, params, ema, step)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == steps - 1:
            now = time.time()
            log(f"  dit step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"({(now - t_last) / (200 if step else 1):.3f} s/step)")
            t_last = now
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return dit.eval()


def save(out: str, vae, dit, train_idx, test_idx, info):
    from diffusers import DiTPipeline, DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(**BETAS, prediction_type="epsilon")
    pipe = DiTPipeline(transformer=dit.half(), vae=vae.half(), scheduler=scheduler,
                       id2label={d: td.WORDS[d] for d in range(NUM_CLASSES)})
    td.write_folder(pipe, out, train_idx, test_idx, info)


def draw_label(pipe, digit: int, count: int, **kwargs):
    """``count`` images of class ``digit`` from the DiT pipeline ([count, 3, H, W] in [0, 1])."""
    return pipe([digit] * count, output_type="pt", **kwargs).images


def main(argv=None) -> int:
    from diffusers import AutoencoderKL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--vae", default=DEFAULT_VAE, help="the digits AutoencoderKL folder to reuse")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-per-digit", type=int, default=100)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="*", default=[1.5, 3.0, 4.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out)
    if not args.eval_only:
        images, labels, train_idx, test_idx = td.load_data()
        x_train, y_train = images[train_idx], labels[train_idx]
        vae = AutoencoderKL.from_pretrained(os.path.abspath(args.vae), torch_dtype=torch.float32).eval()
        scaling = float(vae.config.scaling_factor)
        with torch.no_grad():
            post = vae.encode(x_train).latent_dist
        log(f"data: {len(train_idx)} training digits encoded with {args.vae} (scaling_factor {scaling:.4f})")
        t_dit = time.time()
        dit = train_dit(post.mean * scaling, post.std * scaling, y_train, args.steps)
        t_dit = time.time() - t_dit
        info = {"seed": SEED, "command": "python scripts/train_digits_dit.py", "steps": args.steps,
                "threads": args.threads, "dit_seconds": round(t_dit, 1), "vae": "copied from digits/vae",
                "torch": torch.__version__}
        save(out, vae, dit, train_idx, test_idx, info)
    if args.eval_per_digit > 0:
        td.quality_check(out, args.guidance, args.eval_per_digit, args.eval_steps, draw=draw_label)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
