"""velodiff.eval.metrics: the image conversion, the Frechet distance against closed forms, the bootstrap."""
import numpy as np
import pytest

from velodiff.eval.metrics import (bootstrap, bootstrap_mean, frechet_distance, frechet_distance_from_stats,
                                   gaussian_stats, to_digits)


@pytest.fixture(scope="module")
def real():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.astype(np.float64), d.target


@pytest.mark.parametrize("factor", [1, 2, 4])
@pytest.mark.parametrize("channels", [None, 1, 3])
def test_nearest_upsampled_digit_maps_back_exactly(real, factor, channels):
    data, _ = real
    x = (data[:50] / 16).astype(np.float32).reshape(-1, 8, 8)
    x = x.repeat(factor, axis=1).repeat(factor, axis=2)
    if channels is not None:
        x = np.repeat(x[..., None], channels, axis=-1)
    out = to_digits(x)
    assert out.dtype == np.float64 and out.shape == (50, 64)
    np.testing.assert_array_equal(out, data[:50])


def test_conversion_area_average_and_inputs(real):
    data, _ = real
    # non-multiple sizes: exact area averaging of a constant image is that constant
    assert np.allclose(to_digits(np.full((2, 13, 21), 0.25)), 4.0)
    # block mean, gray = mean of channels, x16 and clipping
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 16, 16, 3))
    expected = x.mean(-1).reshape(3, 8, 2, 8, 2).mean((2, 4)).reshape(3, 64) * 16
    np.testing.assert_allclose(to_digits(x), expected, rtol=1e-12)
    np.testing.assert_array_equal(to_digits(np.full((1, 8, 8), 2.0)), 16.0)
    # uint8 and PIL inputs
    u8 = np.round(data[:4] / 16 * 255).astype(np.uint8).reshape(-1, 8, 8)
    np.testing.assert_allclose(to_digits(u8), data[:4], atol=16 / 255)
    from PIL import Image
    ims = [Image.fromarray(np.repeat(im[..., None], 3, -1)).resize((32, 32), Image.NEAREST) for im in u8]
    np.testing.assert_allclose(to_digits(ims), to_digits(u8))


@pytest.mark.parametrize("bad, match", [(np.zeros((2, 16, 16, 4)), "C = 1 or 3"), (np.zeros((16, 16)), "shape"),
                                        (np.zeros((2, 4, 4)), "8x8"), (np.full((1, 8, 8), np.nan), "NaN"),
                                        (np.zeros((1, 8, 8), dtype=bool), "dtype")])
def test_conversion_rejects_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        to_digits(bad)


def _diag_closed_form(mu1, v1, mu2, v2):
    """||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2: the Frechet distance of diagonal Gaussians, elementwise."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))


def test_frechet_matches_closed_form_diagonal():
    rng = np.random.default_rng(1)
    for d in (1, 5, 20):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
        got = frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
        assert got == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), rel=1e-10, abs=1e-12)
        # commuting covariances in a rotated basis: same value (the distance is rotation invariant)
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        got = frechet_distance_from_stats(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
        assert got == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), rel=1e-8, abs=1e-10)
    s = np.diag(rng.uniform(0.5, 2, 4))
    assert frechet_distance_from_stats(np.zeros(4), s, np.zeros(4), s) == pytest.approx(0, abs=1e-12)


def test_frechet_general_covariances_independent_formula():
    """Tr (S1 S2)^(1/2) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), computed with eigh only."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_on_synthetic_samples_converges_to_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 0.5, 0.5])
    x = mu1 + np.sqrt(v1) * rng.normal(size=(200_000, 3))
    y = mu2 + np.sqrt(v2) * rng.normal(size=(200_000, 3))
    assert frechet_distance(x, y) == pytest.approx(_diag_closed_form(mu1, v1, mu2, v2), abs=0.02)
    # from the sample statistics exactly
    assert frechet_distance(x, y) == pytest.approx(frechet_distance_from_stats(*gaussian_stats(x),
                                                                               *gaussian_stats(y)), rel=1e-12)


def test_frechet_singular_covariances_are_finite_and_real():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 20)), rng.normal(size=(300, 20))  # rank-4 covariance in 20 dimensions
    value = frechet_distance(x, y)
    assert np.isfinite(value) and value > 0 and isinstance(value, float)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-5)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="features1 and features2"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_bootstrap_contains_point_and_narrows():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(2000, 4))
    mu, sigma = gaussian_stats(ref)
    widths = []
    for n in (100, 400, 1600):
        x = rng.normal(0.3, 1.2, size=(n, 4))
        fd = lambda idx: frechet_distance_from_stats(*gaussian_stats(x[idx]), mu, sigma)  # noqa: E731
        ci = bootstrap(fd, n, n_boot=200, seed=0, lower_bound=0.0)
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
        assert ci["value"] == pytest.approx(fd(np.arange(n)))
        widths.append(ci["ci_high"] - ci["ci_low"])
        acc = bootstrap_mean(rng.uniform(size=n) < 0.8, n_boot=500, seed=0)
        assert acc["ci_low"] <= acc["value"] <= acc["ci_high"]
    assert widths[0] > widths[1] > widths[2]
    # reproducible
    assert bootstrap_mean(np.arange(10.0), seed=3) == bootstrap_mean(np.arange(10.0), seed=3)


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap(lambda i: 0.0, 10, n_boot=1)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean(np.arange(5.0), confidence=1.5)
    with pytest.raises(ValueError, match="n must"):
        bootstrap(lambda i: 0.0, 1)
