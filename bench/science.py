"""Does a spec's science hold on any machine? Its poisoned and retrain models over seeds x threads.

    PYTHONPATH=. python bench/science.py search_spaces/quickstart.yaml --seeds 0 1 2 3 4
    PYTHONPATH=. python bench/science.py search_spaces/quickstart_text.yaml --set attack.n=120

Float results differ in the last bits between machines and torch thread counts, and training
amplifies that: a setting checked on one seed and one CPU is an anecdote. For every seed and
thread count this trains the spec's poisoned model and retrain reference from scratch (a fresh
store each time: nothing is shared between runs) and checks, per run:

- Gaussian poisons show: poisoned gus_z <= -5 (-4 for the linear head: POISONED_Z);
- the retrain reference and the null control do not: |z| <= 3 (retrain gus_z, and control_gus_z
  of both models);
- r can be resolved: attack_ok, i.e. the attack's own check and `metrics.resolution` <= 0.25 (for
  any attack; the effect E_val of both models is printed);
- clean test accuracy of both models >= the spec's floor (`--min-acc`, else FLOORS), and, unless
  lost accuracy is the attack's effect (label_flip, gradient_canceling), the poisoned model within
  `--max-gap` of the retrain reference.

Prints one line per run and exits 1 if any run misses a threshold. `--set section.key=value`
(a Python literal) overrides the spec, for trying a setting before writing it down.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from math import nan

import torch

from raysweep.base.storage import open_store
from raysweep.experiment.spec import load, validate
from raysweep.experiment.trial import prepare

# The clean test accuracy each offline quickstart states in its comment.
FLOORS = {"quickstart": 0.95, "quickstart_text": 0.6, "quickstart_linear": 0.95}


def overridden(spec_path: str, sets: list[str]) -> dict:
    raw = load(spec_path).raw
    for item in sets:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw[section] = {**raw[section], name: ast.literal_eval(value)}
    return raw


# Poisoned gus_z a run must reach: -5 (clearly detectable), except where the model's capacity
# caps how much noise it can fit. A linear head on frozen features fits a fraction of each
# poison's noise: more poisons, epochs, eps or features did not raise it (widths 512-2048,
# 100-200 epochs, eps 4-6, n 300-400, wd 1e-4: seed 4 stays near -4.5 because its noise happens
# to align with the clean model's gradients, retrain z +1.8). -4 is still p < 1e-4 per run, and
# what r needs, the poisoned-vs-retrain gap resolved, is checked by attack_ok either way.
POISONED_Z = {"quickstart_linear": -4.0}

# Attacks whose effect is the clean accuracy they cost: the accuracy gap is what they measure.
ACCURACY_ATTACKS = {"label_flip", "gradient_canceling"}


def check(
    attack: str,
    before: dict,
    retrain: dict,
    attack_ok: bool,
    floor: float,
    max_gap: float,
    max_z: float = -5.0,
) -> list[str]:
    """The thresholds a run misses (empty: it passes). The z thresholds are the Gaussian attack's;
    other attacks are judged by attack_ok (their effect gap, resolved) and accuracy alone."""
    misses = []
    if "gus_z" in before and not before["gus_z"] <= max_z:
        misses.append(f"poisoned z > {max_z:g}")
    for name, z in (
        ("retrain z", retrain.get("gus_z", 0.0)),
        ("poisoned control z", before.get("control_gus_z", 0.0)),
        ("retrain control z", retrain.get("control_gus_z", 0.0)),
    ):
        if not abs(z) <= 3:
            misses.append(f"|{name}| > 3")
    if not attack_ok:
        misses.append("attack_ok false")
    if not min(before["clean_acc_test"], retrain["clean_acc_test"]) >= floor:
        misses.append(f"clean acc < {floor}")
    gap = abs(before["clean_acc_test"] - retrain["clean_acc_test"])
    if attack not in ACCURACY_ATTACKS and not gap <= max_gap:
        misses.append(f"clean acc gap > {max_gap}")
    return misses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--min-acc", type=float, default=None)
    ap.add_argument("--max-gap", type=float, default=0.05)
    args = ap.parse_args()
    raw = overridden(args.spec, args.set)
    spec = validate(raw, args.spec)
    floor = FLOORS.get(spec.name, 0.0) if args.min_acc is None else args.min_acc
    print(f"{args.spec} {' '.join(args.set)}: seeds {args.seeds}, threads {args.threads}")
    print(
        "seed threads | poisoned z  control | retrain z  control | E_val poisoned retrain | "
        "resolution attack_ok | "
        "acc poisoned retrain | poisons fit | loss-MIA TPR poisoned retrain | s | misses"
    )
    failed = 0
    for seed in args.seeds:
        for threads in args.threads:
            torch.set_num_threads(threads)
            started = time.time()
            with tempfile.TemporaryDirectory() as store:
                s = prepare(json.dumps(raw, sort_keys=True), open_store(store).uri, seed)
            b, r = s.before, s.retrain
            max_z = POISONED_Z.get(spec.name, -5.0)
            misses = check(spec.attack["name"], b, r, s.attack_ok, floor, args.max_gap, max_z)
            failed += bool(misses)
            print(
                f"{seed:4d} {threads:7d} | {b.get('gus_z', nan):10.2f} "
                f"{b.get('control_gus_z', nan):8.2f} | {r.get('gus_z', nan):9.2f} "
                f"{r.get('control_gus_z', nan):8.2f} | {b['effect_val']:14.3f} "
                f"{r['effect_val']:7.3f} | {s.resolution:10.3f} "
                f"{str(s.attack_ok):>9} | {b['clean_acc_test']:12.3f} {r['clean_acc_test']:7.3f} | "
                f"{b['forget_acc']:11.3f} | "
                f"{b['loss_mia_tpr']:20.3f} {r['loss_mia_tpr']:7.3f} | "
                f"{time.time() - started:3.0f} | {'; '.join(misses) or 'pass'}",
                flush=True,
            )
    runs = len(args.seeds) * len(args.threads)
    print(f"{runs - failed} of {runs} runs meet every threshold")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
