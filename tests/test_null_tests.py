"""The per-poison tests of the exact null (stats.null_tests) and the rule for degenerate rows.

Size and power are measured here, not assumed: seeded draws of score sets the size of the
quickstart's (150 poisons), read at alpha = 0.01.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binom

from raysweep.analysis import results
from raysweep.experiment import metrics
from raysweep.experiment.metrics import MIN_PAIRED, paired_residual, residual, residual_interval
from raysweep.science.stats import NULL_TESTS, null_tests, tail_log10p

N, DRAWS, ALPHA = 150, 400, 0.01
# A test of size <= alpha rejects Binomial(DRAWS, alpha) of the draws or fewer; allow up to that
# count's 99.9th percentile (11 of 400), so a correct test fails this check once in 1000 seeds.
MOST = int(binom.ppf(0.999, DRAWS, ALPHA))
# The quickstart table reads each run at 0.01 / its 21 distinct cells (results.indistinguishable).
TABLE_ALPHA = ALPHA / 21


def rejections(draws: list[tuple[np.ndarray, np.ndarray]], alpha: float) -> dict[str, int]:
    """Per test and combined, how many (after, retrain) draws are rejected at alpha."""
    out = dict.fromkeys((*NULL_TESTS, "null_log10p"), 0)
    for after, retrain in draws:
        for k, log10p in null_tests(after, retrain).items():
            out[k] += log10p <= math.log10(alpha)
    return out


def retrain_like(gen: np.random.Generator, rho: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Score sets of a second model that never trained on the noise: N(0, 1) per poison, with
    correlation rho to the retrained model's (both project the same xi_i; the quickstart's euk
    and retrain scores correlate 0.36 to 0.63)."""
    out = []
    for _ in range(DRAWS):
        retrain, own = gen.standard_normal((2, N))
        out.append((rho * retrain + math.sqrt(1 - rho**2) * own, retrain))
    return out


@pytest.mark.parametrize("rho", [0.0, 0.6, 0.95, 1.0])
def test_size_on_never_trained_score_sets(rho):
    """rho = 0: fresh N(0, 1) sets; 0 < rho < 1: retrain-like models; rho = 1: the retrained
    model itself passed as the unlearned one. Every test, and the combination, rejects at most
    ~1 % of them."""
    counts = rejections(retrain_like(np.random.default_rng(0), rho), ALPHA)
    assert max(counts.values()) <= MOST, counts


def test_power_on_score_sets_shifted_like_the_poisoned_model():
    """The quickstart's poisoned model: GUS -1.155. Rejected on every draw, also at the level
    the table reads (0.01 over 21 cells)."""
    gen = np.random.default_rng(1)
    draws = [(gen.standard_normal(N) - 1.155, gen.standard_normal(N)) for _ in range(DRAWS)]
    assert rejections(draws, TABLE_ALPHA)["null_log10p"] == DRAWS


def test_a_few_memorised_poisons_are_rejected_where_r_reads_clean():
    """140 poisons forgotten (N(0, 1)) and 10 still memorised (I = -3): the lower tail holds
    11.4 where 1.5 are expected, and the test rejects on every draw at the table's level, while r
    (poisoned GUS -1.155, retrain N(0, 1)) is about 0.17 and the mean's own z-test (gus_p) does
    not reject on about half of them."""
    gen = np.random.default_rng(2)
    rejected, r, gus_p = 0, [], []
    for _ in range(DRAWS):
        after = np.concatenate([gen.standard_normal(N - 10), np.full(10, -3.0)])
        before, retrain = gen.standard_normal(N) - 1.155, gen.standard_normal(N)
        rejected += null_tests(after, retrain)["null_log10p"] <= math.log10(TABLE_ALPHA)
        units = [-torch.from_numpy(s) for s in (before, after, retrain)]
        r.append(paired_residual(*units))
        gus_p.append(metrics.summarise_scores(torch.from_numpy(after))["gus_p"])
    assert rejected == DRAWS
    # r as small as the quickstart's bad_teacher (0.15), which r calls close to retraining
    assert np.median(r) < 0.25 and np.mean(np.abs(r) < 0.3) > 0.9
    assert np.mean(np.asarray(gus_p) > ALPHA) > 0.4


def test_tail_p_stays_finite_in_log_space():
    assert tail_log10p(0, N) == pytest.approx(0.0, abs=1e-12)
    assert tail_log10p(10, N) == pytest.approx(binom.logsf(9, N, 0.01) / math.log(10))
    assert binom.logsf(2999, 5000, 0.01) == -math.inf  # scipy's saturates ...
    assert tail_log10p(3000, 5000) == pytest.approx(-4549.24, abs=0.01)  # ... the sum does not


def test_null_tests_are_nan_with_too_many_degenerate_scores():
    gen = np.random.default_rng(3)
    after, retrain = gen.standard_normal((2, N))
    assert math.isfinite(null_tests(after, retrain)["null_log10p"])
    after[: int(0.06 * N)] = np.nan  # 6 % degenerate: past MAX_DEGENERATE
    assert all(math.isnan(v) for v in null_tests(after, retrain).values())


def test_degenerate_rows_pair_r_and_its_interval():
    """r and its interval are computed on the units all three models score, and are NaN once
    fewer than MIN_PAIRED of them remain."""
    gen = torch.Generator().manual_seed(4)
    before, after, retrain = torch.randn(3, 100, generator=gen, dtype=torch.float64)
    before, after = before + 1.0, after + 0.3
    # Without NaN, r is the ratio of the plain means, bit for bit.
    expected = residual(after.mean().item(), before.mean().item(), retrain.mean().item())
    assert paired_residual(before, after, retrain) == expected
    # NaN at different poisons in different models: all three lose the union of those poisons.
    before[0], after[1], retrain[2] = math.nan, math.nan, math.nan
    keep = torch.arange(100) >= 3
    b, a, r = before[keep], after[keep], retrain[keep]
    assert paired_residual(before, after, retrain) == residual(
        a.mean().item(), b.mean().item(), r.mean().item()
    )
    unpaired = residual(*(torch.nanmean(u).item() for u in (after, before, retrain)))
    assert paired_residual(before, after, retrain) != unpaired
    assert residual_interval(
        before, after, retrain, torch.Generator().manual_seed(5)
    ) == residual_interval(b, a, r, torch.Generator().manual_seed(5))
    # Past the share: NaN, not a ratio over whichever poisons remain.
    after[3 : 3 + math.ceil((1 - MIN_PAIRED) * 100)] = math.nan
    assert math.isnan(paired_residual(before, after, retrain))
    assert all(math.isnan(x) for x in residual_interval(before, after, retrain, gen))


def test_rows_store_the_tests_and_the_table_reads_them(finished_run):
    """Each Gaussian row's null columns are null_tests of its stored scores; the table reads the
    retrain reference as indistinguishable on every seed, at 0.01 over its distinct cells."""
    df = pd.read_parquet(f"{finished_run}/results")
    for row in df[df["status"] == "ok"].to_dict("records"):
        expected = null_tests(np.asarray(row["after_scores"]), np.asarray(row["retrain_scores"]))
        for k, v in expected.items():
            assert row[k] == pytest.approx(v, nan_ok=True), k
    table = results.table(df)
    retrain = table[table["method"] == "retrain"].iloc[0]
    assert retrain["indistinguishable"] == retrain["n"]
    cells = table[table["source"] != "reference"]
    distinct = cells.drop_duplicates(["method", "from_budget", "tuned_trial"])
    assert table["null_alpha"].eq(ALPHA / len(distinct)).all()
    assert (cells["indistinguishable"] <= cells["n"]).all()
