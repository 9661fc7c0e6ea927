"""Score computation: batched per-sample input gradients vs a per-sample loop (same numbers)."""

from __future__ import annotations

import torch

from raysweep.experiment.metrics import as_float64, batch_input_gradients, input_gradients
from raysweep.science.models import cnn, seeded

from .common import interleaved, median


def main(n: int = 64) -> dict:
    gen = torch.Generator().manual_seed(0)
    model = seeded(lambda: cnn((1, 32, 32), 10, width=16), gen).eval()
    x, y = torch.randn(n, 1, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    model64 = as_float64(model)

    def loop():
        # The same float64 model, one sample per backward pass.
        return torch.cat(
            [batch_input_gradients(model64, x[i : i + 1], y[i : i + 1]) for i in range(n)]
        )

    batched, looped = input_gradients(model, x, y), loop()
    max_diff = (batched - looped).abs().max().item()
    times = interleaved({"batched": lambda: input_gradients(model, x, y), "loop": loop}, reps=3)
    out = {
        "n": n,
        "batched_s": median(times["batched"]),
        "loop_s": median(times["loop"]),
        "max_abs_diff": max_diff,
        "equal_to_1e-8": max_diff <= 1e-8,
        "raw": times,
    }
    out["speedup"] = out["loop_s"] / out["batched_s"]
    print(
        f"score: batched {out['batched_s']:.3f}s vs loop {out['loop_s']:.3f}s for {n} poisons "
        f"-> {out['speedup']:.1f}x; max |diff| {max_diff:.1e}"
    )
    return out


if __name__ == "__main__":
    main()
