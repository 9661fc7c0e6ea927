"""GPU benchmark, the one script to run where a CUDA device is lent: ResNet-18 on CIFAR-shaped
tensors, and the throughput `raysweep plan` reads.

Measures training and unlearning (gd under the meter) examples/s, the Gaussian score's time for
750 poisons, and aggregate unlearning throughput of 1, 2 and 4 concurrent trials sharing the GPU
(what fractional `resources: {gpu: 0.5 | 0.25}` would do) against one trial per GPU. Then
`plan.calibrate` on each paper-scale spec's model, written to bench/throughput.json (where
`raysweep plan` looks), and one real trial of cifar10_resnet18_gaussian (`paper_trial`).
Needs PyTorch and this package, not Ray: `python -m bench gpu` from the repo root.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import multiprocessing as mp
import tempfile
import time

import torch

from raysweep.base.storage import open_store
from raysweep.experiment.metrics import gaussian_scores
from raysweep.experiment.spec import load, validate
from raysweep.experiment.trial import prepare, run_trial
from raysweep.runner import plan
from raysweep.science import data
from raysweep.science.budget import Meter
from raysweep.science.models import resnet18, seeded
from raysweep.science.train import train
from raysweep.unlearning.unlearners import gd

PAPER = ("search_spaces/cifar10_resnet18_gaussian.yaml", "search_spaces/imdb_gpt2_gaussian.yaml")


def _data(n: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
    return x, torch.randint(0, 10, (n,), generator=gen).to(device)


def _unlearn_throughput(n: int, device: str, seed: int, out):
    x, y = _data(n, device, seed)
    model = seeded(lambda: resnet18((3, 32, 32), 10), torch.Generator().manual_seed(seed)).to(
        device
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    gd(model, (x[:0], y[:0]), (x[:256], y[:256]), Meter(512), gen)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    gd(model, (x[:0], y[:0]), (x, y), Meter(n), gen, batch_size=128)
    torch.cuda.synchronize()
    out.put(n / (time.perf_counter() - t))


def _concurrent(k: int, n: int, device: str) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_unlearn_throughput, args=(n, device, i, q)) for i in range(k)]
    for p in procs:
        p.start()
    rates = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main(n: int = 8192) -> dict:
    if not torch.cuda.is_available():
        print("gpu: no CUDA device here; skipped")
        return {"skipped": "no CUDA device"}
    device = "cuda"
    x, y = _data(n, device)
    model = seeded(lambda: resnet18((3, 32, 32), 10), torch.Generator().manual_seed(0)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    train(model, x[:1024], y[:1024], gen, epochs=1, batch_size=128)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    train(model, x, y, gen, epochs=1, batch_size=128)
    torch.cuda.synchronize()
    out = {"device": torch.cuda.get_device_name(), "train_ex_per_s": n / (time.perf_counter() - t)}
    noise = 0.3 * torch.randn(750, 3, 32, 32, device=device)
    t = time.perf_counter()
    gaussian_scores(model, x[:750], y[:750], noise, 0.3)
    torch.cuda.synchronize()
    out["score_750_s"] = time.perf_counter() - t
    out["unlearn_ex_per_s"] = {k: _concurrent(k, n, device) for k in (1, 2, 4)}
    out["fractional_speedup"] = {
        k: v / out["unlearn_ex_per_s"][1] for k, v in out["unlearn_ex_per_s"].items()
    }
    out["throughput"] = write_throughput(torch.device(device))
    out["paper_trial"] = paper_trial()
    print(json.dumps(out, indent=1))
    return out


def write_throughput(device: torch.device, examples: int = 2048, paths=PAPER) -> dict:
    """`plan.calibrate` for each paper-scale spec's model on `device`, merged into
    bench/throughput.json (keyed by model and input shape), which `raysweep plan` reads."""
    table = json.loads(plan.MEASURED.read_text()) if plan.MEASURED.is_file() else {}
    for path in paths:
        p = plan.make(load(path))
        rate = plan.calibrate(p, examples, device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        today = dt.date.today().isoformat()
        entry = {**dataclasses.asdict(rate), "device": name, "date": today, "spec": path}
        table[plan.throughput_key(p.spec, p.shape)] = entry
    plan.MEASURED.write_text(json.dumps(table, indent=1) + "\n")
    return table


def cifar_shaped(*, root="", val_fraction=0.1, n_train=None, split_seed=0, n_test=10_000):
    """data.cifar10's split of random images of CIFAR-10's shape and sizes (none is on a lent
    machine): the same tensors, so the same costs, as the real data."""
    gen = torch.Generator().manual_seed(split_seed)
    n_val = round(50_000 * val_fraction)
    n = (n_train or 50_000 - n_val, n_val, n_test)
    x = [torch.rand((k, 3, 32, 32), generator=gen) for k in n]
    y = [torch.randint(0, 10, (k,), generator=gen) for k in n]
    return data._make_split(x[0], y[0], x[1], y[1], x[2], y[2], 10, source="cifar-shaped")


def paper_trial(epochs: int = 1, smaller: dict | None = None, n_test: int = 10_000) -> dict:
    """One real trial of cifar10_resnet18_gaussian at the paper's sizes (45,000 train rows, 750
    poisons, every measurement) on CIFAR-shaped random tensors, with the checkpoints trained
    `epochs` epochs instead of 100 (2 x 25 min of GPU time; training's speed is per example).

    Two gd runs (budgets 2 % and 10 % of C_train) separate unlearning from measuring: their
    difference in time is 8 % of C_train's units of unlearning alone. `smaller` (spec sections'
    keys to override) and `n_test` shrink it for a smoke run on a CPU.
    """
    raw = load(PAPER[0]).raw | {"budgets": [0.02, 0.1]}
    raw["train"] = raw["train"] | {"epochs": epochs}
    for section, values in (smaller or {}).items():
        raw[section] = raw[section] | values
    real = data.DATASETS["cifar10"]

    @functools.wraps(real)  # validated against data.cifar10's own signature
    def shaped(**kw):
        return cifar_shaped(**kw, n_test=n_test)

    data.DATASETS["cifar10"] = shaped
    try:
        spec = validate(raw, "cifar10_resnet18_gaussian (CIFAR-shaped)")
        store = open_store(tempfile.mkdtemp(prefix="raysweep-gpu-"))
        t = time.perf_counter()
        setup = prepare(json.dumps(spec.raw, sort_keys=True), store.uri, spec.seed)
        setup_s = time.perf_counter() - t
        rows = []
        for budget in (0.02, 0.1):
            t = time.perf_counter()
            row = run_trial(spec, store, "gd", budget, {"lr": 1e-3}, 0, report=rows.append)
            row["seconds"] = time.perf_counter() - t
    finally:
        data.DATASETS["cifar10"] = real
    (short, long), trained = rows, 2 * setup.c_train  # poisoned + retrain, about 2 C_train
    unlearn_per_s = (long["budget_units"] - short["budget_units"]) / (
        long["seconds"] - short["seconds"]
    )
    measure_s = short["seconds"] - short["budget_units"] / unlearn_per_s
    return {
        "train_rows": len(setup.split.y_train),
        "checkpoints_s": setup_s,
        "train_ex_per_s_upper": trained / setup_s,  # setup also crafts and measures twice
        "unlearn_ex_per_s": unlearn_per_s,
        "measure_s": measure_s,
        "gus_z_poisoned": setup.before["gus_z"],
    }


if __name__ == "__main__":
    main()
