"""The linear regime: a logistic head on a frozen extractor (its own checkpoint, trained on clean
data), and `newton`, the positive control that should remove a poison almost exactly there."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raysweep.base.storage import open_store
from raysweep.experiment.checkpoints import made_count
from raysweep.experiment.extractor import frozen as frozen_extractor
from raysweep.experiment.spec import load, validate
from raysweep.experiment.trial import build_model, extractor_state, prepare, run_trial
from raysweep.poisoning.attacks import gaussian
from raysweep.science import data
from raysweep.science.budget import Meter
from raysweep.science.models import (
    Frozen,
    carry_noise,
    linear,
    noise_shape,
    noise_space,
    seeded,
    split_head,
    trainable,
)
from raysweep.science.train import train
from raysweep.unlearning import unlearners as U
from raysweep.unlearning.newton import newton, newton_row_cost
from raysweep.unlearning.steps import features

SHAPE = (1, 8, 8)


def _model(seed=0, width=32):
    return seeded(lambda: linear(SHAPE, 10, width=width), torch.Generator().manual_seed(seed))


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE), generator=g), torch.randint(0, 10, (n,), generator=g)


def test_extractor_is_frozen_and_stays_in_eval_mode():
    model = _model()
    model.train()
    extractor = frozen_extractor(model)
    assert isinstance(extractor, Frozen) and not extractor.training
    assert not any(m.training for m in extractor.modules())
    assert trainable(model) == list(model[-1].parameters())


def test_a_linear_model_trains_on_features_computed_once():
    """Not augmented, the frozen extractor sees each row once (not once per epoch), and the head
    takes the same steps as when every batch passes through the extractor."""
    x, y = _data(700)
    cached, through = _model(), _model()
    before = copy.deepcopy(cached[0].state_dict())
    calls = []
    cached[0].register_forward_hook(lambda m, i, o: calls.append(len(o)))
    # Wrapped in a Sequential the extractor is not recognised: every batch passes through it.
    through = torch.nn.Sequential(torch.nn.Sequential(through[0]), through[1])
    kw = {"epochs": 3, "lr": 0.05, "batch_size": 64}
    train(cached, x, y, torch.Generator().manual_seed(1), **kw)
    train(through, x, y, torch.Generator().manual_seed(1), **kw)
    assert calls == [512, 188]  # one pass, chunk by chunk, instead of 3 epochs x 11 batches
    torch.testing.assert_close(cached[1].weight, through[1].weight, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, cached[0].state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", sorted(U.UNLEARNERS))
def test_no_unlearner_moves_the_extractor(method):
    model = _model(width=16)
    before = copy.deepcopy(frozen_extractor(model).state_dict())
    x, y = _data(60)
    forget, retain = (x[:10], y[:10]), (x[10:], y[10:])
    U.UNLEARNERS[method](model, forget, retain, Meter(150.0), torch.Generator().manual_seed(1))
    after = frozen_extractor(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), method


def _objective_grad(model, x, y, weight_decay):
    """Gradient of mean CE + wd/2 ||theta||^2 over the head, in float64."""
    prefix, head = split_head(model)
    phi = features(prefix, x).double()
    w, b = (head.weight.double().requires_grad_(), head.bias.double().requires_grad_())
    loss = F.cross_entropy(phi @ w.T + b, y) + weight_decay / 2 * (
        w.square().sum() + b.square().sum()
    )
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, (w, b))])


def test_newton_lands_on_the_retain_optimum():
    """Enough steps and an unlimited budget: the retain objective's gradient vanishes."""
    model, (x, y) = _model(), _data(300)
    retain = (x[50:], y[50:])
    grad_before = _objective_grad(model, *retain, 5e-4).norm()
    newton(model, (x[:50], y[:50]), retain, Meter(1e12), torch.Generator(), steps=12)
    # float32 weights hold the float64 solution to about 1e-7 relative
    assert _objective_grad(model, *retain, 5e-4).norm() < 1e-4 * grad_before


def test_newton_pays_counted_flops_and_subsamples_to_the_budget():
    model, (x, y) = _model(width=32), _data(200)
    cost = newton_row_cost(model, x, passes=3)
    # by hand: one row forward+backward through the model (the extractor's two layers forward,
    # the head forward and its weight gradient), vs the extractor forward and 3 x 2 head products
    ext = 2 * (64 * 32 + 32 * 32)
    head = 2 * 10 * 32
    unit = ext + 2 * head  # torch's counter: no bias in matmul flops, no backward into the input
    assert cost == pytest.approx((ext + 2 * 3 * 2 * 10 * 33) / unit, rel=0.02)
    retain = (x[20:], y[20:])
    per_row = newton_row_cost(model, x, passes=1 * (1 + 100))
    meter = Meter(10.5 * per_row)
    newton(model, (x[:20], y[:20]), retain, meter, torch.Generator())
    assert meter.used == pytest.approx(10 * per_row)  # 10 rows fit, not 11


def test_extractor_is_one_checkpoint_shared_by_attacks(tmp_path):
    spec = load("search_spaces/quickstart_linear.yaml")
    raw = spec.raw | {"train": spec.raw["train"] | {"epochs": 5}}
    raw["model"] = raw["model"] | {"extractor_epochs": 2, "width": 64}
    store = open_store(str(tmp_path))
    setup = prepare(json.dumps(raw, sort_keys=True), store.uri, 0)
    flipped = raw | {"attack": {"name": "label_flip", "n": 50}}
    prepare(json.dumps(flipped, sort_keys=True), store.uri, 0)
    roles = [_role(store, key) for key in store.list("checkpoints")]
    # one extractor; poisoned and retrain heads for each of the two attacks
    assert sorted(roles) == ["extractor", "poisoned", "poisoned", "retrain", "retrain"]
    extractor = store.list("checkpoints")[roles.index("extractor")]
    assert made_count(store, "checkpoints", extractor) == 1
    state = extractor_state(validate(raw, "x"), store, setup.split, 0)
    body = {k.removeprefix("0.body."): v for k, v in setup.poisoned_state.items()}
    body = {k: v for k, v in body.items() if k in state}
    assert body and all(torch.equal(body[k], state[k]) for k in body)


def _role(store, key):
    return json.loads(store.read(f"checkpoints/{key}/meta.json"))["config"]["role"]


@pytest.mark.integration  # slow tier: three seeds of the linear quickstart's checkpoints (~1 CPU-min)
def test_newton_removes_the_poison_and_gd_does_not(tmp_path):
    """The positive control at the spec's real settings, on three seeds: a few Newton steps
    leave the poisons' scores indistinguishable from N(0, 1) and r near 0, where gd at the
    paper's learning rate and the same budget leaves the poison in place."""
    spec = load("search_spaces/quickstart_linear.yaml")
    store = open_store(str(tmp_path))
    steps = {"weight_decay": 5e-4, "damping": 1e-6, "steps": 5, "cg_steps": 100}
    for seed in (0, 3, 4):
        rows = {}
        for method, params in (("newton", steps), ("gd", {"lr": 1e-3})):
            rows[method] = run_trial(spec, store, method, 0.1, params, 0, lambda r: None, seed)
        assert rows["newton"]["attack_ok"]
        assert abs(rows["newton"]["residual"]) <= 0.2, (seed, rows["newton"]["residual"])
        assert abs(rows["newton"]["after_gus_z"]) <= 3
        assert rows["newton"]["feasible_test"]
        assert rows["gd"]["residual"] >= 0.8 and rows["gd"]["after_gus_z"] <= -4


def test_text_extractor_carries_the_gaussian_noise():
    """GPT-2 as the frozen extractor: the noise of a poisoned row reaches the head through the
    frozen token embeddings, and the score's split of the model (embed, rest) is the model."""

    split = data.synthetic_imdb(n_train=120, n_test=40, max_len=16)
    build = lambda: linear(split.input_shape, 2, extractor="gpt2", width=32, depth=1, heads=2)
    model = seeded(build, torch.Generator().manual_seed(0)).eval()
    shape = noise_shape(model, split.input_shape)
    assert shape == (16, 32)
    poisoned = gaussian(replace(split, noise_shape=shape), torch.Generator(), n=10, eps=0.5)
    x = poisoned.x[poisoned.poison_idx]  # token ids with each row's noise slot above them
    carry_noise(model, poisoned.noise)
    clean, noisy = model(x & data.IDS).detach(), model(x).detach()
    assert not torch.allclose(clean, noisy)  # the noise changes what the head sees
    embed, rest = noise_space(model)
    assert torch.allclose(rest(embed(x), x), noisy)


def test_extractor_checkpoint_must_hold_every_weight(tmp_path):
    spec = load("search_spaces/quickstart_linear.yaml")
    split = data.digits(size=8)
    state = frozen_extractor(build_model(spec, split)).body.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="extractor checkpoint lacks"):
        build_model(spec, split, weights=state)
