"""Does each attack work before any unlearning? Measured against a control, over fixed seeds.

    PYTHONPATH=. python bench/attack_success.py --attack backdoor --seeds 20
    PYTHONPATH=. python bench/attack_success.py --attack gradient_matching --seeds 20 \
        --cifar10 ~/data/cifar10 --model resnet18 --width 64 --epochs 40 --device cuda
    PYTHONPATH=. python bench/attack_success.py --attack gradient_matching --seeds 20 \
        --size 8 --model linear --width 512 --epochs 100 --set surrogate_epochs=100

For each seed: craft the poisons with `ATTACKS[attack](split, Generator(seed), **kwargs)`, then
train the victim (the spec-style small CNN) from scratch on the poisoned set and on the
control set with the same initialisation and batch order, and compare. `--model linear`: the
victim is a linear head on a frozen MLP extractor (`--width`, depth 2, 20 epochs on the clean
train set, one per seed, as `trial.extractor_state` trains it), and the attack crafts through
that extractor (the fine-tuning threat model of models.linear).

- gradient_matching: target classified as y_adv, and the mean log p(y_adv | target) (graded:
  how far the poisons moved it, when nothing flips); control = the same poisons unperturbed, i.e.
  the clean train set (the poisons are clean-label rows of class y_adv). For scale, also
  `success_blend`: the same poisons moved straight towards the target image by up to eps per
  pixel (a crude feature collision with the same l-inf budget, not an attack raysweep ships).
- gradient_canceling: clean test accuracy; controls = the same rows with random noise of the
  same l2 norm per row (clamped to the valid range) and the poisons' labels (`acc_noise`), and
  with uniform noise in the same l-inf ball, within the valid range, and the same labels
  (`acc_uniform`); with `labels='flip'` also the label flips alone (`acc_labels_only`, inputs
  unperturbed). The summary gives the paired drop against `acc_uniform` with a 95 % interval.
- backdoor: attack success rate on triggered test rows not of class y_adv, and clean test
  accuracy; control = the clean train set.
- label_flip: clean test accuracy; control = the clean train set.

Prints one line per seed and a summary; success rates over all targets (seeds x n_targets)
come with Wilson 95 % intervals. Attack parameters: `--set key=value` (Python literal).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import statistics
import time

import torch

from raysweep.experiment.metrics import accuracy, logits
from raysweep.experiment.trial import moved
from raysweep.poisoning import crafting
from raysweep.poisoning.attacks import ATTACKS
from raysweep.science.data import cifar10, digits
from raysweep.science.models import MODELS, Frozen, extractor_model, seeded, split_head
from raysweep.science.train import train


def victim(
    split, x, y, seed: int, *, width: int, epochs: int, model="cnn", shift=0, extractor=None
):
    """The victim's training run; the same seed gives the same init and batch order. Given a
    frozen `extractor`, a linear head on it (the `linear` model family) is all that trains."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if extractor is not None:
        k = split.num_classes
        return crafting.head_on(extractor, x, y, k, gen, epochs=epochs, lr=0.05, shift=shift)
    build = lambda: MODELS[model](split.input_shape, split.num_classes, width=width)
    return train(seeded(build, gen).to(x.device), x, y, gen, epochs=epochs, shift=shift)


def frozen_extractor(split, seed: int, width: int) -> Frozen:
    """An MLP (width, depth 2) trained 20 epochs on the clean train set, minus its head, frozen."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    build = lambda: extractor_model(split.input_shape, split.num_classes, "mlp", width, 2, 1)
    x, y = split.x_train, split.y_train
    model = train(seeded(build, gen).to(x.device), x, y, gen, epochs=20, lr=0.05)
    return Frozen(split_head(model)[0]).to(split.x_train.device)


def same_size_noise(split, p, seed: int) -> torch.Tensor:
    """The train set with each poison's perturbation replaced by random noise of equal l2 norm."""
    x0 = split.x_train[p.poison_idx]
    delta = (p.x[p.poison_idx] - x0).flatten(1)
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(20_000 + seed))
    noise = noise.to(delta.device)
    noise *= (delta.norm(dim=1) / noise.norm(dim=1))[:, None]
    x = split.x_train.clone()
    x[p.poison_idx] = crafting.clamp(x0 + noise.view_as(x0), split.x_min, split.x_max)
    return x


def blend(split, p, eps: float) -> torch.Tensor:
    """The train set with each poison moved towards the (first) target by at most eps pixels."""
    scale = split.x_max - split.x_min
    x0 = split.x_train[p.poison_idx]
    step = ((split.x_test[p.target_idx[:1]] - x0) / scale).clamp(-eps, eps) * scale
    x = split.x_train.clone()
    x[p.poison_idx] = crafting.clamp(x0 + step, split.x_min, split.x_max)
    return x


def uniform_noise(split, p, seed: int, eps: float) -> torch.Tensor:
    """The train set with each poison replaced by its clean row plus uniform noise in the l-inf
    ball of eps pixels, clamped to the valid range: the same ball the attack optimised in."""
    x0 = split.x_train[p.poison_idx]
    u = torch.rand(x0.shape, generator=torch.Generator().manual_seed(40_000 + seed))
    x = split.x_train.clone()
    step = (2 * u.to(x0.device) - 1) * eps * (split.x_max - split.x_min)
    x[p.poison_idx] = crafting.clamp(x0 + step, split.x_min, split.x_max)
    return x


def measure(attack: str, split, p, seed: int, kwargs: dict, **train_kw) -> dict[str, float]:
    fit = lambda x, y: victim(split, x, y, seed, **train_kw)
    clean = fit(split.x_train, split.y_train)
    poisoned = fit(p.x, p.y)
    out = {
        "acc_poisoned": accuracy(poisoned, split.x_test, split.y_test),
        "acc_clean": accuracy(clean, split.x_test, split.y_test),
    }
    if attack == "gradient_matching":
        x_t = split.x_test[p.target_idx]
        out["success"] = (logits(poisoned, x_t).argmax(1) == p.y_adv).float().mean().item()
        out["success_control"] = (logits(clean, x_t).argmax(1) == p.y_adv).float().mean().item()
        out["targets"] = float(len(p.target_idx))
        # The same question, graded: how far the poisons moved log p(y_adv | target), in nats.
        log_adv = lambda m: logits(m, x_t).log_softmax(1)[:, p.y_adv].mean().item()
        out["logp_adv"], out["logp_adv_control"] = log_adv(poisoned), log_adv(clean)
        eps = kwargs.get("eps", inspect.signature(ATTACKS[attack]).parameters["eps"].default)
        blended = fit(blend(split, p, eps), split.y_train)
        out["success_blend"] = (logits(blended, x_t).argmax(1) == p.y_adv).float().mean().item()
    if attack == "gradient_canceling":
        noisy = fit(same_size_noise(split, p, seed), p.y)  # the same labels as the poisons
        out["acc_noise"] = accuracy(noisy, split.x_test, split.y_test)
        eps = kwargs.get("eps", inspect.signature(ATTACKS[attack]).parameters["eps"].default)
        uniform = fit(uniform_noise(split, p, seed, eps), p.y)
        out["acc_uniform"] = accuracy(uniform, split.x_test, split.y_test)
        if not torch.equal(p.y, split.y_train):
            flipped = fit(split.x_train, p.y)
            out["acc_labels_only"] = accuracy(flipped, split.x_test, split.y_test)
    if attack == "backdoor":
        keep = split.y_test != p.y_adv
        x_trig = p.triggered(split.x_test[keep])
        out["asr"] = (logits(poisoned, x_trig).argmax(1) == p.y_adv).float().mean().item()
        out["asr_control"] = (logits(clean, x_trig).argmax(1) == p.y_adv).float().mean().item()
    return out


def wilson(hits: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial rate hits / n."""
    rate, half = hits / n, z * math.sqrt(hits / n * (1 - hits / n) / n + z * z / (4 * n * n))
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    return max(0.0, centre - half / (1 + z * z / n)), min(1.0, centre + half / (1 + z * z / n))


def summarise(rows: list[dict[str, float]]) -> str:
    lines = []
    for key in rows[0]:
        values = [r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"  {key:16s} mean {statistics.mean(values):.4f}  sd {sd:.4f}")
    if "success" in rows[0]:  # over all targets: each seed's rate times its number of targets
        n = sum(r["targets"] for r in rows)
        for key in ("success", "success_control", "success_blend"):
            hits = round(sum(r[key] * r["targets"] for r in rows))
            lo, hi = wilson(hits, n)
            lines.append(
                f"  {key:16s} {hits}/{n:.0f} = {hits / n:.3f}  95% CI [{lo:.3f}, {hi:.3f}]"
            )
    if "acc_uniform" in rows[0]:  # paired over seeds: how much more the poisons cost than noise
        gaps = [r["acc_uniform"] - r["acc_poisoned"] for r in rows]
        half = 1.96 * statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else 0.0
        mean = statistics.mean(gaps)
        lines.append(
            f"  drop vs uniform  {100 * mean:.2f} points  95% CI "
            f"[{100 * (mean - half):.2f}, {100 * (mean + half):.2f}]"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attack", required=True, choices=sorted(set(ATTACKS) - {"gaussian"}))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=16, help="digits upsampled to size x size")
    parser.add_argument("--cifar10", metavar="ROOT", help="CIFAR-10 under ROOT instead of digits")
    parser.add_argument(
        "--model", default="cnn", choices=["cnn", "resnet18", "linear"], help="victim"
    )
    parser.add_argument("--width", type=int, default=16, help="victim model width")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (crafting and training)")
    parser.add_argument("--epochs", type=int, default=20, help="victim training epochs")
    parser.add_argument("--shift", type=int, default=0, help="victim trains on shifted images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kwargs = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    split = cifar10(root=args.cifar10) if args.cifar10 else digits(size=args.size)
    split = moved(split, torch.device(args.device))
    data = f"cifar10 {args.cifar10}" if args.cifar10 else f"digits {args.size}px"
    print(
        f"{args.attack} {kwargs} on {data}, {args.model} width {args.width}, "
        f"{args.epochs} epochs, seeds {args.first_seed}..{args.first_seed + args.seeds - 1}"
    )
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        started = time.time()
        train_kw = dict(width=args.width, epochs=args.epochs, model=args.model, shift=args.shift)
        extra = {}
        if args.model == "linear":
            train_kw["extractor"] = frozen_extractor(split, seed, args.width)
            if "extractor" in inspect.signature(ATTACKS[args.attack]).parameters:
                extra["extractor"] = train_kw["extractor"]  # the attacker knows it
        p = ATTACKS[args.attack](split, torch.Generator().manual_seed(seed), **extra, **kwargs)
        crafted = time.time() - started
        row = measure(args.attack, split, p, seed, kwargs, **train_kw)
        rows.append(row)
        shown = " ".join(f"{k}={v:.4f}" for k, v in row.items())
        print(
            f"seed {seed:3d} y_adv={p.y_adv} {shown} (craft {crafted:.0f}s, "
            f"total {time.time() - started:.0f}s)",
            flush=True,
        )
    print(f"summary over {len(rows)} seeds:\n{summarise(rows)}")


if __name__ == "__main__":
    main()
