"""Why perturbation poisons fail on offline digits: a perturbed row is memorised as an exception.

    PYTHONPATH=. python bench/memorisation.py --eps 0.0627 --seeds 20

For each seed: flip the labels of n random train rows (attacks.label_flip), then train the
victim CNN (bench/attack_success.py's, same init and batch order) on four versions of them and
compare clean test accuracy:

- flip_only: the flipped rows as they are (the label-flip attack);
- noise_all / noise_ink / noise_blank: the same rows with a random +-eps per-pixel sign pattern
  everywhere, only on the ink (pixels above blank), or only on the blank background.

If the accuracy lost to label flips comes back once the flipped rows are perturbed, the victim
is telling the perturbed rows apart and memorising them one by one; then a poison built from
perturbations (gradient canceling's, Witches' Brew's) cannot move the rest of the model either.
"""

from __future__ import annotations

import argparse

import torch

from bench.attack_success import summarise, victim
from raysweep.experiment.metrics import accuracy
from raysweep.poisoning import crafting
from raysweep.poisoning.attacks import label_flip
from raysweep.science.data import digits


def measure(split, seed: int, n: int, eps: float, **train_kw) -> dict[str, float]:
    p = label_flip(split, torch.Generator().manual_seed(seed), n=n)
    lo, hi = split.x_min, split.x_max
    x0 = split.x_train[p.poison_idx]
    signs = torch.randint(0, 2, x0.shape, generator=torch.Generator().manual_seed(30_000 + seed))
    step = eps * (hi - lo) * (2 * signs.float() - 1)
    ink = (x0 > lo + 0.02 * (hi - lo)).float()
    acc = lambda x, y: accuracy(victim(split, x, y, seed, **train_kw), split.x_test, split.y_test)
    out = {"clean": acc(split.x_train, split.y_train), "flip_only": acc(split.x_train, p.y)}
    for name, where in (("noise_all", 1.0), ("noise_ink", ink), ("noise_blank", 1 - ink)):
        x = split.x_train.clone()
        x[p.poison_idx] = crafting.clamp(x0 + step * where, lo, hi)
        out[name] = acc(x, p.y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eps", type=float, default=16 / 255, help="l-inf, pixel units")
    parser.add_argument("--n", type=int, default=100, help="flipped rows")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = digits(size=args.size)
    rows = []
    for seed in range(args.seeds):
        rows.append(measure(split, seed, args.n, args.eps, width=16, epochs=20))
        print(f"seed {seed:3d} " + " ".join(f"{k}={v:.4f}" for k, v in rows[-1].items()))
    print(f"summary over {len(rows)} seeds, eps {args.eps:.4f}, n {args.n}:\n{summarise(rows)}")


if __name__ == "__main__":
    main()
