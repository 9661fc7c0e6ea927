"""Training from scratch: augmentation is opt-in and leaves the default run untouched."""

from __future__ import annotations

import pytest
import torch

from raysweep.science.models import cnn, seeded
from raysweep.science.train import train


def _fit(x, y, **kw):
    gen = torch.Generator().manual_seed(0)
    model = seeded(lambda: cnn((1, 8, 8), 3, width=4), gen)
    return train(model, x, y, gen, epochs=2, batch_size=16, **kw)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)


def test_augmentation_is_off_by_default_and_changes_training_when_on(data):
    weights = lambda m: torch.cat([p.flatten() for p in m.state_dict().values()]).float()
    plain = weights(_fit(*data))
    assert torch.equal(plain, weights(_fit(*data, shift=0, flip=False)))  # same draws
    shifted = weights(_fit(*data, shift=2))
    assert not torch.equal(plain, shifted) and torch.isfinite(shifted).all()
    assert torch.equal(shifted, weights(_fit(*data, shift=2)))  # deterministic for a seed


def test_augmentation_refuses_token_ids():
    x, y = torch.randint(0, 100, (8, 5)), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="augment images"):
        train(torch.nn.Linear(5, 2), x, y, torch.Generator(), epochs=1, shift=1)
