"""Attacks: the contract every ATTACKS entry meets, each attack's own guarantees, their metrics."""

from __future__ import annotations

import functools
from dataclasses import fields

import pytest
import torch

from raysweep.analysis import results
from raysweep.experiment import checkpoints, metrics
from raysweep.experiment.metrics import UNITS, Probe, measure
from raysweep.poisoning import crafting
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.poisoned import from_tensors, to_tensors
from raysweep.poisoning.records import ACCURACY_GAP, RECORDS
from raysweep.science.data import digits
from raysweep.science.models import chunked, cnn, seeded
from raysweep.science.train import augment

# Settings that keep every attack under a few seconds on a CPU (crafting runs, barely).
FAST = {
    "gaussian": {"n": 20},
    "gradient_matching": {
        "n": 10,
        "eps": 16 / 255,
        "n_targets": 2,
        "restarts": 2,
        "steps": 6,
        "surrogate_width": 4,
        "surrogate_epochs": 1,
    },
    "gradient_canceling": {
        "n": 12,
        "steps": 4,
        "surrogate_width": 4,
        "surrogate_epochs": 1,
        "corrupt_steps": 3,
    },
    "backdoor": {"n": 15, "y_adv": 3, "patch": 2},
    "label_flip": {"n": 25},
}


@functools.lru_cache(maxsize=1)
def split():
    return digits(size=8)


@functools.lru_cache(maxsize=16)
def poisoned(attack: str, seed: int = 0):
    return ATTACKS[attack](split(), torch.Generator().manual_seed(seed), **FAST[attack])


def test_fast_settings_cover_every_attack():
    # Every image attack; the text backdoor needs token ids and has its own tests (test_text.py).
    assert set(FAST) == set(ATTACKS) - {"text_backdoor"}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("attack", sorted(FAST))
def test_shapes_and_poison_idx(attack):
    s, p = split(), poisoned(attack)
    assert p.x.shape == s.x_train.shape and p.x.dtype == s.x_train.dtype
    assert p.y.shape == s.y_train.shape and p.y.dtype == torch.long
    n = FAST[attack]["n"]
    assert p.poison_idx.shape == (n,)
    assert torch.equal(p.poison_idx, p.poison_idx.unique())  # sorted, distinct
    assert 0 <= p.poison_idx.min() and p.poison_idx.max() < len(s.y_train)
    x_rest, y_rest = p.without_poisons()
    assert len(y_rest) == len(s.y_train) - n


@pytest.mark.parametrize("attack", sorted(FAST))
def test_only_poison_rows_change_and_round_trip(attack):
    s, p = split(), poisoned(attack)
    tensors, scalars = to_tensors(p, s)  # raises if a row outside poison_idx changed
    back = from_tensors(s, tensors, scalars)
    for f in fields(p):
        assert _same(getattr(back, f.name), getattr(p, f.name)), f.name


@pytest.mark.parametrize("attack", sorted(FAST))
def test_deterministic_for_a_seed(attack):
    a = poisoned(attack, 0)
    b = ATTACKS[attack](split(), torch.Generator().manual_seed(0), **FAST[attack])
    for f in fields(a):
        assert _same(getattr(a, f.name), getattr(b, f.name)), f.name
    c = poisoned(attack, 1)
    assert not (torch.equal(a.poison_idx, c.poison_idx) and torch.equal(a.x, c.x))


@pytest.mark.parametrize("attack", sorted(set(FAST) - {"gaussian"}))
def test_inputs_stay_in_the_valid_range(attack):
    # gaussian is exempt by design: its noise is unbounded (docs/design.md §2).
    s, p = split(), poisoned(attack)
    assert (p.x >= s.x_min - 1e-5).all() and (p.x <= s.x_max + 1e-5).all()


def test_valid_range_is_the_image_of_zero_and_one():
    s = split()
    assert s.x_min.shape == s.x_max.shape == (1, 1, 1)
    # digits has blank pixels (0) and full-ink pixels (16/16 = 1) in the train set.
    assert torch.isclose(s.x_train.min(), s.x_min.squeeze(), atol=1e-5)
    assert torch.isclose(s.x_train.max(), s.x_max.squeeze(), atol=1e-5)
    assert (s.x_max > s.x_min).all()


def test_gradient_matching_is_clean_label_and_linf_bounded():
    s, p = split(), poisoned("gradient_matching")
    eps = FAST["gradient_matching"]["eps"]
    delta_pixels = (p.x - s.x_train) / (s.x_max - s.x_min)
    assert delta_pixels.abs().max() <= eps + 1e-6
    assert delta_pixels[p.poison_idx].abs().max() > eps / 2  # it did perturb
    assert torch.equal(p.y, s.y_train)  # clean label
    assert (s.y_train[p.poison_idx] == p.y_adv).all()
    assert len(p.target_idx) == FAST["gradient_matching"]["n_targets"]
    assert (s.y_test[p.target_idx] != p.y_adv).all()


def test_surrogate_augment_is_opt_in():
    """Off by default (the cached poisons of existing specs stay what they were); on, the
    surrogate trains with the brew's shifts, so its weights and the poisons change."""
    s, kw = split(), FAST["gradient_matching"]
    plain = ATTACKS["gradient_matching"](s, torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain.x, poisoned("gradient_matching").x)
    augmented = ATTACKS["gradient_matching"](
        s, torch.Generator().manual_seed(0), **kw, shift=1, surrogate_augment=True
    )
    shifted_only = ATTACKS["gradient_matching"](s, torch.Generator().manual_seed(0), **kw, shift=1)
    assert not torch.equal(augmented.x, shifted_only.x)
    assert torch.equal(augmented.poison_idx, shifted_only.poison_idx)  # same draws before training


def test_brewing_aligns_poison_and_target_gradients():
    s, gen = split(), torch.Generator().manual_seed(0)
    model = crafting.surrogate(s, gen, "cnn", width=4, epochs=2, lr=0.05)
    x0, y0 = s.x_train[s.y_train == 1][:8], torch.ones(8, dtype=torch.long)
    target = crafting.param_grads(model, s.x_test[:1], torch.ones(1, dtype=torch.long))
    kw = dict(lo=s.x_min, hi=s.x_max, eps=32 / 255, lr=0.4, shift=1, flip=False, batch_size=8)
    delta = crafting.brew([model], x0, y0, [target], gen, restarts=1, steps=30, **kw)
    before = crafting._alignment(model, x0, y0, target).item()
    after = crafting._alignment(model, x0 + delta, y0, target).item()
    assert after < before - 0.05


def test_augment_translates_by_whole_pixels():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, gen, shift=0, flip=False), x)
    out = augment(x, gen, shift=2, flip=False)
    # Each output image is its input moved by whole pixels: its interior equals a shifted window.
    for i in range(2):
        found = any(
            torch.allclose(out[i, 0, 2:4, 2:4], x[i, 0, 2 + dy : 4 + dy, 2 + dx : 4 + dx])
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
        assert found


def test_gradient_canceling_keeps_labels_and_lowers_its_objective():
    s, p = split(), poisoned("gradient_canceling")
    assert torch.equal(p.y, s.y_train)
    gen = torch.Generator().manual_seed(0)
    model = crafting.surrogate(s, gen, "cnn", width=4, epochs=1, lr=0.05)
    idx = p.poison_idx
    clean = torch.ones(len(s.y_train), dtype=torch.bool)
    clean[idx] = False
    g_clean = crafting.summed_grads(model, s.x_train[clean], s.y_train[clean], 256)
    eps_d = len(idx) / int(clean.sum())

    def objective(x):
        g = crafting.summed_grads(model, x, s.y_train[idx], 256)
        r = [c + eps_d * u for c, u in zip(g_clean, g)]
        return crafting._dot(r, r).item()

    x = crafting.cancel(
        model, s.x_train[idx], s.y_train[idx], g_clean, eps_d=eps_d, lo=s.x_min, hi=s.x_max,
        steps=20, lr=0.1, batch_size=256,
    )  # fmt: skip
    assert objective(x) < objective(s.x_train[idx])
    assert (x >= s.x_min - 1e-5).all() and (x <= s.x_max + 1e-5).all()


def test_gradient_canceling_flipped_labels_and_linf_ball():
    s, eps = split(), 8 / 255
    kw = {**FAST["gradient_canceling"], "labels": "flip", "eps": eps}
    p = ATTACKS["gradient_canceling"](s, torch.Generator().manual_seed(1), **kw)
    assert (p.y[p.poison_idx] != s.y_train[p.poison_idx]).all()  # every poison label flipped
    rest = torch.ones(len(s.y_train), dtype=torch.bool)
    rest[p.poison_idx] = False
    assert torch.equal(p.y[rest], s.y_train[rest]) and torch.equal(p.x[rest], s.x_train[rest])
    delta_pixels = (p.x - s.x_train) / (s.x_max - s.x_min)
    assert delta_pixels.abs().max() <= eps + 1e-6
    assert delta_pixels.abs().max() > eps / 2  # it did move
    assert (p.x >= s.x_min - 1e-5).all() and (p.x <= s.x_max + 1e-5).all()


@pytest.mark.parametrize("bad", [{"labels": "random"}, {"eps": 0.0}, {"eps": 1.5}])
def test_gradient_canceling_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="allowed"):
        ATTACKS["gradient_canceling"](
            split(), torch.Generator(), **FAST["gradient_canceling"], **bad
        )


def test_corrupt_lowers_accuracy_to_the_target():
    s, gen = split(), torch.Generator().manual_seed(0)
    model = crafting.surrogate(s, gen, "cnn", width=4, epochs=3, lr=0.05)
    x, y = s.x_train, s.y_train
    kw = dict(target_acc=0.5, step=0.01, max_steps=500, batch_size=128)
    model = crafting.corrupt(model, x, y, x, y, gen, **kw)
    assert (chunked(model, x).argmax(1) == y).float().mean() <= 0.5


def test_backdoor_patches_and_relabels():
    s, p = split(), poisoned("backdoor")
    y_adv, k = FAST["backdoor"]["y_adv"], FAST["backdoor"]["patch"]
    assert p.y_adv == y_adv and (p.y[p.poison_idx] == y_adv).all()
    assert (s.y_train[p.poison_idx] != y_adv).all()
    corner = p.x[p.poison_idx][:, :, -k:, -k:]
    assert torch.equal(corner, p.trigger[:, -k:, -k:].expand_as(corner))
    assert set(corner.unique().tolist()) == {s.x_min.item(), s.x_max.item()}  # checkerboard
    assert p.trigger_mask.sum() == k * k
    outside = p.x[p.poison_idx][:, :, :-k, :]
    assert torch.equal(outside, s.x_train[p.poison_idx][:, :, :-k, :])
    assert torch.equal(p.triggered(p.triggered(s.x_test)), p.triggered(s.x_test))


def test_label_flip_changes_exactly_n_labels():
    s, p = split(), poisoned("label_flip")
    changed = (p.y != s.y_train).nonzero().flatten()
    assert torch.equal(changed, p.poison_idx)
    assert len(changed) == FAST["label_flip"]["n"]
    assert torch.equal(p.x, s.x_train)
    assert ((p.y >= 0) & (p.y < s.num_classes)).all()


def test_bad_parameters_fail_with_a_message():
    s, gen = split(), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="label_flip: n=0"):
        ATTACKS["label_flip"](s, gen, n=0)
    with pytest.raises(ValueError, match="y_adv=12"):
        ATTACKS["backdoor"](s, gen, y_adv=12)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        ATTACKS["gradient_matching"](s, gen, surrogate="vgg", n=5, steps=1)
    with pytest.raises(ValueError, match="poisons: n=500"):  # more than one class holds
        ATTACKS["gradient_matching"](s, gen, y_adv=1, n=500)


def _probe(p) -> Probe:
    s = split()
    keep = torch.ones(len(p.y), dtype=torch.bool)
    keep[p.poison_idx] = False
    noise = None if p.noise is None else torch.randn_like(p.noise)
    forget, retain = (p.x[~keep], p.y[~keep]), (p.x[keep], p.y[keep])
    x_clean = s.x_train[p.poison_idx]
    return Probe(s.x_val, s.y_val, s.x_test, s.y_test, forget, retain, p, x_clean, noise)


@pytest.mark.parametrize("attack", sorted(FAST))
def test_every_attack_has_an_effect_a_check_and_recorded_columns(attack):
    model = seeded(lambda: cnn(split().input_shape, 10, width=4), torch.Generator())
    m, units = measure(model, _probe(poisoned(attack)), attack)
    assert RECORDS[attack].units in UNITS
    for part in ("val", "test"):
        k = f"effect_{part}"
        assert isinstance(m[k], float) and m[k] == m[k]  # finite, not NaN
        # E is the mean of its units: what the bootstrap of r resamples
        assert units[part].dtype == torch.float64 and len(units[part]) > 0
        assert m[k] == pytest.approx(units[part].nanmean().item(), abs=1e-12)
    # Every metric lands in a Parquet column: nothing measured is silently dropped.
    assert set(m) <= set(results.MEASURED)
    assert isinstance(RECORDS[attack].check.worked(m, m), bool)


class Fixed(torch.nn.Module):
    """Predicts class `hit` where the backdoor's corner patch is present, `miss` elsewhere."""

    def __init__(self, trigger: torch.Tensor | None, hit: int, miss: int):
        super().__init__()
        self.trigger, self.hit, self.miss = trigger, hit, miss

    def forward(self, x):
        found = torch.zeros(len(x), dtype=torch.bool)
        if self.trigger is not None:
            found = (x[..., -2:, -2:] == self.trigger[..., -2:, -2:]).flatten(1).all(1)
        return torch.nn.functional.one_hot(torch.where(found, self.hit, self.miss), 10).float()


def test_effect_metrics_measure_what_they_claim():
    p = poisoned("backdoor")
    other = (p.y_adv + 1) % 10
    asr = metrics.backdoor(Fixed(p.trigger, p.y_adv, other), _probe(p))
    assert asr == {"backdoor_asr_val": 1.0, "backdoor_asr_test": 1.0}
    # Rows of class y_adv are excluded: a model that always says y_adv scores 1, not more.
    assert metrics.backdoor(Fixed(None, 0, p.y_adv), _probe(p))["backdoor_asr_test"] == 1.0
    assert metrics.backdoor(Fixed(None, 0, other), _probe(p))["backdoor_asr_test"] == 0.0
    gm = poisoned("gradient_matching")
    rate = lambda c: metrics.targeted(Fixed(None, 0, c), _probe(gm))["target_adv_rate"]
    assert rate(gm.y_adv) == 1.0 and rate((gm.y_adv + 1) % 10) == 0.0
    assert metrics.targeted(Fixed(None, 0, 0), _probe(p)) == {}  # not a targeted attack


def test_attack_ok_is_the_effect_gap_on_val():
    ok, gap = RECORDS["label_flip"].check.worked, ACCURACY_GAP
    retrain = {"effect_val": 0.02}
    assert ok({"effect_val": 0.02 + gap + 1e-9}, retrain)
    assert not ok({"effect_val": 0.02 + gap / 2}, retrain)
    assert not RECORDS["backdoor"].check.worked({"effect_val": 0.9}, {"effect_val": 0.6})


def _spec(tiny_spec_dict, attack: dict):
    from raysweep.experiment.spec import validate

    return validate({**tiny_spec_dict, "attack": attack}, "<test>")


def test_poisons_are_crafted_once_per_store_and_reloaded(tiny_spec_dict, tmp_path, monkeypatch):
    from raysweep.base.storage import open_store
    from raysweep.experiment import trial

    calls = []
    real = ATTACKS["label_flip"]

    @functools.wraps(real)
    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    # ATTACKS reads the record's crafting function from attacks.py at each access
    monkeypatch.setattr("raysweep.poisoning.attacks.label_flip", counting)
    spec = _spec(tiny_spec_dict, {"name": "label_flip", "n": 40})
    store, s = open_store(str(tmp_path)), digits(size=16)
    a = trial.poison(spec, store, s, seed=3)
    b = trial.poison(spec, store, s, seed=3)
    assert len(calls) == 1
    for f in fields(a):
        assert _same(getattr(a, f.name), getattr(b, f.name)), f.name
    fresh = real(s, trial.rng(3, "attack"), n=40)
    assert torch.equal(a.y, fresh.y) and torch.equal(a.poison_idx, fresh.poison_idx)
    (key,) = store.list("poisons")
    assert checkpoints.made_count(store, "poisons", key) == 1
    # The stored rows are hash-checked like weights: a flipped byte is refused, not used.
    path = f"poisons/{key}/poisons.safetensors"
    data = bytearray(store.read(path))
    data[-1] ^= 0xFF
    store.write(path, bytes(data))
    with pytest.raises(checkpoints.CorruptCheckpoint, match="sha256"):
        trial.poison(spec, store, s, seed=3)


def test_trial_rows_carry_effects_residual_and_attack_ok(tiny_spec_dict, tmp_path):
    from raysweep.base.storage import open_store
    from raysweep.experiment.trial import run_trial

    store = open_store(str(tmp_path))
    attack = {"name": "backdoor", "n": 40, "y_adv": 2, "patch": 3}
    rows = []
    run_trial(_spec(tiny_spec_dict, attack), store, "gd", 0.05, {"lr": 0.01}, 0, rows.append)
    row = rows[0]
    for prefix in ("before", "after", "retrain"):
        assert 0 <= row[f"{prefix}_effect_test"] <= 1
        assert row[f"{prefix}_effect_test"] == row[f"{prefix}_backdoor_asr_test"]
    assert row["attack_ok"] is True and row["before_effect_val"] > 0.9
    assert row["residual"] == pytest.approx(
        metrics.residual(
            row["after_effect_test"], row["before_effect_test"], row["retrain_effect_test"]
        )
    )
    # A flip of 2 labels cannot move accuracy by 3 points: kept as a row, marked as failed.
    weak = _spec(tiny_spec_dict, {"name": "label_flip", "n": 2})
    run_trial(weak, store, "gd", 0.05, {"lr": 0.01}, 0, rows.append)
    assert rows[1]["attack_ok"] is False
