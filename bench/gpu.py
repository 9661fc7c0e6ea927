"""GPU benchmark (run only where a CUDA device is lent): ResNet-18 on CIFAR-shaped tensors.

Measures training and unlearning (gd under the meter) examples/s, the Gaussian score's time for
750 poisons, and aggregate unlearning throughput of 1, 2 and 4 concurrent trials sharing the GPU
(what fractional `resources: {gpu: 0.5 | 0.25}` would do) against one trial per GPU.
Needs only PyTorch: `python -m bench.gpu` from the repo root.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import torch

from raysweep.budget import Meter
from raysweep.metrics import gaussian_scores
from raysweep.models import resnet18, seeded
from raysweep.train import train
from raysweep.unlearners import gd


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
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
