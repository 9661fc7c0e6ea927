"""The optimised attacks on a `linear` model craft through its frozen extractor (fine-tuning
threat model): the path is taken, the bounds hold, and the extractor is never trained."""

from __future__ import annotations

import functools

import pytest
import torch

from raysweep.base.storage import open_store
from raysweep.experiment.metrics import logits
from raysweep.experiment.spec import validate
from raysweep.poisoning import attacks, crafting
from raysweep.poisoning.attacks import ATTACKS
from raysweep.science.data import digits
from raysweep.science.models import Frozen, mlp, seeded, split_head
from raysweep.science.train import train

FAST = {
    "gradient_matching": {"n": 10, "eps": 16 / 255, "n_targets": 2, "steps": 6, "shift": 0},
    "gradient_canceling": {"n": 12, "steps": 4, "corrupt_steps": 3},
}
SURROGATE = {"surrogate_width": 4, "surrogate_epochs": 2}


@functools.lru_cache(maxsize=1)
def split():
    return digits(size=8)


@functools.lru_cache(maxsize=4)
def extractor(seed: int = 0, width: int = 32) -> Frozen:
    """A small MLP trained on the clean digits, minus its head, frozen."""
    gen = torch.Generator().manual_seed(seed)
    s = split()
    model = seeded(lambda: mlp(s.input_shape, s.num_classes, width=width), gen)
    return Frozen(split_head(train(model, s.x_train, s.y_train, gen, epochs=5))[0])


def craft(attack: str, seed: int = 0, through: Frozen | None = None, **kw):
    gen = torch.Generator().manual_seed(seed)
    return ATTACKS[attack](split(), gen, through, **FAST[attack], **SURROGATE, **kw)


@pytest.mark.parametrize("attack", sorted(FAST))
def test_extractor_path_differs_stays_bounded_and_leaves_the_extractor(attack):
    ext = extractor()
    before = {k: v.clone() for k, v in ext.state_dict().items()}
    plain, linear = craft(attack), craft(attack, through=ext)
    assert torch.equal(plain.poison_idx, linear.poison_idx)  # same draws, different surrogate
    assert not torch.equal(plain.x[plain.poison_idx], linear.x[linear.poison_idx])
    for k, v in ext.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not p.requires_grad for p in ext.parameters()) and not ext.training
    s = split()
    assert (linear.x >= s.x_min).all() and (linear.x <= s.x_max).all()
    changed = (linear.x != s.x_train).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(linear.poison_idx.tolist())
    if attack == "gradient_matching":
        assert torch.equal(linear.y, s.y_train)  # clean label
        pixels = (linear.x - s.x_train) / (s.x_max - s.x_min)
        assert pixels.abs().max() <= FAST[attack]["eps"] + 1e-5
        assert pixels.abs().max() > 0.5 * FAST[attack]["eps"]


def test_surrogate_on_an_extractor_is_a_trained_linear_head():
    ext, s = extractor(), split()
    model = crafting.surrogate(
        split(), torch.Generator(), "cnn", width=4, epochs=5, lr=0.05, extractor=ext
    )
    first, head = list(model.children())
    assert first is ext and isinstance(head, torch.nn.Linear)
    assert crafting.trainable(model) == [head.weight, head.bias]
    grads = crafting.param_grads(model, s.x_train[:8], s.y_train[:8])
    assert [g.shape for g in grads] == [head.weight.shape, head.bias.shape]
    acc = (logits(model, s.x_test).argmax(1) == s.y_test).float().mean()
    assert acc > 0.85


def test_trial_hands_a_linear_models_extractor_to_the_attack(tiny_spec_dict, tmp_path, monkeypatch):
    from raysweep.experiment import trial

    seen = []
    real = ATTACKS["gradient_matching"]

    @functools.wraps(real)
    def spy(split, generator, extractor=None, **kw):
        seen.append(extractor)
        return real(split, generator, extractor, **kw)

    # ATTACKS reads the record's crafting function from poisoning/attacks.py when it is used
    monkeypatch.setattr(attacks, "gradient_matching", spy)
    attack = {"name": "gradient_matching", **FAST["gradient_matching"], **SURROGATE}
    model = {"name": "linear", "width": 16, "depth": 1, "extractor_epochs": 2}
    spec = validate({**tiny_spec_dict, "model": model, "attack": attack}, "<test>")
    store, s = open_store(str(tmp_path)), digits(size=16)
    state = trial.extractor_state(spec, store, s, seed=0)
    p = trial.poison(spec, store, s, seed=0, weights=state)
    (ext,) = seen
    assert isinstance(ext, Frozen)
    body = {k: v for k, v in state.items() if k in ext.body.state_dict()}
    assert body and all(torch.equal(ext.body.state_dict()[k], v) for k, v in body.items())
    assert torch.equal(p.y, s.y_train)
    # Poisons crafted through the extractor are stored under a key of their own.
    plain = validate({**tiny_spec_dict, "attack": attack}, "<test>")
    q = trial.poison(plain, store, s, seed=0)
    assert seen[1] is None and len(store.list("poisons")) == 2
    assert not torch.equal(p.x, q.x)


def _gain(seed: int) -> float:
    """log p(y_adv | target) of a head trained on the brewed rows minus one on the clean rows."""
    s, ext = split(), extractor(seed)
    kw = {"n": 60, "eps": 0.5, "steps": 60, "restarts": 1, "shift": 0, "surrogate_epochs": 30}
    p = ATTACKS["gradient_matching"](s, torch.Generator().manual_seed(seed), ext, **kw)
    x_t = s.x_test[p.target_idx]
    logp = []
    for x in (p.x, s.x_train):  # the same head init and batch order
        gen = torch.Generator().manual_seed(seed)
        head = crafting.head_on(ext, x, s.y_train, s.num_classes, gen, epochs=30, lr=0.05)
        logp.append(logits(head, x_t).log_softmax(1)[:, p.y_adv].mean().item())
    return logp[0] - logp[1]


def test_gradient_matching_moves_the_target_on_several_seeds():
    """The science, small: poisons brewed through the frozen extractor raise the victim head's
    log p(y_adv | target) by nats over a head trained on the unperturbed rows, on every seed."""
    gains = [_gain(seed) for seed in range(3)]
    assert min(gains) > 2.0, gains


def test_retrain_brews_in_rounds_within_the_ball_and_is_seeded():
    """`retrain`: the surrogate head is retrained on the current poisons between rounds; the
    poisons stay clean-label and in the ball, differ from one round's, and a seed fixes them."""
    ext, s = extractor(), split()
    one = craft("gradient_matching", through=ext)
    rounds = [craft("gradient_matching", through=ext, retrain=1) for _ in range(2)]
    assert torch.equal(rounds[0].x, rounds[1].x)
    assert torch.equal(rounds[0].poison_idx, one.poison_idx) and torch.equal(rounds[0].y, s.y_train)
    assert not torch.equal(rounds[0].x, one.x)
    pixels = (rounds[0].x - s.x_train) / (s.x_max - s.x_min)
    assert pixels.abs().max() <= FAST["gradient_matching"]["eps"] + 1e-5
    with pytest.raises(ValueError, match="resolution"):
        craft("gradient_matching", through=ext, retrain=1, resolution=4)
