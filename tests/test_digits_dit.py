"""The built-in ``digits-dit`` model (python/velodiff/data/digits-dit, trained by scripts/train_digits_dit.py):
a class-conditional DiT in miniature that ships, loads by name, fits the size budget together with ``digits``,
is conditioned by its class label, and drives ``velodiff generate --class-label``."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from velodiff.pipelines import BUILTIN_MODELS, DiTPipeline, Pipeline

FOLDER = BUILTIN_MODELS["digits-dit"]


def _size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.from_pretrained("digits-dit")
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_ships_and_both_models_fit_10_mb():
    for name in ("model_index.json", "README.md", "split.json", "transformer/config.json",
                 "transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(FOLDER, name)), name
    assert _size(FOLDER) + _size(BUILTIN_MODELS["digits"]) < 10 * 10 ** 6


def test_components(pipe):
    from velodiff.models.dit import DiTTransformer2DModel
    assert isinstance(pipe, DiTPipeline) and isinstance(pipe.transformer, DiTTransformer2DModel)
    assert pipe.transformer.config.num_embeds_ada_norm == 10
    out = pipe([0, 9], num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 16, 16, 3)


def test_same_vae_as_digits():
    from velodiff.loading import read_safetensors
    a = read_safetensors(os.path.join(FOLDER, "vae", "diffusion_pytorch_model.safetensors"))
    b = read_safetensors(os.path.join(BUILTIN_MODELS["digits"], "vae", "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


#: README: "At 20 steps of `dpmpp_2m` it draws the requested digit 97.3% of the time at guidance 1.5 ... and 99.8% at
#: guidance 3" (bench/results/builtin_quality_digits.md)
CLAIMED_ACCURACY = {1.5: 0.973, 3.0: 0.998}


@pytest.mark.parametrize("guidance", sorted(CLAIMED_ACCURACY))
def test_label_conditions_the_digit_as_claimed(pipe, guidance):
    """The README's accuracy claims on 500 images from other seeds than the measurement's (the judge:
    velodiff.eval, fitted only on digits the model never saw)."""
    pytest.importorskip("sklearn")
    from claims import assert_accuracy_claim
    from velodiff.eval import evaluate
    r = evaluate(pipe, sampler="dpmpp_2m", steps=20, guidance=guidance, per_class=50, seed=1, n_boot=10,
                 fd_boot=10, warmup=False)
    correct = int(round(r["conditional_accuracy"] * r["num_images"]))
    assert_accuracy_claim(correct, r["num_images"], CLAIMED_ACCURACY[guidance],
                          what=f"digits-dit, guidance {guidance}")


def test_generate_cli_class_label(tmp_path):
    from velodiff.cli import main
    assert main(["generate", "--model", "digits-dit", "--class-label", "4", "--num-images", "2", "--steps", "4",
                 "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "001.png").is_file() and (tmp_path / "grid.png").is_file()
    assert main(["generate", "--model", "digits-dit", "--prompt", "a 4", "--outdir", str(tmp_path)]) == 2
    assert main(["generate", "--model", "digits-dit", "--class-label", "12", "--outdir", str(tmp_path)]) == 2


def test_eval_harness_runs_on_dit(pipe):
    pytest.importorskip("sklearn")
    from velodiff.eval import evaluate
    r = evaluate(pipe, steps=4, guidance=3.0, per_class=2, n_boot=20, fd_boot=10, warmup=False)
    assert r["num_images"] == 20 and r["conditioning"] == "class_label" and np.isfinite(r["frechet_distance"])
