"""velodiff's quality harness on handwritten digits (``velodiff eval``).

``evaluate(pipe, sampler=..., steps=..., guidance=..., per_class=N, seed=S)`` generates N images of each digit and
reports conditional accuracy (a scikit-learn classifier fitted on real digits), a Frechet distance to real digits
in a fixed PCA feature space with the real-vs-real floor, bootstrap intervals, seconds and model evaluations per
image. ``judge(images, labels)`` scores images from any source; ``judge_highres(images, labels)`` judges images of
any size at the built-in models' native 16x16 and requires them to look like a digit there
(:mod:`velodiff.eval.highres`). The fixed choices (split, classifier, feature space, image conversion) are documented in :mod:`velodiff.eval.reference` and :func:`velodiff.eval.metrics.to_digits`.
Needs scikit-learn and scipy (``pip install 'velodiff[eval]'``).
"""
from velodiff.eval.metrics import (bootstrap, bootstrap_mean, frechet_distance, frechet_distance_from_stats,
                                   gaussian_stats, to_digits)
from velodiff.eval.reference import DigitsReference, load_real_digits, reference_for, render
from velodiff.eval.highres import HighresReference, highres_reference, judge_highres, render_native, to_native
from velodiff.eval.harness import (DEFAULT_PROMPT, GENERATION_STEPS, RESULT_KEYS, class_label_step, evaluate,
                                   format_table, generation_step, image_seeds, judge, prompt_step)

__all__ = ["evaluate", "judge", "format_table", "to_digits", "frechet_distance", "frechet_distance_from_stats",
           "gaussian_stats", "bootstrap", "bootstrap_mean", "DigitsReference", "reference_for", "render",
           "load_real_digits", "generation_step", "prompt_step", "class_label_step", "GENERATION_STEPS",
           "RESULT_KEYS", "DEFAULT_PROMPT", "image_seeds", "judge_highres", "HighresReference", "highres_reference",
           "to_native", "render_native"]
