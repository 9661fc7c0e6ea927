"""footprint.trial counts on meta tensors what a trial holds; checked against real tensors on
small models (parameters, saved activations, the dataset's rows) and against sizes known from
the paper's models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_SPEC

from raysweep.experiment import footprint
from raysweep.experiment.spec import validate
from raysweep.science.data import DATASETS
from raysweep.science.models import MODELS

TEXT = {
    "dataset": {"name": "synthetic_imdb", "n_train": 200, "n_test": 50, "max_len": 16},
    "model": {"name": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "dropout": 0.0},
    "attack": {"name": "gaussian", "n": 10, "eps": 0.03},
    "train": {"epochs": 1, "lr": 1e-3, "batch_size": 16, "optimizer": "adamw"},
}
MODELS_SMALL = {
    "mlp": {"name": "mlp", "width": 64, "depth": 2},
    "cnn": {"name": "cnn", "width": 8},
    "resnet18": {"name": "resnet18", "width": 8},
    "linear": {"name": "linear", "extractor": "cnn", "width": 8},
}


def _spec(**changes):
    return validate({**TINY_SPEC, **changes})


def _real(spec) -> torch.nn.Module:
    split = DATASETS[spec.dataset["name"]](
        **footprint.bound(DATASETS[spec.dataset["name"]], spec.dataset)
    )
    kwargs = {k: v for k, v in spec.model.items() if k != "name"}
    return split, MODELS[spec.model["name"]](split.input_shape, split.num_classes, **kwargs)


def _cases():
    yield "text", _spec(**TEXT)
    for name, model in MODELS_SMALL.items():
        yield name, _spec(model=model)


@pytest.mark.parametrize("name,spec", list(_cases()), ids=[n for n, _ in _cases()])
def test_parameters_and_rows_match_real_tensors(name, spec):
    split, model = _real(spec)
    fp, rows = footprint.trial(spec), footprint.shape(spec)
    real = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert fp.params == real
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert fp.grads == trainable
    assert fp.optimizer == trainable * (2 if spec.train.optimizer == "adamw" else 1)
    assert (rows.n_train, rows.n_val, rows.n_test) == tuple(
        len(t) for t in (split.y_train, split.y_val, split.y_test)
    )
    assert rows.input_shape == split.input_shape and rows.dtype == split.x_train.dtype
    held = sum(t.numel() * t.element_size() for t in (split.x_train, split.x_val, split.x_test))
    held += sum(t.numel() * t.element_size() for t in (split.y_train, split.y_val, split.y_test))
    assert fp.data == held


def _saved_on_cpu(net, x, y) -> int:
    """Bytes saved for backward by a real CPU step: each storage once, parameters not."""
    skip = {p.data_ptr() for p in net.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(net(x).float(), y, reduction="sum").backward()
    return sum(saved.values())


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "text"])
def test_activations_match_a_real_cpu_step(name):
    spec = _spec(**TEXT) if name == "text" else _spec(model=MODELS_SMALL[name])
    split, model = _real(spec)
    batch = spec.train.batch_size
    x, y = split.x_train[:batch].clone(), split.y_train[:batch].clone()  # a batch is a copy
    real = _saved_on_cpu(model.train(), x, y)
    counted = footprint.trial(spec).activations
    # exact but for attention: the meta device takes SDPA's math path, which saves a little
    # more than the CPU's fused kernel (an upper bound, as the docstring says)
    assert real <= counted <= real * (1.1 if name == "text" else 1.0), (counted, real)


def test_paper_sizes():
    """gpt2-medium has 355M parameters (Radford et al. 2019), ResNet-18 on CIFAR-10 11.2M."""
    gpt2 = validate(
        {
            **TINY_SPEC,
            **TEXT,
            "model": {"name": "gpt2"},
            "dataset": {**TEXT["dataset"], "max_len": 512},
        }
    )
    assert footprint.trial(gpt2).params / 4 == pytest.approx(355e6, rel=0.01)
    cifar = _spec(dataset={"name": "cifar10", "root": "/nonexistent"}, model={"name": "resnet18"})
    fp = footprint.trial(cifar)
    assert fp.params / 4 == pytest.approx(11.17e6, rel=0.01)
    rows = footprint.shape(cifar)
    assert (rows.n_train, rows.n_val, rows.n_test) == (45_000, 5_000, 10_000)
    assert fp.data == 60_000 * (3 * 32 * 32 * 4 + 8)


def test_peak_is_every_part_with_the_weights_held_copies_times():
    fp = footprint.trial(_spec())
    assert fp.peak == sum(fp.parts().values()) + (footprint.COPIES - 1) * fp.params
    assert math.isclose(fp.grads, fp.params)  # an MLP: no buffers, everything trains


def test_a_model_too_deep_to_count_is_refused_not_built():
    with pytest.raises(Exception, match="model: .* more than 20000 modules"):
        _spec(model={"name": "mlp", "width": 4, "depth": 50_000})
