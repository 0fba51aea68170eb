"""The judge on real digits: one split, fitted on held-out digits only, accuracy, label shuffling, the floor,
corruptions."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from velodiff.eval import judge, load_real_digits, reference_for, render, to_digits


@pytest.fixture(scope="module")
def real():
    data, target, a, b = load_real_digits()
    return data, target, a, b


@pytest.fixture(scope="module")
def ref16():
    return reference_for((16, 16), "bilinear")


def _images(digits64, size=16, mode="bilinear"):
    """Real digits rendered as a pipeline would return them: [N, size, size, 3] float32 in [0, 1]."""
    t = torch.tensor(digits64.reshape(-1, 1, 8, 8) / 16, dtype=torch.float32)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(t, size=(size, size), mode=mode, **extra)[:, 0].clamp(0, 1).numpy()
    return np.repeat(up[..., None], 3, axis=-1)


def test_one_split_from_the_built_in_folders(real):
    """The judge reads the built-in generators' training record: both folders hold the same split.json, and it is
    the seeded stratified split the training scripts make."""
    from sklearn.model_selection import train_test_split

    from velodiff.eval.reference import SPLIT_FILE, read_split
    data, target, train, heldout = real
    dit_split = os.path.join(os.path.dirname(os.path.dirname(SPLIT_FILE)), "digits-dit", "split.json")
    with open(SPLIT_FILE) as f, open(dit_split) as g:
        assert json.load(f) == json.load(g)
    tr, te = train_test_split(np.arange(1797), test_size=0.25, stratify=target, random_state=0)
    assert np.array_equal(train, np.sort(tr)) and np.array_equal(heldout, np.sort(te))
    assert len(train) == 1347 and len(heldout) == 450 and not set(train) & set(heldout)
    assert np.all(np.bincount(target[heldout]) >= 43)  # stratified: 43..46 of each digit
    for a, b in ((train, heldout), read_split()):
        assert np.array_equal(a, np.sort(a))


def test_judge_is_fitted_on_held_out_digits_only(real, ref16):
    """Every fitted part of the judge saw only the 450 held-out digits: the SVC's support vectors are held-out
    digits, the PCA's mean and the reference mean are theirs."""
    data, target, train, heldout = real
    rendered = render(data, (16, 16), "bilinear")
    sv = ref16.classifier.support_vectors_
    heldout_rows = {r.tobytes() for r in rendered[heldout]}
    assert all(r.tobytes() in heldout_rows for r in sv)
    np.testing.assert_allclose(ref16.pca.mean_, data[heldout].mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref16.mu_ref, ref16.features(rendered[heldout]).mean(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, mode", [(None, "none"), ((16, 16), "bilinear"), ((32, 24), "nearest")])
def test_classifier_accuracy_on_digits_it_never_saw(size, mode):
    ref = reference_for(size, mode)
    assert ref.heldout_accuracy > 0.95 and ref.cv_accuracy > 0.95


def test_unseen_real_digits_score_high_and_shuffled_near_chance(real, ref16):
    data, target, train, heldout = real
    images = _images(data[train])
    good = judge(images, target[train], n_boot=200, fd_boot=20)
    assert good["conditional_accuracy"] == pytest.approx(ref16.heldout_accuracy, abs=1e-12)
    assert good["conditional_accuracy_ci"][0] <= good["conditional_accuracy"] <= good["conditional_accuracy_ci"][1]
    assert min(good["per_class_accuracy"]) > 0.85
    shuffled = np.random.default_rng(0).permutation(target[train])
    bad = judge(images, shuffled, n_boot=200, fd_boot=20)
    assert 0.05 < bad["conditional_accuracy"] < 0.15  # chance is 0.1
    # raw 8x8 digits given as 8x8 images (no reference path) score as high
    assert judge(data[train].reshape(-1, 8, 8) / 16, target[train], upsample="none", n_boot=50,
                 fd_boot=10)["conditional_accuracy"] > 0.95


def test_floor_is_what_real_digits_of_that_size_score(real, ref16):
    """The floor at n images is the mean distance of n unseen real digits; a fresh class-balanced draw of real
    digits lands within a few of the draws' standard deviations of it, and the floor falls as n grows."""
    data, target, train, heldout = real
    rng = np.random.default_rng(123)
    for per_class in (10, 30):
        idx = np.concatenate([rng.choice(train[target[train] == d], per_class, replace=False) for d in range(10)])
        fd = ref16.frechet(render(data[idx], (16, 16), "bilinear"), target[idx], n_boot=50)
        assert fd["floor_n"] == 10 * per_class
        assert abs(fd["value"] - fd["floor"]) < 4 * fd["floor_std"], fd
        assert fd["ci_low"] <= fd["value"] <= fd["ci_high"]
    floors = [ref16.floor([n] * 10)["value"] for n in (5, 20, 100)]
    assert floors[0] > floors[1] > floors[2] > 0
    # a class runs out of training digits: the floor says how many real digits it used
    big = ref16.floor([200] * 10)
    assert big["n"] == len(train)
    # labels given or not: the same class counts give the same floor
    even = ref16.frechet(render(data[train[:300]], (16, 16), "bilinear"), n_boot=10)
    assert even["floor"] == pytest.approx(ref16.floor([30] * 10)["value"], rel=1e-12)


def test_rendering_and_memorisation(real, ref16):
    """The rendering matters (raw digits against bilinear-rendered ones are far from the floor), and a generator
    that repeats a few digits is far above the floor however real those digits are."""
    data, target, train, heldout = real
    floor = ref16.floor([45] * 10)["value"]
    assert ref16.frechet(data[train[:450]], n_boot=10)["value"] > 5 * floor
    few = np.concatenate([np.repeat(train[target[train] == d][:3], 15) for d in range(10)])
    assert ref16.frechet(render(data[few], (16, 16), "bilinear"), target[few], n_boot=10)["value"] > 3 * floor


def _blur(x, sigma):
    """Gaussian blur of [N, 16, 16, 3] images (separable, reflect padding)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[:, i:i + x.shape[1], :, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, :, i:i + x.shape[2], :] for i in range(2 * r + 1))


def test_frechet_grows_monotonically_with_corruption(real, ref16):
    data, target, train, heldout = real
    images = _images(data[train])
    floor = ref16.floor([len(train) // 10] * 10)["value"]

    def fd(x):
        return ref16.frechet(to_digits(np.clip(x, 0, 1)), n_boot=10)["value"]

    blurred = [fd(_blur(images, s)) for s in (0.7, 1.0, 1.5, 2.5)]
    rng = np.random.default_rng(0)
    noise = rng.normal(size=images.shape[:3])[..., None]
    noised = [fd(images + s * noise) for s in (0.2, 0.4, 0.8, 1.2)]
    constant = fd(np.full_like(images, images.mean()) + 1e-3 * noise)
    for values in (blurred, noised):
        assert values[0] > 2 * floor
        assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    assert constant > max(blurred[-1], 10 * floor)
