"""Meter overhead: `gd` under the budget meter vs a bare PyTorch loop over the same batches."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from raysweep.science.budget import Meter, batches
from raysweep.science.models import cnn, seeded
from raysweep.unlearning.unlearners import gd

from .common import interleaved, median


def main(n: int = 2048, batch_size: int = 64, epochs: int = 2) -> dict:
    gen = torch.Generator().manual_seed(0)
    base = seeded(lambda: cnn((1, 32, 32), 10, width=16), gen)
    x, y = torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    units = epochs * n

    def metered():
        model = copy.deepcopy(base)
        gd(model, (x[:0], y[:0]), (x, y), Meter(units), torch.Generator().manual_seed(1))

    def bare():
        # The same optimiser, shuffling and number of examples, with no meter in the way.
        model = copy.deepcopy(base)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        seen = 0
        for xb, yb in batches(x, y, batch_size, torch.Generator().manual_seed(1)):
            if seen >= units:
                break
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)

    times = interleaved({"metered": metered, "bare": bare}, reps=5)
    out = {"metered_s": median(times["metered"]), "bare_s": median(times["bare"]), "raw": times}
    out["throughput_ratio"] = out["bare_s"] / out["metered_s"]
    print(
        f"meter: gd under the meter runs at {out['throughput_ratio']:.3f}x the bare loop's "
        f"throughput ({units} examples; target >= 0.95)"
    )
    return out


if __name__ == "__main__":
    main()
