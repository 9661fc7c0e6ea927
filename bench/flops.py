"""What a pass costs per model, counted: the forward's share of a budget unit (a teacher's pass,
charged to scrub and bad_teacher) and EUk/CFk's frozen-prefix and last-k-blocks passes, for
the model of each shipped spec kind, on meta tensors as the meter counts them (budget.py).
The constant it replaced charged every forward 1/3."""

from __future__ import annotations

import time

import torch

from raysweep.science.budget import forward_cost
from raysweep.science.models import MODELS
from raysweep.unlearning.steps import last_costs

# (model kind, input shape, classes, config): the model of a shipped spec of each kind.
SPECS = {
    "mlp": ((1, 32, 32), 10, {"width": 512, "depth": 2}),  # quickstart
    "cnn": ((1, 16, 16), 10, {"width": 16}),  # quickstart_backdoor and the other digit CNNs
    "resnet18": ((3, 32, 32), 10, {"width": 64}),  # cifar10_resnet18_*
    "gpt2": ((512,), 2, {"dropout": 0.1}),  # imdb_gpt2_gaussian: gpt2-medium, 512 tokens
    "linear": ((1, 8, 8), 10, {"extractor": "mlp", "width": 1024, "depth": 2}),  # quickstart_linear
}


def main(k: int = 3) -> dict:
    out = {}
    for name, (shape, classes, config) in SPECS.items():
        with torch.device("meta"):  # shapes only: gpt2-medium is not initialised
            model = MODELS[name](shape, classes, **config)
        x = torch.zeros((1, *shape), dtype=torch.long if name == "gpt2" else torch.float)
        started = time.perf_counter()
        forward = forward_cost(model, x)
        prefix, suffix = last_costs(model, k, x)
        out[f"{name}_forward"] = forward
        out[f"{name}_prefix_k{k}"], out[f"{name}_suffix_k{k}"] = prefix, suffix
        # What the 1/3 constant charged a teacher's pass below (> 0) or above its count.
        out[f"{name}_teacher_undercharge"] = 1 - (1 + 1 / 3) / (1 + forward)
        out[f"{name}_count_s"] = time.perf_counter() - started
        print(
            f"flops: {name}: a forward is {forward:.3f} of a unit (was 1/3); with k={k}, a row "
            f"through the frozen prefix {prefix:.3f}, a last-{k}-blocks step {suffix:.3f}"
        )
    return out


if __name__ == "__main__":
    main()
