"""Asserting a README accuracy claim on a finite sample.

A claim "the model draws the requested digit p of the time" is checked on n images: if the true accuracy were p,
the number of correct images would be Binomial(n, p). The test fails when the observed count is so low that a
model of accuracy p would score it or lower with probability below ``alpha`` (one-sided exact binomial test), so
the margin is the sample's own confidence interval, not a hand-picked slack. The images come from fixed seeds, so
a test's outcome is deterministic.
"""
from __future__ import annotations


def assert_accuracy_claim(correct: int, n: int, claimed: float, alpha: float = 1e-3, what: str = "") -> None:
    """Fail unless ``correct`` of ``n`` is consistent with a true accuracy >= ``claimed`` at level ``alpha``."""
    from scipy.stats import binom
    p_value = float(binom.cdf(correct, n, claimed))  # P(X <= correct | accuracy = claimed)
    lowest_passing = next(k for k in range(n + 1) if binom.cdf(k, n, claimed) >= alpha)
    assert p_value >= alpha, (f"{what}: {correct}/{n} correct ({correct / n:.1%}) is below the README's claim of "
                              f"{claimed:.1%} (P = {p_value:.2g} < {alpha}; at least {lowest_passing}/{n} needed)")
