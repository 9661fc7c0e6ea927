"""No unlearner gets more compute than its budget, counted in FLOPs rather than in the meter's
own arithmetic: torch's FlopCounterMode (a dispatch hook on every matrix product and convolution,
forward and backward, teachers and copies included) runs around each real unlearner call on
every model kind, and the total must fit in the units it was charged times one row's
forward+backward, itself counted on real tensors here (not on the meta copy the meter uses)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from raysweep.science import data
from raysweep.science.budget import Meter, forward_cost
from raysweep.science.models import MODELS, seeded
from raysweep.unlearning.unlearners import UNLEARNERS

CLASSES = 10
# Small configs of each model kind: the real code paths (convolutions + BatchNorm, residual
# blocks, GPT-2 attention) at sizes that run every unlearner in seconds on one CPU thread.
CONFIGS = {
    "mlp": ((1, 8, 8), {"width": 32}),
    "cnn": ((3, 16, 16), {"width": 8}),
    "resnet18": ((3, 16, 16), {"width": 4}),
    "gpt2": ((16,), {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0}),
}
CAPS = (0.9, 37.0)  # less than one row (nothing but fractional passes fit) and a few batches
# as in test_unlearners: ssd's default alpha=10 cannot fire when S_f is 20 % of D
KWARGS = {"ssd": {"alpha": 1.0}, "scrub": {"batch_size": 8}, "bad_teacher": {"batch_size": 8}}
# Charged more than they run, by design: neggrad_plus may pay a retain batch it never uses
# (its zip), newton pays all cg_steps however early CG stops.
OVERCHARGED = {"neggrad_plus", "newton"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def rows():
    """Per model kind: 16 forget and 48 retain rows of its input (token ids for gpt2)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (shape, _) in CONFIGS.items():
        if name == "gpt2":
            split = data.synthetic_imdb(n_train=64, n_test=8, max_len=shape[0])
            x, y = split.x_train[:64], split.y_train[:64]
        else:
            x, y = (
                torch.randn(64, *shape, generator=g),
                torch.randint(0, CLASSES, (64,), generator=g),
            )
        out[name] = (x[:16], y[:16]), (x[16:], y[16:])
    return out


def build(name: str) -> torch.nn.Module:
    shape, kwargs = CONFIGS[name]
    classes = 2 if name == "gpt2" else CLASSES
    return seeded(lambda: MODELS[name](shape, classes, **kwargs), torch.Generator().manual_seed(0))


class RealFlops(FlopCounterMode):
    """FLOPs run on real tensors only: the meter's own counting, on meta copies, computes nothing."""

    def _count_flops(self, func_packet, out, args, kwargs):
        leaves = tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
            return out
        return super()._count_flops(func_packet, out, args, kwargs)


def counted(fn) -> int:
    with RealFlops(display=False) as counter:
        fn()
    return counter.get_total_flops()


def unit_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One row's forward+backward in train mode, on real tensors (two rows, halved)."""
    twin = copy.deepcopy(model).train()
    return counted(lambda: F.cross_entropy(twin(x[:2]), y[:2]).backward()) / 2


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("model_name", CONFIGS)
@pytest.mark.parametrize("method", sorted(UNLEARNERS))
def test_counted_flops_fit_the_budget(method, model_name, cap, rows):
    forget, retain = rows[model_name]
    model, meter, gen = build(model_name), Meter(cap), torch.Generator().manual_seed(0)
    unit = unit_flops(model, *retain)
    kwargs = KWARGS.get(method, {})
    ran = counted(lambda: UNLEARNERS[method](model, forget, retain, meter, gen, **kwargs))
    assert meter.used <= cap + 1e-9
    # Every FLOP run was paid for (1e-6: float rounding of the charged units).
    assert ran <= meter.used * unit * (1 + 1e-6), (ran / unit, meter.used)
    # ... and paid what it ran, within 2 %: a charge is the pass's count, not a guess.
    if method not in OVERCHARGED and meter.used > 0:
        assert ran >= 0.98 * meter.used * unit, (ran / unit, meter.used)


def test_quickstart_mlp_forward_is_its_counted_share():
    """The quickstart MLP (1x32x32 in, two hidden layers of 512, 10 classes), by hand: a forward
    is F = 2 (1024*512 + 512*512 + 512*10) FLOPs; the backward forms every weight gradient (F)
    and every input gradient but the first layer's (F - 2*1024*512)."""
    model = MODELS["mlp"]((1, 32, 32), CLASSES, width=512, depth=2)
    fwd = 2 * (1024 * 512 + 512 * 512 + 512 * 10)
    expected = fwd / (fwd + fwd + fwd - 2 * 1024 * 512)
    assert forward_cost(model, torch.zeros(1, 1, 32, 32)) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.428, abs=5e-4)  # issue 28's count, not 1/3
