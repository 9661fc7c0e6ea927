"""Softmax regression's numerics, shared by `newton` (the unlearner) and the mechanism study:
mean cross-entropy + wd/2·‖θ‖² on features with a bias column, θ (classes, features + 1) with the
bias last; its gradient and Hessian-vector product, and (preconditioned) conjugate gradient to
solve with that product without forming the Hessian. Callers compute the probabilities (each as
it always has, so its numbers stay bit for bit) and run their own Newton loop."""

from __future__ import annotations

from collections.abc import Callable

import torch


def with_bias(phi: torch.Tensor) -> torch.Tensor:
    """Features with a column of ones appended: the bias is the last weight of each class."""
    return torch.cat([phi, torch.ones_like(phi[:, :1])], 1)


def gradient(
    theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, p: torch.Tensor, wd: float
) -> torch.Tensor:
    """The objective's gradient at θ, given its class probabilities `p` on rows `x` (labels y)."""
    residual = p.clone()
    residual[torch.arange(len(y)), y] -= 1
    return residual.T @ x / len(y) + wd * theta


def hessp(v: torch.Tensor, p: torch.Tensor, x: torch.Tensor, ridge: float) -> torch.Tensor:
    """The objective's Hessian at probabilities `p` times v, never formed: per row
    (diag(p) − p pᵀ)(x v), back through x; `ridge` is wd, plus any damping."""
    pv = p * (x @ v.T)
    return (pv - p * pv.sum(1, keepdim=True)).T @ x / len(p) + ridge * v


def conjugate_gradient(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    steps: int,
    rtol: float,
    diag: torch.Tensor | None = None,
) -> torch.Tensor:
    """s with hvp(s) = b for a symmetric positive definite hvp, from s = 0 in at most `steps`
    iterations, stopping once the residual is at most `rtol` relative to b; preconditioned by
    the Hessian's diagonal `diag` if given (Jacobi)."""
    s, r = torch.zeros_like(b), b.clone()
    z = r if diag is None else r / diag
    d, rz, bound = z.clone(), float((r * z).sum()), rtol * float(b.norm())
    if float(r.norm()) <= bound:  # b = 0: s = 0 solves it (and d·Hd would be 0)
        return s
    for _ in range(steps):
        hd = hvp(d)
        a = rz / float((d * hd).sum())
        s, r = s + a * d, r - a * hd
        if float(r.norm()) <= bound:
            break
        z = r if diag is None else r / diag
        rz, rz_old = float((r * z).sum()), rz
        d = z + rz / rz_old * d
    return s
