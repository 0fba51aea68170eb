"""The real digits the harness judges against: one split, the judge fitted on held-out digits only, the floor.

Data: ``sklearn.datasets.load_digits()`` (1797 real 8x8 handwritten digits, pixel values 0..16, 16 = full ink).

Split: the one recorded in the built-in folders' ``split.json`` (``python/velodiff/data/digits/split.json``; the
``digits-dit`` folder holds an identical copy): ``train_test_split(range(1797), test_size=0.25, stratify=target,
random_state=0)``. The 1347 *training* digits are the only ones the built-in generators ever saw; the 450
*held-out* digits are the only ones the judge ever sees:

- the classifier (``SVC(C=10, gamma="scale")``) is fitted on the 450 held-out digits after the reference path;
- the Frechet feature space (``PCA(n_components=20, whiten=True, svd_solver="full")``) is fitted on their raw
  8x8 values (0..16);
- the Frechet reference statistics (mean and covariance) are theirs, after the reference path.

So a generator that memorised its training digits earns nothing from the judge: no digit it saw is one the judge
was fitted on or compares with.

The judge's own accuracy is reported two ways, both on digits it was not fitted on: ``heldout_accuracy``, on the
1347 training digits (after the reference path), and ``cv_accuracy``, 5-fold stratified cross-validation on the
450 held-out digits.

The Frechet floor: the Frechet distance of a finite sample is biased upwards, more so for smaller samples, so a
distance is only meaningful next to what real digits of the same sample size score. :meth:`DigitsReference.floor`
draws ``n`` real digits with the same class counts as the generated images from the 1347 training digits (real
digits the judge never saw, like generated ones; without replacement, at most all of a class), renders them by
the reference path and averages their distance to the reference over ``FLOOR_DRAWS`` seeded draws: the distance a
perfect generator of the data distribution would score with that many images.

Reference path: generated images are judged after :func:`velodiff.eval.metrics.to_digits` (gray, exact area
averaging to 8x8, x16). Real digits take the same path at the generated image size: ``v / 16`` is upsampled to
H x W with ``torch.nn.functional.interpolate`` (``upsample="bilinear"``, ``align_corners=False``, the way the
built-in digits models render their training data; ``"nearest"``; or ``"none"``: the raw 8x8 digits, which
``nearest`` upsampling by an integer factor reproduces exactly) and converted back. The bilinear round trip
blurs a digit slightly (each 8x8 pixel becomes ``[1/8, 3/4, 1/8]`` of its row and column neighbours at 2x), a
shift that alone is ~10x the floor, so a model must be compared with real digits rendered the way it was taught.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from velodiff.eval.metrics import (DIGIT_MAX, DIGIT_SIDE, bootstrap, bootstrap_mean, frechet_distance_from_stats,
                                   gaussian_stats, to_digits)

#: the split every judge uses: the built-in generators' training record
SPLIT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "digits",
                          "split.json")
NUM_DIGITS = 1797
PCA_COMPONENTS = 20
#: seeded draws of real digits averaged into the Frechet floor
FLOOR_DRAWS = 20
CV_FOLDS = 5
UPSAMPLE_MODES = ("bilinear", "nearest", "none")
CLASSIFIER = "SVC(C=10, gamma='scale') fitted on the 450 held-out digits of split.json"
FEATURE_SPACE = (f"PCA(n_components={PCA_COMPONENTS}, whiten=True, svd_solver='full') fitted on the raw 8x8 pixel "
                 "values (0..16) of the 450 held-out digits of split.json (train_test_split(range(1797), "
                 "test_size=0.25, stratify=target, random_state=0)); reference: the same 450 digits")


def _require_sklearn():
    try:
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:  # pragma: no cover - the test extra installs both
        raise ImportError("velodiff.eval needs scikit-learn and scipy: pip install scikit-learn scipy") from e


def read_split(path: str = SPLIT_FILE) -> Tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), each sorted int64, from a ``split.json``; checked to be disjoint
    and to cover all 1797 digits."""
    with open(path) as f:
        split = json.load(f)
    train, heldout = (np.sort(np.asarray(split[k], dtype=np.int64)) for k in ("train", "test"))
    if (len(np.intersect1d(train, heldout)) or len(np.union1d(train, heldout)) != NUM_DIGITS
            or train.min() < 0 or heldout.max() >= NUM_DIGITS):
        raise ValueError(f"{path}: 'train' and 'test' must split range({NUM_DIGITS}) into two disjoint parts")
    return train, heldout


@functools.lru_cache(maxsize=1)
def load_real_digits() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(data [1797, 64] float64 in 0..16, target [1797] int64, training indices [1347], held-out indices [450]),
    cached. The generators were trained on the first part; the judge is fitted on the second."""
    _require_sklearn()
    from sklearn.datasets import load_digits
    digits = load_digits()
    train, heldout = read_split()
    return digits.data.astype(np.float64), digits.target.astype(np.int64), train, heldout


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


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if (y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer) or (n and (y.min() < 0 or
                                                                                          y.max() > 9))):
        raise ValueError(f"labels must be [N] integers in 0..9 matching {n} images, got {labels!r:.80}")
    return y.astype(np.int64)


class ClassMatchedFloor:
    """The Frechet floor of a judge: what a sample of real digits of the same class counts scores. Needs
    ``labels_train`` [N], ``real_train`` (the real training digits in the judge's input form), ``features(x)``,
    ``_fd(features)`` and a ``_floors`` dict cache."""

    def floor(self, class_counts: Sequence[int]) -> Dict[str, float]:
        """The Frechet floor for a sample with ``class_counts`` [10] images per digit: the mean (and standard
        deviation) over :data:`FLOOR_DRAWS` seeded draws of the distance between that many real training digits
        (per class, without replacement, capped at the class's size) and the reference. Returns {"value",
        "std", "n"} (n: the real sample's size, smaller than sum(class_counts) only where a class ran out)."""
        counts = tuple(int(c) for c in class_counts)
        if len(counts) != 10 or min(counts) < 0 or sum(counts) < 2:
            raise ValueError(f"class_counts must be 10 counts >= 0 summing to >= 2, got {class_counts!r}")
        if counts not in self._floors:
            rng = np.random.default_rng(0)
            pools = [np.flatnonzero(self.labels_train == d) for d in range(10)]
            taken = [min(c, len(p)) for c, p in zip(counts, pools)]
            feats = self.features(self.real_train)
            values = [self._fd(feats[np.concatenate([rng.choice(p, t, replace=False) for p, t in zip(pools, taken)])])
                      for _ in range(FLOOR_DRAWS)]
            self._floors[counts] = {"value": float(np.mean(values)), "std": float(np.std(values, ddof=1)),
                                    "n": int(sum(taken))}
        return dict(self._floors[counts])


class DigitsReference(ClassMatchedFloor):
    """The judge for one image size and reference path (see the module docstring for every fixed choice).

    ``size``: the generated images' (H, W), or None for images already 8x8; ``upsample``: how real digits are
    rendered at that size ("bilinear", "nearest" or "none")."""

    def __init__(self, size: Optional[Tuple[int, int]] = None, upsample: str = "bilinear"):
        _require_sklearn()
        from sklearn.decomposition import PCA
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.svm import SVC
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if size is not None and (len(size) != 2 or min(size) < DIGIT_SIDE):
            raise ValueError(f"size must be (H, W) with H, W >= 8, got {size!r}")
        self.size, self.upsample = (None if size is None else (int(size[0]), int(size[1]))), upsample
        data, target, train, heldout = load_real_digits()
        self.train_indices, self.heldout_indices = train, heldout
        self.labels_train, self.labels_heldout = target[train], target[heldout]
        self.pca = PCA(n_components=PCA_COMPONENTS, whiten=True, svd_solver="full").fit(data[heldout])
        self.real_train = render(data[train], self.size, upsample)  # [1347, 64]: never seen by the judge
        self.real_heldout = render(data[heldout], self.size, upsample)  # [450, 64]: the judge's own digits
        self.classifier = SVC(C=10, gamma="scale").fit(self.real_heldout, self.labels_heldout)
        self.heldout_accuracy = float(np.mean(self.classifier.predict(self.real_train) == self.labels_train))
        folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=0)
        self.cv_accuracy = float(np.mean(cross_val_score(SVC(C=10, gamma="scale"), self.real_heldout,
                                                         self.labels_heldout, cv=folds)))
        self.mu_ref, self.sigma_ref = gaussian_stats(self.features(self.real_heldout))
        self._floors: Dict[Tuple[int, ...], Dict[str, float]] = {}

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
        y = _check_labels(labels, len(x))
        correct = (self.predict(x) == y).astype(np.float64)
        out: Dict[str, object] = dict(bootstrap_mean(correct, n_boot=n_boot, confidence=confidence, seed=seed))
        out["per_class"] = [float(correct[y == d].mean()) if np.any(y == d) else None for d in range(10)]
        return out

    def _fd(self, features: np.ndarray) -> float:
        return frechet_distance_from_stats(*gaussian_stats(features), self.mu_ref, self.sigma_ref)

    def frechet(self, digits64: np.ndarray, labels: Optional[Sequence[int]] = None, n_boot: int = 200,
                confidence: float = 0.95, seed: int = 0) -> Dict[str, float]:
        """FD between ``digits64`` [N, 64] (N >= 2) and the reference in the feature space, with a bias-corrected
        bootstrap interval over the generated images (the reference held fixed; see :func:`bootstrap`). Adds the
        floor for the same sample size (:meth:`floor`; class counts from ``labels`` [N] when given, else N
        spread over the digits as evenly as possible): "floor", "floor_std", "floor_n"."""
        f = self.features(digits64)
        if len(f) < 2:
            raise ValueError(f"need at least 2 images for a Frechet distance, got {len(f)}")
        if labels is None:
            counts = [len(f) // 10 + (d < len(f) % 10) for d in range(10)]
        else:
            counts = np.bincount(_check_labels(labels, len(f)), minlength=10).tolist()
        out = bootstrap(lambda idx: self._fd(f[idx]), len(f), n_boot=n_boot, confidence=confidence, seed=seed,
                        lower_bound=0.0)
        fl = self.floor(counts)
        out.update(floor=fl["value"], floor_std=fl["std"], floor_n=fl["n"])
        return out


@functools.lru_cache(maxsize=8)
def reference_for(size: Optional[Tuple[int, int]] = None, upsample: str = "bilinear") -> DigitsReference:
    """A cached :class:`DigitsReference` per (size, upsample)."""
    return DigitsReference(size, upsample)
