"""`newton`, the positive control of the convex regime (Guo et al. 2020): damped Newton steps on
the retain objective of a model's last linear layer, solved by conjugate gradient on
Hessian-vector products and paid for in counted FLOPs. UNLEARNERS lists it like the others."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from raysweep.base.domains import NonNegFloat, PosInt
from raysweep.science.budget import Meter, counted_cost
from raysweep.science.models import split_head

from . import softmax
from .steps import Pair, features, subset


def newton(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    meter: Meter,
    generator: torch.Generator,
    *,
    weight_decay: NonNegFloat = 5e-4,
    damping: NonNegFloat = 0.0,
    steps: PosInt = 1,
    cg_steps: PosInt = 100,
) -> None:
    """Damped Newton steps on the retain objective for the final linear layer (one by default):
    theta <- theta - (H + (lambda + damping) I)^-1 (grad L_r(theta) + lambda theta), where L_r
    is the mean cross-entropy on S_r and lambda the training weight decay (set it to the spec's
    train.weight_decay: the steps then head for the retrain optimum of a convex model). What
    comes before the layer stays fixed; on a linear model (frozen extractor, logistic head) that
    is the whole model, and one step is certified removal's update (Guo et al. 2020). Far from
    the optimum the logistic loss is not quadratic, so `steps` > 1 iterates.

    Solved in float64 by conjugate gradient with Hessian-vector products on the rows' cached
    features, never forming H. Cost: each row is charged `newton_row_cost` units (its
    featurisation once, then per step 2 + 2 * cg_steps products with the layer, in FLOPs against
    one row's forward+backward through the model), for all of cg_steps even if CG stops early;
    S_r is subsampled at random to what the budget affords.
    """
    prefix, head = split_head(model)
    cost = newton_row_cost(model, retain[0], steps * (1 + cg_steps))
    x, y = subset(meter, *retain, generator, cost, math.floor(meter.left / cost))
    if len(y) == 0:
        return
    with torch.no_grad():
        theta = torch.cat([head.weight, head.bias[:, None]], 1).double()  # bias: a weight on 1
        theta = newton_steps(features(prefix, x), y, theta, weight_decay, damping, steps, cg_steps)
        head.weight.copy_(theta[:, :-1])
        head.bias.copy_(theta[:, -1])


def newton_row_cost(model: nn.Module, x: torch.Tensor, passes: int) -> float:
    """Units one retain row (like `x`'s) costs `newton`: the prefix's forward once, then `passes`
    pairs of products with the layer's weights (a gradient is a forward and a backward product,
    each Hessian-vector product one more pair), counted by `budget.counted_cost`."""
    return counted_cost(model, x, ("newton", passes), partial(_newton_pass, passes=passes))


def _newton_pass(
    meta: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int
) -> Callable[[], object]:
    """`newton`'s work on rows `x` (a `budget.Pass`): the featurisation, then per pass phi's
    product with theta and back, shaped as in `newton_steps` (the bias as a weight on 1)."""
    prefix, head = split_head(meta)

    @torch.no_grad()
    def run() -> None:
        phi = softmax.with_bias(prefix.eval()(x).flatten(1))
        theta = torch.cat([head.weight, head.bias[:, None]], 1)
        # all passes as one batched product and back (the FLOPs of a loop over them, counted
        # at once); meta tensors hold no values, so nothing is kept
        thetas = theta.T.expand(passes, *theta.T.shape)
        (phi @ thetas).transpose(1, 2) @ phi

    return run


@torch.no_grad()
def newton_steps(
    feats: torch.Tensor,
    y: torch.Tensor,
    theta: torch.Tensor,
    weight_decay: float,
    damping: float,
    steps: int,
    cg_steps: int,
) -> torch.Tensor:
    """`steps` damped Newton steps for softmax regression on `feats` (mean cross-entropy +
    weight_decay/2 ||theta||^2), theta (classes, features + 1) with the bias last; float64,
    by conjugate gradient on Hessian-vector products, never forming H (softmax.py)."""
    phi = softmax.with_bias(feats.flatten(1).double())
    for _ in range(steps):
        p = torch.softmax(phi @ theta.T, 1)
        grad = softmax.gradient(theta, phi, y, p, weight_decay)
        hvp = partial(softmax.hessp, p=p, x=phi, ridge=weight_decay + damping)
        theta = theta - softmax.conjugate_gradient(hvp, grad, cg_steps, rtol=1e-10)
    return theta
