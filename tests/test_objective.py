"""The spec's `objective` (issue 24, part 5): what each study minimises on val.

anderson_darling is checked as a statistic (against its definition, its null distribution over
seeded draws, and the two traces |r| misses), then through the spec and a real trial.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import binom, norm

from raysweep.base.specfile import SpecError
from raysweep.base.storage import open_store
from raysweep.experiment.metrics import OBJECTIVES, anderson_darling, anderson_darling_noise
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import run_trial
from raysweep.science.stats import anderson_darling_rows

N, DRAWS = 150, 400  # the quickstart's poisons; seeded draws per check
# Asymptotic upper 1 % point of n A^2 for a fully specified null (Anderson & Darling 1954,
# Stephens 1974); at n = 150 the finite-n quantile differs by well under 1 %.
AD_99 = 3.857
# A test of size 1 % rejects Binomial(DRAWS, 0.01) of the draws; its 99.9th percentile: 11 of 400.
MOST = int(binom.ppf(0.999, DRAWS, 0.01))


def test_matches_its_definition():
    """A^2 / n = integral over u = Phi(x) of (F_n - u)^2 / (u (1 - u)), integrated numerically
    between the scores, where the empirical CDF F_n is constant (k / n on the k-th piece)."""
    s = np.random.default_rng(0).standard_normal(12) * 1.3 - 0.4
    edges = [0.0, *np.sort(norm.cdf(s)), 1.0]
    total = sum(
        quad(lambda u, f=f: (f - u) ** 2 / (u * (1 - u)), a, b)[0]
        for f, a, b in zip(np.arange(len(edges) - 1) / len(s), edges[:-1], edges[1:])
    )
    assert anderson_darling(s) == pytest.approx(total, rel=1e-6)


def test_null_mean_and_size():
    """Scores of a model that never trained on the noise: n A^2 / n has mean 1 (within 0.1 over
    400 draws, whose standard error is 0.04; measured 0.94) and exceeds its 1 % point on at most
    ~1 % (measured 3 of 400; allowed 11)."""
    gen = np.random.default_rng(1)
    stats = np.array([N * anderson_darling(gen.standard_normal(N)) for _ in range(DRAWS)])
    assert abs(stats.mean() - 1.0) < 0.1
    assert (stats > AD_99).sum() <= MOST


@pytest.mark.parametrize("seed", range(5))
def test_sees_what_residual_averages_away(seed):
    """Two traces |r| reads as clean (the mean score, what r rests on, within 0.25 + 3 se of 0):
    a few poisons still memorised (10 of 150 set to I = -3: bad_teacher's 9-10 in the tail) and
    an overshoot past N(0, 1) balanced by memorised ones (120 at N(0.5, 1), 30 at N(-2, 1)).
    Per seed of 80 draws, the tail set scores above the same draw left clean on >= 90 %
    (measured 95-100 %) and beyond the null's 1 % point on >= 45 % (measured 51-69 %: as a test,
    AD is weaker on 10 poisons than the exact tail count of metrics.null_tests, which rejects all
    of them; 15 at -3: 100 %); the mixed set lies beyond that point on >= 90 % (96-100 %)."""
    gen = np.random.default_rng(100 + seed)
    above, beyond, mixed_beyond, draws = 0, 0, 0, 80
    for _ in range(draws):
        clean = gen.standard_normal(N)
        tail = np.concatenate([clean[10:], np.full(10, -3.0)])
        mixed = np.concatenate([gen.standard_normal(120) + 0.5, gen.standard_normal(30) - 2.0])
        for s in (tail, mixed):
            assert abs(s.mean()) < 0.25 + 3 / math.sqrt(N)  # |mean| ~ |r| x 1.155
        above += anderson_darling(tail) > anderson_darling(clean)
        beyond += N * anderson_darling(tail) > AD_99
        mixed_beyond += N * anderson_darling(mixed) > AD_99
    assert above >= 0.9 * draws and beyond >= 0.45 * draws and mixed_beyond >= 0.9 * draws


def test_finite_and_ordered_far_out_and_ignores_degenerate_scores():
    s = np.random.default_rng(2).standard_normal(N)
    far = [anderson_darling(s - shift) for shift in (5.0, 10.0, 40.0)]
    assert all(math.isfinite(v) for v in far) and far[0] < far[1] < far[2]
    with_nan = np.concatenate([s, [np.nan, np.nan]])
    assert anderson_darling(with_nan) == anderson_darling(s)
    assert math.isnan(anderson_darling(np.full(3, np.nan)))


@pytest.mark.parametrize("shift", [0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_its_noise_is_the_spread_of_the_distance_over_fresh_poisons(shift, seed):
    """`objective_noise` under anderson_darling, the bootstrap half-width from one model's scores,
    against what it estimates: the 95 % half-width of the distance over DRAWS fresh sets of N
    poisons from the same shifted N(0, 1) (measured 0.92-1.07 times it, both shifts, seeds 0-2,
    1 and 2 threads).
    At the null itself the bootstrap reads about twice the spread (ties in every resample), so
    the check is away from it, where tuning decides."""
    gen = np.random.default_rng(seed)
    fresh = anderson_darling_rows(gen.standard_normal((DRAWS, N)) + shift)
    spread = (np.quantile(fresh, 0.975) - np.quantile(fresh, 0.025)) / 2
    units = -torch.from_numpy(gen.standard_normal(N) + shift)  # units are -score
    noise = anderson_darling_noise(units, torch.Generator().manual_seed(seed))
    assert 0.7 < noise / spread < 1.6
    assert noise == anderson_darling_noise(units, torch.Generator().manual_seed(seed))
    assert math.isnan(anderson_darling_noise(torch.tensor([1.0, math.nan]), torch.Generator()))


def test_spec_default_keeps_the_hash_and_bad_values_fail_in_one_line(tiny_spec_dict):
    spec = validate(dict(tiny_spec_dict), "s.yaml")
    assert spec.objective == "residual" and "objective" not in spec.raw
    named = validate(tiny_spec_dict | {"objective": "anderson_darling"}, "s.yaml")
    assert named.objective == "anderson_darling" and named.hash != spec.hash
    with pytest.raises(SpecError, match=r"^s\.yaml: objective: unknown objective 'ks'; allowed: "
                       r"anderson_darling, residual$"):  # fmt: skip
        validate(tiny_spec_dict | {"objective": "ks"}, "s.yaml")
    backdoor = tiny_spec_dict | {"attack": {"name": "backdoor", "n": 30}}
    with pytest.raises(SpecError, match=r"^s\.yaml: objective: 'anderson_darling' is not defined "
                       r"for attack 'backdoor'; allowed: residual$"):  # fmt: skip
        validate(backdoor | {"objective": "anderson_darling"}, "s.yaml")
    assert set(OBJECTIVES) == {"residual", "anderson_darling"}


def test_a_trial_minimises_the_named_objective_and_nothing_else_changes(tiny_spec_dict, tmp_path):
    """The same trial under both objectives: identical rows but for `objective`, which is |r| on
    val under residual and the scores' Anderson-Darling distance under anderson_darling (the
    Gaussian scores read the same poisons on val and test); infeasible rows score 10 + shortfall
    under both."""
    store = open_store(str(tmp_path))
    rows = {}
    for name in ("residual", "anderson_darling"):
        spec = validate(tiny_spec_dict | {"objective": name}, "s.yaml")
        for lr in (1e-3, 3.0):  # 3.0: past the utility constraint
            rows[name, lr] = run_trial(spec, store, "gd", 0.1, {"lr": lr}, 0, report=lambda r: 0)
    ok_r, ok_ad = rows["residual", 1e-3], rows["anderson_darling", 1e-3]
    assert ok_r["feasible"] and ok_r["objective"] == abs(ok_r["residual_val"])
    assert ok_ad["objective"] == anderson_darling(np.asarray(ok_ad["after_scores"]))
    assert ok_ad["objective"] != ok_r["objective"]
    # Each objective's noise in its own units: r's resolution for |r|, the bootstrap for AD.
    assert ok_r["objective_noise"] == ok_r["resolution"]
    assert 0 < ok_ad["objective_noise"] < 1 and ok_ad["objective_noise"] != ok_ad["resolution"]
    same = ("objective", "objective_noise", "wall_s", "relearn_wall_s")
    for k in ok_r:
        if k not in same and isinstance(ok_r[k], float) and not math.isnan(ok_r[k]):
            assert ok_ad[k] == ok_r[k], k
    bad_r, bad_ad = rows["residual", 3.0], rows["anderson_darling", 3.0]
    assert not bad_r["feasible"] and bad_r["objective"] >= 10.0
    assert bad_ad["objective"] == bad_r["objective"]
