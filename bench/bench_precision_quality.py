"""Quality of the reduced-precision CPU paths on the built-in models, judged by velodiff.eval (issue 14).

For each model (``digits``: the UNet the CPU bf16 path is built for; ``digits-dit``), each precision as a user gets
it from ``vd.Pipeline.from_pretrained(model, dtype=...)`` on this CPU (fp32; bf16: oneDNN bf16 convolutions and
GEMMs on the packed layout, our bf16 attention), and bf16 with W8A8 transformer linears
(``vd.quant.quantize(pipe, vd.quant.W8A8())``): conditional accuracy and Frechet distance with 95% intervals
(velodiff.eval, the judge fitted on digits the models never saw), at the guidance the README quotes, 20 steps of
dpmpp_2m, ``--per-class`` images per digit, seed 0; and the fidelity to fp32: PSNR of ``--psnr-images`` images of
each class against fp32's images from the same seeds.

  python bench/bench_precision_quality.py [--models digits digits-dit] [--per-class 100] [--psnr-images 4]
Writes <out>/precision_quality_digits.{json,md}.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import check_ranges, load_average, write_results  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import velodiff as vd  # noqa: E402
from velodiff.commands.args import Parser  # noqa: E402
from velodiff.commands.bench import psnr  # noqa: E402
from velodiff.eval import evaluate  # noqa: E402
from velodiff.eval.harness import DEFAULT_PROMPT, generation_step, image_seeds  # noqa: E402

GUIDANCE = {"digits": 3.0, "digits-dit": 1.5}
#: (row name, dtype, quantizer config or None); the first row of each model is the PSNR reference
VARIANTS = (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
            ("bf16+w8a8", torch.bfloat16, vd.quant.W8A8()))


def load(model: str, dtype: torch.dtype, config):
    pipe = vd.Pipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if config is not None:
        vd.quant.quantize(pipe, config, progress=False)
    return pipe


def sample_images(pipe, guidance: float, per_class: int) -> np.ndarray:
    """``per_class`` images of each digit from fixed seeds (the same for every precision), pixels in [0, 1]."""
    labels = np.repeat(np.arange(10), per_class)
    gens = [torch.Generator().manual_seed(s) for s in image_seeds(1, len(labels))]
    with torch.inference_mode():
        images, _, _ = generation_step(pipe)(pipe, labels, gens, prompt_template=DEFAULT_PROMPT,
                                             num_inference_steps=20, guidance_scale=guidance, sampler="dpmpp_2m")
    return np.asarray(images, dtype=np.float64)


def quality_rows(models, variants, per_class: int, psnr_images: int):
    """One row per (model, variant): accuracy and FD with 95% intervals (velodiff.eval, ``per_class`` images per
    digit, 20 steps of dpmpp_2m, seed 0, the guidance of GUIDANCE) and the PSNR of ``psnr_images`` images per class
    against the model's first variant from the same seeds."""
    rows = []
    for model in models:
        reference = None
        for name, dtype, config in variants:
            pipe = load(model, dtype, config)
            r = evaluate(pipe, sampler="dpmpp_2m", steps=20, guidance=GUIDANCE[model], per_class=per_class,
                         seed=0, n_boot=1000, fd_boot=200)
            images = sample_images(pipe, GUIDANCE[model], psnr_images)
            reference = images if reference is None else reference
            rows.append({"model": model, "precision": name, "guidance": GUIDANCE[model], "images": r["num_images"],
                         "accuracy": r["conditional_accuracy"], "accuracy_ci": r["conditional_accuracy_ci"],
                         "fd": r["frechet_distance"], "fd_ci": r["frechet_distance_ci"],
                         "psnr_vs_fp32_db": round(float(psnr(images, reference)), 2),
                         "s_per_image": r["seconds_per_image"]})
            print({k: v for k, v in rows[-1].items()}, flush=True)
    return rows


def quality_parser(description: str, script: str):
    """The flags both quality benches take (--models, --per-class, --psnr-images, --out); ``parse(argv)`` of the
    returned parser also checks their ranges (one line, exit 2)."""
    ap = Parser(description=description)  # one-line errors, exit 2
    ap.add_argument("--models", nargs="+", default=sorted(GUIDANCE), choices=sorted(GUIDANCE))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--psnr-images", type=int, default=4, help="images per class for the PSNR to fp32")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

    def parse(argv=None):
        args = ap.parse_args(argv)
        check_ranges(script, (("--per-class", args.per_class, 1, 100), ("--psnr-images", args.psnr_images, 1, 100)))
        return args
    ap.parse = parse
    return ap


def main():
    args = quality_parser(__doc__.split("\n\n")[0], "bench_precision_quality.py").parse()
    load_start = load_average()
    rows = quality_rows(args.models, VARIANTS, args.per_class, args.psnr_images)
    note = (f"velodiff.eval: {args.per_class} images per digit, 20 steps of dpmpp_2m, seed 0, 95% intervals "
            "(bootstrap); the judge was fitted on digits the models never saw. psnr_vs_fp32_db: "
            f"{args.psnr_images} images of each class against fp32's from the same seeds (pixels in [0, 1]; inf = "
            "identical). bf16: the pipeline loaded with dtype=torch.bfloat16 (its CPU default layout); bf16+w8a8: "
            "then vd.quant.quantize with method w8a8 (default layers). s_per_image on this 2-core CPU.")
    path = write_results("precision_quality_digits", rows,
                         ["model", "precision", "guidance", "images", "accuracy", "accuracy_ci", "fd", "fd_ci",
                          "psnr_vs_fp32_db", "s_per_image"], args.out, note=note,
                         extra={"load_start": load_start, "load_end": load_average()})
    print("wrote", path)


if __name__ == "__main__":
    main()
