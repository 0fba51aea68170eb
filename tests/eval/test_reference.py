"""The judge on real digits: classifier accuracy, label shuffling, the real-vs-real floor, corruptions."""
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


def test_split_is_fixed_and_disjoint(real):
    data, target, a, b = real
    assert len(a) + len(b) == len(data) == 1797 and not set(a) & set(b)
    assert np.array_equal(a, np.sort(a)) and abs(len(a) - len(b)) <= 1
    assert np.all(np.bincount(target[a]) >= 85) and np.all(np.bincount(target[b]) >= 85)  # stratified


@pytest.mark.parametrize("size, mode", [(None, "none"), ((16, 16), "bilinear"), ((32, 24), "nearest")])
def test_classifier_heldout_accuracy_is_high(size, mode):
    assert reference_for(size, mode).heldout_accuracy > 0.95


def test_real_heldout_digits_score_high_and_shuffled_near_chance(real, ref16):
    data, target, a, b = real
    images = _images(data[b])
    good = judge(images, target[b], n_boot=200, fd_boot=20)
    assert good["conditional_accuracy"] > 0.95
    assert good["conditional_accuracy_ci"][0] <= good["conditional_accuracy"] <= good["conditional_accuracy_ci"][1]
    assert min(good["per_class_accuracy"]) > 0.85
    shuffled = np.random.default_rng(0).permutation(target[b])
    bad = judge(images, shuffled, n_boot=200, fd_boot=20)
    assert 0.03 < bad["conditional_accuracy"] < 0.2  # chance is 0.1
    # raw 8x8 digits given as 8x8 images (no reference path) score as high
    assert judge(data[b].reshape(-1, 8, 8) / 16, target[b], upsample="none", n_boot=50,
                 fd_boot=10)["conditional_accuracy"] > 0.95


def test_real_vs_real_floor_is_small(real, ref16):
    data, target, a, b = real
    # half A as "generated" against half B is the floor itself
    fd = ref16.frechet(render(data[a], (16, 16), "bilinear"), n_boot=50)
    assert fd["value"] == pytest.approx(ref16.real_vs_real, rel=1e-9)
    assert fd["ci_low"] <= fd["value"] <= fd["ci_high"]
    assert ref16.real_vs_real < 0.5
    assert reference_for(None, "none").real_vs_real < 0.5
    # the rendering matters: raw digits against bilinear-rendered ones are far apart
    assert ref16.frechet(data[a], n_boot=10)["value"] > 5 * ref16.real_vs_real


def _blur(x, sigma):
    """Gaussian blur of [N, 16, 16, 3] images (separable, reflect padding)."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[:, i:i + x.shape[1], :, :] for i in range(2 * r + 1))
    return sum(k[i] * rows[:, :, i:i + x.shape[2], :] for i in range(2 * r + 1))


def test_frechet_grows_monotonically_with_corruption(real, ref16):
    data, target, a, b = real
    images = _images(data[a])
    floor = ref16.real_vs_real

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
