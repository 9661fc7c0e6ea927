"""The statistics of the per-poison Gaussian scores and the thresholds the rows are judged by,
in numpy and scipy only: the report reads them without torch (metrics.py measures, on models).

Under the null "the model never trained on the noise" each score I_i is N(0, 1) exactly
(metrics.py says why), so every test here is against a known distribution. Tail probabilities
are computed in log space: a poisoned model's p underflows float64 at a few thousand poisons.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp
from scipy.stats import binom, ks_2samp, kstest, kstwo, norm

FPR = 0.01
Z_AT_FPR = float(norm.ppf(FPR))  # one-sided threshold on I: about -2.326
Z_HIGH = float(norm.isf(FPR))  # about +2.326: the upper tail, where an overshoot shows
# A Gaussian poison is detected (the attack worked, or survives unlearning) when its model's
# z = mean(I)·√n is at or below this: two-sided p < 0.01 and negative (records.gaussian_check).
Z_DETECTED = float(norm.ppf(0.005))

# A model whose poison scores are degenerate (zero or non-finite input gradient) on more than this
# fraction of the poisons cannot score as unlearned: its gus rests on the few rows left, and a
# dead model (every gradient 0) would otherwise read as "no trace of the noise".
MAX_DEGENERATE = 0.05

MAX_RESOLUTION = 0.25  # attack_ok needs r resolved to about +-0.25 (metrics.resolution)

# Per-poison tests of the exact null (issue 24). gus is a mean, so a model that forgot most
# poisons but still fits a few reads as clean; these look at the whole score set. Each is a
# log10 p-value against "the model never trained on the noise": I_i ~ N(0, 1) independently on
# the poisons where the model's own gradient is informative. Selecting them by that gradient
# keeps the null exact, as it does not depend on xi_i; selecting by the poisoned model's would not.
NULL_ALPHA = 0.01  # the table's level for "indistinguishable", before correcting for its cells
NULL_TESTS = ("null_ks_log10p", "null_low_log10p", "null_high_log10p", "null_retrain_log10p")


def tail_log10p(k: int, n: int, q: float = FPR) -> float:
    """log10 P(X >= k), X ~ Binomial(n, q): the exact one-sided p of k or more of n scores in a
    tail of probability q, summed in log space (scipy's binom.logsf is -inf once p underflows)."""
    return float(logsumexp(binom.logpmf(np.arange(k, n + 1), n, q))) / math.log(10)


def null_tests(after: np.ndarray, retrain: np.ndarray) -> dict[str, float]:
    """log10 p-values that the unlearned model's per-poison scores `after` (NaN = degenerate) come
    from a model that never trained on the noise: per test (NULL_TESTS), and `null_log10p`, their
    Bonferroni combination (min p x 4: the row is rejected at alpha when any test is at alpha / 4).

    null_ks: one-sample Kolmogorov-Smirnov against N(0, 1), exact (kstwo's logsf, finite to p ~
    1e-300). null_low / null_high: the count of scores <= Phi^-1(0.01) / >= Phi^-1(0.99) against
    1 % each, exact binomial, one-sided (an excess in either tail is a trace; a deficit is already
    the KS test's, and 150 poisons expect only 1.5 per tail). null_retrain: two-sample KS against
    the retrained model's scores; the two score the same xi_i, so their scores correlate
    positively and this test is conservative. All NaN when fewer than 1 - MAX_DEGENERATE of either
    model's scores are informative: the row is infeasible, and its tests would see few poisons.
    """
    a, r = after[~np.isnan(after)], retrain[~np.isnan(retrain)]
    if min(len(a) / max(len(after), 1), len(r) / max(len(retrain), 1)) < 1 - MAX_DEGENERATE:
        return dict.fromkeys((*NULL_TESTS, "null_log10p"), math.nan)
    parts = [
        float(kstwo.logsf(kstest(a, "norm").statistic, len(a))) / math.log(10),
        tail_log10p(int((a <= Z_AT_FPR).sum()), len(a)),
        tail_log10p(int((a >= Z_HIGH).sum()), len(a)),
        math.log10(ks_2samp(a, r).pvalue),
    ]
    return dict(zip(NULL_TESTS, parts)) | {
        "null_log10p": min(0.0, math.log10(len(parts)) + min(parts))
    }


def anderson_darling(scores: np.ndarray) -> float:
    """The Anderson-Darling distance of per-poison scores (NaN = degenerate, left out) from
    N(0, 1), per poison: A^2 / n, the squared gap between their empirical CDF and Phi weighted by
    1 / (Phi (1 - Phi)), so a shift either way (an overshoot too) and a few poisons deep in
    either tail both count. Never trained on the noise: n A^2 / n has mean 1 (sd about 0.76).
    Phi's logs come from logcdf / logsf, finite however far out a score lies."""
    s = scores[~np.isnan(scores)]
    return float(anderson_darling_rows(s[None, :])[0]) if len(s) else math.nan


def anderson_darling_rows(scores: np.ndarray) -> np.ndarray:
    """`anderson_darling` of each row of a (k, n) array without NaN, n >= 1 (e.g. k bootstrap
    resamples of one model's scores), in one pass."""
    s = np.sort(scores, axis=1)
    n = s.shape[1]
    weights = 2 * np.arange(1, n + 1) - 1
    logs = norm.logcdf(s) + norm.logsf(s[:, ::-1])
    return -1.0 - (logs * weights).sum(axis=1) / n**2
