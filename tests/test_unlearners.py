"""Every unlearner x every model: the shared contract, then each method's own promise."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from raysweep.base.storage import open_store
from raysweep.experiment.spec import validate
from raysweep.experiment.trial import prepare, run_trial
from raysweep.science.budget import Meter
from raysweep.science.models import MODELS, blocks, seeded
from raysweep.unlearning import steps
from raysweep.unlearning import unlearners as U

SHAPE, CLASSES = (3, 16, 16), 10
MODEL_KWARGS = {"mlp": {"width": 32}, "cnn": {"width": 8}, "resnet18": {"width": 8}}
# ssd's default alpha=10 can never fire when S_f is 20 % of D (it needs I_F > alpha * I_D >=
# alpha * 0.2 * I_F); the contract's data is that small, so it runs ssd with alpha=1.
CONTRACT_KWARGS = {"ssd": {"alpha": 1.0}}
CAPS = [0.0, 0.3, 1.0, 2.5, 17.0, 90.0]


def build(name: str, seed: int = 0):
    fn = lambda: MODELS[name](SHAPE, CLASSES, **MODEL_KWARGS.get(name, {}))
    return seeded(fn, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def data():
    """64 retain rows and 16 forget rows; the forget inputs are noisier, as the poisons are."""
    g = torch.Generator().manual_seed(1)
    retain = (torch.randn(64, *SHAPE, generator=g), torch.randint(0, CLASSES, (64,), generator=g))
    forget = (
        3 * torch.randn(16, *SHAPE, generator=g),
        torch.randint(0, CLASSES, (16,), generator=g),
    )
    return forget, retain


def unlearn(method, model, data, cap, seed=0, **kwargs):
    meter = Meter(cap)
    kwargs = {**CONTRACT_KWARGS.get(method, {}), **kwargs}
    U.UNLEARNERS[method](model, *data, meter, torch.Generator().manual_seed(seed), **kwargs)
    return meter


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# Image models here; the text model (token ids, not images) runs every unlearner in test_text.py.
IMAGE_MODELS = [n for n in MODELS if n != "gpt2"]
every = pytest.mark.parametrize(
    "method,model_name", [(m, n) for m in U.UNLEARNERS for n in IMAGE_MODELS]
)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the contract ------------------------------------------------------------------------------


@every
def test_changes_parameters_and_stays_finite(method, model_name, data):
    model = build(model_name)
    before = state(model)
    meter = unlearn(method, model, data, cap=160.0)
    changed = [k for k, p in model.named_parameters() if not torch.equal(p, before[k])]
    assert changed, f"{method} left every parameter of {model_name} as it was"
    assert 0 < meter.used <= meter.cap
    model.eval()
    with torch.no_grad():
        for x, _ in data:
            assert torch.isfinite(model(x)).all()
    assert all(torch.isfinite(v.float()).all() for v in model.state_dict().values())


@every
def test_same_seed_same_state(method, model_name, data):
    a, b = build(model_name), build(model_name)
    unlearn(method, a, data, cap=90.0, seed=7)
    unlearn(method, b, data, cap=90.0, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@every
def test_budget_never_exceeded(method, model_name, data):
    # That every pass is paid what it costs is counted in FLOPs in tests/test_flops.py.
    for cap in CAPS:
        meter = unlearn(method, build(model_name), data, cap=cap)
        assert meter.used <= cap + 1e-9, (cap, meter.used)


def test_ssd_pays_for_every_fisher_row(data, monkeypatch):
    rows = [0]
    fisher = steps.fisher

    def counting(model, x, y, *args, **kwargs):
        rows[0] += len(y)
        return fisher(model, x, y, *args, **kwargs)

    monkeypatch.setattr(U, "fisher", counting)
    for cap in [1.0, 2.0, 5.0, 30.0, 1000.0]:
        rows[0] = 0
        meter = unlearn("ssd", build("cnn"), data, cap=cap)
        assert rows[0] <= meter.used <= cap
    assert rows[0] == 80  # a cap that affords everything uses all of S_f and S_r


# --- the last K blocks ---------------------------------------------------------------------------


def _far_from_init(model):
    # Move every weight and statistic off its initial value, so a re-initialised one is recognisable.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0).add_(0.5)
        for b in model.buffers():
            b.add_(1)


@pytest.mark.parametrize("k", [1, 3])
def test_euk_reinitialises_exactly_the_last_k_blocks(k, data):
    model = build("resnet18")
    _far_from_init(model)
    before = copy.deepcopy(model)
    unlearn("euk", model, data, cap=0.0, k=k)  # no budget: only the re-initialisation happens
    n = len(blocks(model))
    for i, (old, new) in enumerate(zip(blocks(before), blocks(model))):
        so, sn = old.state_dict(), new.state_dict()
        if i < n - k:
            assert all(torch.equal(so[key], sn[key]) for key in so), f"block {i} moved"
            continue
        for key in so:
            assert not torch.equal(so[key], sn[key]), f"block {i} {key} kept"
        for m in new.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                bound = 1 / math.sqrt(m.weight[0].numel())  # kaiming_uniform(a=sqrt(5)) bound
                assert m.weight.abs().max() <= bound
            if isinstance(m, torch.nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.running_mean == 0).all()
                assert (m.running_var == 1).all() and m.num_batches_tracked == 0


@pytest.mark.parametrize("method", ["euk", "cfk"])
def test_frozen_blocks_stay_bit_identical_while_the_rest_trains(method, data):
    model = build("cnn")
    before = copy.deepcopy(model)
    featurise, train_suffix = steps.last_costs(model, 2, data[1][0])  # counted before the hooks
    seen = {"prefix": 0, "suffix": 0}
    count = lambda part: lambda m, i, out: seen.__setitem__(part, seen[part] + len(out))
    blocks(model)[0].register_forward_hook(count("prefix"))
    blocks(model)[-1].register_forward_hook(count("suffix"))
    meter = unlearn(method, model, data, cap=300.0, k=2, lr=0.05)
    # Each retain row paid the frozen prefix once, then the last 2 blocks' cost per pass.
    assert seen["prefix"] == 64 and seen["suffix"] > 100
    assert meter.used == pytest.approx(seen["prefix"] * featurise + seen["suffix"] * train_suffix)
    assert 0 < featurise < 1 and 0 < train_suffix < 1
    n = len(blocks(model))
    for i, (old, new) in enumerate(zip(blocks(before), blocks(model))):
        so, sn = old.state_dict(), new.state_dict()  # includes BatchNorm statistics
        same = all(torch.equal(so[key], sn[key]) for key in so)
        assert same == (i < n - 2), f"{method}: block {i}"


def test_k_past_the_block_count_means_the_whole_model(data):
    model = build("mlp")
    before = state(model)
    unlearn("cfk", model, data, cap=100.0, k=99)
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters())
    with pytest.raises(ValueError, match="k=0"):
        unlearn("euk", build("mlp"), data, cap=100.0, k=0)


# --- noise, ascent, dampening ---------------------------------------------------------------------


@pytest.mark.parametrize("sigma2", [1e-7, 1e-4])
def test_ngd_noise_has_the_configured_variance(sigma2, data):
    model = build("mlp")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    # lr=0: the GD step does nothing, so three steps (3 x 32 rows) add exactly three draws.
    unlearn("ngd", model, data, cap=96.0, lr=0.0, sigma2=sigma2, batch_size=32)
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    n, expected = len(delta), 3 * sigma2
    # The sample variance of n Gaussians has relative standard error sqrt(2/n) (0.8 % at n=29k):
    # 5 % is six standard errors, so an off-by-a-step or a wrong scale (>= 33 %) cannot pass.
    assert abs(delta.double().var().item() / expected - 1) < 0.05
    assert abs(delta.double().mean().item()) < 5 * math.sqrt(expected / n)


def test_ga_raises_the_forget_loss(data):
    model = build("mlp")
    forget = data[0]
    loss = lambda: F.cross_entropy(model(forget[0]), forget[1]).item()
    start = loss()
    meter = unlearn("ga", model, data, cap=1000.0, lr=1e-2, steps=5)
    assert meter.used == 5 * 16  # steps caps it, not the budget
    assert loss() > start + 0.5


def _running_stats(model):
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k}


def test_gradient_ascent_at_lr_zero_changes_nothing(data):
    """A forward pass over S_f alone in train mode would move the BatchNorm running statistics
    towards the noisy forget rows: a change no update made (it once passed for unlearning)."""
    model = build("cnn")
    before = state(model)
    unlearn("ga", model, data, 500.0, lr=0.0)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_neggrad_plus_statistics_come_from_retain_batches_only(data):
    """Same seed, same batch order, forget inputs scaled 100x: at lr 0 the running statistics
    must not differ, because only the retain batches may update them."""
    (xf, yf), retain = data
    initial, runs = _running_stats(build("cnn")), []
    for scale in (1.0, 100.0):
        model = build("cnn")
        unlearn("neggrad_plus", model, ((scale * xf, yf), retain), 200.0, lr=0.0, beta=0.5)
        runs.append(_running_stats(model))
    assert all(torch.equal(v, runs[1][k]) for k, v in runs[0].items())
    assert any(not torch.equal(v, initial[k]) for k, v in runs[0].items())  # retain batches did


def test_scrub_max_steps_keep_batchnorm_statistics(data):
    teacher = build("cnn").eval()
    student = copy.deepcopy(teacher).train()
    before = _running_stats(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    U.scrub_max_step(student, teacher, data[0][0], opt, 4.0)
    assert all(torch.equal(v, before[k]) for k, v in _running_stats(student).items())
    assert student.training and all(m.training for m in student.modules())


@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_ssd_never_increases_any_weight(alpha, data):
    model = build("resnet18")
    before = state(model)
    unlearn("ssd", model, data, cap=1000.0, alpha=alpha)
    shrunk = 0
    for k, p in model.named_parameters():
        assert (p.abs() <= before[k].abs()).all(), k
        assert (torch.sign(p) * torch.sign(before[k]) >= 0).all(), k  # dampened, never flipped
        shrunk += int((p.abs() < before[k].abs()).sum())
    for k, b in model.named_buffers():
        assert torch.equal(b, before[k]), k
    if alpha == 1.0:
        assert shrunk > 0


# --- SCRUB's two phases, SalUn's mask --------------------------------------------------------------


def _teacher_student():
    teacher = build("mlp").eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # start apart: at student == teacher the KL and its gradient are 0
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return teacher, student, torch.optim.SGD(student.parameters(), lr=0.05)


def test_scrub_max_steps_raise_the_forget_kl(data):
    teacher, student, opt = _teacher_student()
    xf = data[0][0]
    kl = lambda: steps.kl(student(xf), teacher(xf), 4.0).item()
    start = kl()
    for _ in range(5):
        U.scrub_max_step(student, teacher, xf, opt, 4.0)
    assert kl() > 2 * start


def test_scrub_min_steps_lower_the_retain_loss(data):
    teacher, student, opt = _teacher_student()
    xr, yr = data[1]
    loss = lambda: F.cross_entropy(student(xr), yr).item()
    start = loss()
    for _ in range(10):
        U.scrub_min_step(student, teacher, xr, yr, opt, 1.0, 1.0, 4.0)
    assert loss() < start - 0.1


def test_salun_moves_only_the_salient_weights(data):
    model = build("cnn")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    unlearn("salun", model, data, cap=200.0, saliency=0.3, lr=0.05)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) != before
    assert 0 < moved.float().mean() <= 0.3  # weight decay is masked too


# --- partial discovery (trial.py) ------------------------------------------------------------------


def test_partial_discovery_forgets_a_known_fraction(tmp_path, tiny_spec_dict):
    tiny_spec_dict["forget"] = {"known_fraction": 0.5}
    spec, store = validate(tiny_spec_dict), open_store(str(tmp_path))
    setup = prepare(json.dumps(spec.raw, sort_keys=True), store.uri, spec.seed)
    poisons = setup.poisoned.x[setup.poisoned.poison_idx].flatten(1)
    n = len(poisons)  # 30

    def matches(x):  # how many poison rows appear, exactly, among the rows of x
        return int((poisons[:, None] == x.flatten(1)[None]).all(-1).any(1).sum())

    forget, retain = setup.probe.forget, setup.probe.retain
    assert len(forget[1]) == n // 2 and matches(forget[0]) == n // 2
    assert matches(retain[0]) == n - n // 2  # the undiscovered poisons stay in S_r
    assert len(forget[1]) + len(retain[1]) == len(setup.poisoned.y)
    assert len(setup.poisoned.noise) == n  # the score still looks at every poison
    row = run_trial(spec, store, "gd", 0.05, {"lr": 0.01}, 0, lambda r: None)
    assert math.isfinite(row["after_gus"])
