"""The real digits the harness judges against: a fixed split, the classifier and the Frechet feature space.

Data: ``sklearn.datasets.load_digits()`` (1797 real 8x8 handwritten digits, pixel values 0..16, 16 = full ink).

Split (fixed): ``train_test_split(arange(1797), test_size=0.5, stratify=target, random_state=0)``, both parts
sorted: half A (898 digits) fits the judge, half B (899 digits, held out from the judge) is what generated images
are compared with.

Reference path: generated images are judged after :func:`velodiff.eval.metrics.to_digits` (gray, exact area
averaging to 8x8, x16). Real digits take the same path at the generated image size: ``v / 16`` is upsampled to
H x W with ``torch.nn.functional.interpolate`` (``upsample="bilinear"``, ``align_corners=False``, the way the
built-in digits models render their training data; ``"nearest"``; or ``"none"``: the raw 8x8 digits, which
``nearest`` upsampling by an integer factor reproduces exactly) and converted back. The bilinear round trip
blurs a digit slightly (each 8x8 pixel becomes ``[1/8, 3/4, 1/8]`` of its row and column neighbours at 2x), a
shift that alone is ~10x the real-vs-real Frechet distance, so a model must be compared with real digits
rendered the way it was taught.

Classifier: ``sklearn.svm.SVC(C=10, gamma="scale")`` fitted on half A (after the reference path), its accuracy on
half B reported as ``heldout_accuracy`` (about 0.99).

Feature space for the Frechet distance: ``sklearn.decomposition.PCA(n_components=20, whiten=True,
svd_solver="full")`` fitted on the raw 8x8 pixel values (0..16) of half A. The map is the same for every model and
every reference path; whitening makes the real digits' covariance the identity (well conditioned for a few hundred
samples and more), so distances are dimensionless. ``real_vs_real`` = FD(half A, half B), both after the reference
path: the floor a perfect generator of ~900 samples would reach.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from velodiff.eval.metrics import (DIGIT_MAX, DIGIT_SIDE, bootstrap, bootstrap_mean, frechet_distance,
                                   frechet_distance_from_stats, gaussian_stats, to_digits)

SPLIT_SEED = 0
PCA_COMPONENTS = 20
UPSAMPLE_MODES = ("bilinear", "nearest", "none")
CLASSIFIER = "SVC(C=10, gamma='scale')"
FEATURE_SPACE = (f"PCA(n_components={PCA_COMPONENTS}, whiten=True, svd_solver='full') fitted on the raw 8x8 pixel "
                 f"values (0..16) of real half A; split train_test_split(arange(1797), test_size=0.5, "
                 f"stratify=target, random_state={SPLIT_SEED})")


def _require_sklearn():
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test extra installs both
        raise ImportError("velodiff.eval needs scikit-learn and scipy: pip install 'velodiff[eval]'") from e


@functools.lru_cache(maxsize=1)
def load_real_digits() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(data [1797, 64] float64 in 0..16, target [1797] int64, half A indices, half B indices), cached."""
    _require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    data, target = digits.data.astype(np.float64), digits.target.astype(np.int64)
    a, b = train_test_split(np.arange(len(target)), test_size=0.5, stratify=target, random_state=SPLIT_SEED)
    return data, target, np.sort(a), np.sort(b)


def render(digits64: np.ndarray, size: Optional[Tuple[int, int]], upsample: str) -> np.ndarray:
    """Real digits [N, 64] (0..16) -> [N, 64] after the reference path at image ``size`` (H, W): upsampled
    ``v / 16`` (float32, as a pipeline's output) then :func:`to_digits`. ``size=None`` or ``upsample="none"``
    returns the digits unchanged (float64)."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    x = np.asarray(digits64, dtype=np.float64)
    if size is None or upsample == "none" or tuple(size) == (DIGIT_SIDE, DIGIT_SIDE):
        return x.copy()
    import torch
    import torch.nn.functional as F
    t = torch.tensor(x.reshape(-1, 1, DIGIT_SIDE, DIGIT_SIDE) / DIGIT_MAX, dtype=torch.float32)
    extra = {"align_corners": False} if upsample == "bilinear" else {}
    up = F.interpolate(t, size=tuple(int(s) for s in size), mode=upsample, **extra).clamp(0, 1)
    return to_digits(up[:, 0].numpy())


class DigitsReference:
    """The judge for one image size and reference path (see the module docstring for every fixed choice).

    ``size``: the generated images' (H, W), or None for images already 8x8; ``upsample``: how real digits are
    rendered at that size ("bilinear", "nearest" or "none")."""

    def __init__(self, size: Optional[Tuple[int, int]] = None, upsample: str = "bilinear"):
        _require_sklearn()
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if size is not None and (len(size) != 2 or min(size) < DIGIT_SIDE):
            raise ValueError(f"size must be (H, W) with H, W >= 8, got {size!r}")
        self.size, self.upsample = (None if size is None else (int(size[0]), int(size[1]))), upsample
        data, target, a, b = load_real_digits()
        self.half_a, self.half_b = a, b
        self.labels_a, self.labels_b = target[a], target[b]
        self.pca = PCA(n_components=PCA_COMPONENTS, whiten=True, svd_solver="full").fit(data[a])
        self.real_a = render(data[a], self.size, upsample)  # [898, 64]
        self.real_b = render(data[b], self.size, upsample)  # [899, 64]
        self.classifier = SVC(C=10, gamma="scale").fit(self.real_a, self.labels_a)
        self.heldout_accuracy = float(np.mean(self.classifier.predict(self.real_b) == self.labels_b))
        self.mu_b, self.sigma_b = gaussian_stats(self.features(self.real_b))
        self.real_vs_real = frechet_distance(self.features(self.real_a), self.features(self.real_b))

    def features(self, digits64: np.ndarray) -> np.ndarray:
        """[N, 64] digits (0..16) -> [N, 20] float64 Frechet features."""
        x = np.asarray(digits64, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != DIGIT_SIDE * DIGIT_SIDE:
            raise ValueError(f"digits must be [N, 64] (see to_digits), got shape {x.shape}")
        return self.pca.transform(x)

    def predict(self, digits64: np.ndarray) -> np.ndarray:
        """[N, 64] digits -> [N] int64 classes from the judge."""
        return self.classifier.predict(np.asarray(digits64, dtype=np.float64)).astype(np.int64)

    def conditional_accuracy(self, digits64: np.ndarray, labels: Sequence[int], n_boot: int = 1000,
                             confidence: float = 0.95, seed: int = 0) -> Dict[str, object]:
        """The share of ``digits64`` [N, 64] the judge assigns to the requested ``labels`` [N] (0..9), with a
        bootstrap percentile interval over images. Returns {"value", "ci_low", "ci_high", "bias", "confidence",
        "n_boot", "per_class": [10] accuracy per requested digit (None where no image asked for it)}."""
        x = np.asarray(digits64, dtype=np.float64)
        y = np.asarray(labels)
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
            raise ValueError(f"labels must be [N] integers in 0..9 matching {len(x)} images, got {labels!r:.80}")
        correct = (self.predict(x) == y).astype(np.float64)
        out: Dict[str, object] = dict(bootstrap_mean(correct, n_boot=n_boot, confidence=confidence, seed=seed))
        out["per_class"] = [float(correct[y == d].mean()) if np.any(y == d) else None for d in range(10)]
        return out

    def frechet(self, digits64: np.ndarray, n_boot: int = 200, confidence: float = 0.95,
                seed: int = 0) -> Dict[str, float]:
        """FD between ``digits64`` [N, 64] (N >= 2) and real half B in the feature space, with a bias-corrected
        bootstrap interval over the generated images (half B held fixed; see :func:`bootstrap`). Adds
        "real_vs_real" (the floor)."""
        f = self.features(digits64)
        if len(f) < 2:
            raise ValueError(f"need at least 2 images for a Frechet distance, got {len(f)}")

        def fd(idx):
            return frechet_distance_from_stats(*gaussian_stats(f[idx]), self.mu_b, self.sigma_b)

        out = bootstrap(fd, len(f), n_boot=n_boot, confidence=confidence, seed=seed, lower_bound=0.0)
        out["real_vs_real"] = self.real_vs_real
        return out


@functools.lru_cache(maxsize=8)
def reference_for(size: Optional[Tuple[int, int]] = None, upsample: str = "bilinear") -> DigitsReference:
    """A cached :class:`DigitsReference` per (size, upsample)."""
    return DigitsReference(size, upsample)
