"""Models as `nn.Sequential` of blocks, so `blocks(model)[-k:]` is "the last k blocks" for EUk/CFk."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from raysweep.base.domains import PosFloat, PosInt

from . import gpt2


def mlp(input_shape, num_classes, *, width: PosInt = 512, depth: PosInt = 2) -> nn.Sequential:
    """`depth` hidden Linear+ReLU blocks (the first one flattens its input), then a linear head."""
    # Block by block, no list of `depth` widths first: an absurd depth (1e9) then stops at
    # footprint's module limit in seconds instead of allocating gigabytes before it.
    hidden = [
        nn.Sequential(nn.Linear(width if i else math.prod(input_shape), width), nn.ReLU())
        for i in range(depth)
    ]
    # Flatten lives inside the first block so every block has weights: K counts layers.
    hidden[0].insert(0, nn.Flatten())
    return nn.Sequential(*hidden, nn.Linear(width, num_classes))


def _conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def cnn(input_shape, num_classes, *, width: PosInt = 32) -> nn.Sequential:
    """Three conv-BN-ReLU-pool blocks (width, 2w, 4w channels) and a linear head."""
    c = input_shape[0]
    return nn.Sequential(
        nn.Sequential(_conv_bn(c, width), nn.MaxPool2d(2)),
        nn.Sequential(_conv_bn(width, 2 * width), nn.MaxPool2d(2)),
        nn.Sequential(_conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1)),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * width, num_classes)),
    )


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(input_shape, num_classes, *, width: PosInt = 64) -> nn.Sequential:
    """ResNet-18 with the CIFAR stem (3x3 conv, no max-pool): stem, 8 basic blocks, head."""
    stem = _conv_bn(input_shape[0], width)
    widths = [width, 2 * width, 4 * width, 8 * width]
    blocks, c_in = [], width
    for i, c_out in enumerate(widths):
        for j in range(2):
            blocks.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
            c_in = c_out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    return nn.Sequential(stem, *blocks, head)


class Frozen(nn.Module):
    """A trained feature extractor that nothing trains: no gradients, and always in eval mode
    (its BatchNorm statistics stay those of its own training), whatever `.train()` is called."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def split_head(model: nn.Module) -> tuple[nn.Sequential, nn.Linear]:
    """(the model without its final linear layer, that layer): a trained classifier's
    penultimate features and its classifier. The body's state-dict keys are the model's own."""
    *rest, head = blocks(model)
    if isinstance(head, nn.Linear):
        return nn.Sequential(*rest, nn.Flatten()), head
    if isinstance(head, gpt2.Head):
        return nn.Sequential(*rest, gpt2.Pool(head)), head.score
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        *pre, last = head  # a head block such as (pool, flatten, linear)
        return nn.Sequential(*rest, nn.Sequential(*pre), nn.Flatten()), last
    raise ValueError(
        f"the model's last block is a {type(head).__name__}; allowed: a head that ends in a "
        "linear layer"
    )


Extractor = Literal["mlp", "cnn", "resnet18", "gpt2"]


def linear(
    input_shape,
    num_classes,
    *,
    extractor: Extractor = "mlp",
    width: PosInt = 512,
    depth: PosInt = 2,
    heads: PosInt = 2,
    extractor_epochs: PosInt = 20,
    extractor_lr: PosFloat = 0.05,
    extractor_optimizer: Literal["sgd", "adamw"] = "sgd",
) -> nn.Sequential:
    """Logistic regression on the penultimate features of a frozen `extractor`: blocks
    (Frozen extractor, linear head), so only the head trains and K = 1 is the whole of it.

    The extractor is `width` wide (an MLP `depth` layers deep; GPT-2: n_embd = width, n_layer =
    depth, n_head = heads, no dropout), a checkpoint of its own trained on the clean train set
    by `train` for `extractor_epochs` at `extractor_lr` with `extractor_optimizer`, its other
    settings train's defaults (raysweep/extractor.py; those three are read there, not here).
    Built here it is freshly initialised: the trial loads its weights. Inputs still pass
    through it, so every attack remains an attack on inputs (text: on token embeddings).
    """
    arch = extractor_model(input_shape, num_classes, extractor, width, depth, heads)
    body, classifier = split_head(arch)
    return nn.Sequential(Frozen(body), nn.Linear(classifier.in_features, num_classes))


def extractor_model(
    input_shape, num_classes, name: str, width: int, depth: int, heads: int
) -> nn.Sequential:
    """The classifier whose training gives a linear model's extractor (its head is dropped)."""
    kwargs = {
        "mlp": {"width": width, "depth": depth},
        "gpt2": {"n_embd": width, "n_layer": depth, "n_head": heads, "dropout": 0.0},
    }.get(name, {"width": width})
    return MODELS[name](input_shape, num_classes, **kwargs)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an unlearner may change: all but a frozen extractor's."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def chunked(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """forward(x) chunk by chunk, without gradients: a whole set's logits or features without
    holding every row's activations at once. The caller sets the module's mode."""
    return torch.cat([forward(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def seeded(build, generator: torch.Generator):
    """Call `build()` with torch's default RNG seeded from `generator`, then restore the RNG.

    PyTorch's layer constructors draw their initial weights from the global RNG; forking it here
    keeps initialisation reproducible without seeding anything globally.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in forward order; K in EUk/CFk counts from the end of this list."""
    return list(model.children())


# Where the Gaussian attack's noise lives. Images: the input itself (the attack adds it to x).
# Text: the token embeddings, inside the model (gpt2.py), so the model holds the noise too.


def _unfrozen(model: nn.Module) -> list[nn.Module]:
    """The model's blocks with a frozen extractor's own blocks in its place: where the first
    layer that sees the input is, whether or not it trains."""
    first, *rest = blocks(model)
    return [*blocks(first.body), *rest] if isinstance(first, Frozen) else [first, *rest]


def noise_space(model: nn.Module) -> tuple[Callable, Callable]:
    """(embed, rest): embed(x) is the clean representation the noise is added to, and
    rest(r, x) the logits from it, so that rest(embed(x), x) == model(x)."""
    first, *rest = _unfrozen(model)
    if isinstance(first, gpt2.TokenEmbedding):
        after = nn.Sequential(*rest)
        return first.tokens, lambda r, x: after(first.from_tokens(r, x))
    return (lambda x: x), (lambda r, x: model(r))


def noise_shape(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one row's Gaussian noise for this model."""
    first = _unfrozen(model)[0]
    if isinstance(first, gpt2.TokenEmbedding):
        return tuple(first.noise.shape[1:])
    return tuple(input_shape)


def carry_noise(model: nn.Module, noise: torch.Tensor | None) -> nn.Module:
    """Hand the Gaussian attack's per-row noise to a model that adds it itself (text)."""
    first = _unfrozen(model)[0]
    if noise is not None and isinstance(first, gpt2.TokenEmbedding):
        gpt2.carry_noise(first, noise)
    return model


MODELS = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
    "gpt2": gpt2.gpt2,
    "linear": linear,
}
