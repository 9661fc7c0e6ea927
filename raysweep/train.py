"""Training from scratch: the poisoned model and the retrain reference both come from `train`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .budget import batches


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    *,
    epochs: int = 30,
    lr: float = 0.05,
    batch_size: int = 64,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> nn.Module:
    """SGD with momentum and a cosine learning-rate schedule over `epochs` passes of (x, y).

    No data augmentation: the Gaussian poison is a fixed per-row noise, and augmenting would
    transform it away from what the score measures against.
    """
    steps_per_epoch = -(-len(y) // batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total, pct_start=0.15, anneal_strategy="cos"
    )
    model.train()
    for _, (xb, yb) in zip(range(total), batches(x, y, batch_size, generator)):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
