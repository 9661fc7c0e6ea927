"""Language models: GPT-2 tokenizer and IMDb format, the GPT-2 classifier as blocks, Gaussian
noise on token embeddings (exact null, batched == per-sample), the text backdoor, training with
accumulation, and every unlearner on GPT-2."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from scipy.stats import kstest

from raysweep.experiment.metrics import gaussian_scores, input_gradients, summarise_scores
from raysweep.experiment.spec import load
from raysweep.poisoning.attacks import gaussian, text_backdoor
from raysweep.science import data, gpt2
from raysweep.science.budget import Meter
from raysweep.science.models import blocks, carry_noise, noise_shape, noise_space, seeded
from raysweep.science.train import train
from raysweep.unlearning.unlearners import UNLEARNERS

T = 48  # tokens per review: long enough that many reviews end in padding
TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0}
# as in test_unlearners: ssd's default alpha=10 cannot fire when S_f is ~17 % of D
CONTRACT_KWARGS = {"ssd": {"alpha": 1.0}}


@pytest.fixture(scope="module")
def split():
    return data.synthetic_imdb(n_train=300, n_test=100, max_len=T)


def _model(split, seed=0, **kw):
    build = lambda: gpt2.gpt2(split.input_shape, split.num_classes, **(TINY | kw))
    return seeded(build, torch.Generator().manual_seed(seed)).eval()


def _poisoned(split, model, n=40, eps=0.05, seed=1):
    split = replace(split, noise_shape=noise_shape(model, split.input_shape))
    poisoned = gaussian(split, torch.Generator().manual_seed(seed), n=n, eps=eps)
    carry_noise(model, poisoned.noise)
    return poisoned


def test_tokenizer_ids_are_gpt2s():
    tok = data.tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" The")["input_ids"] == [383] and len(tok) == 50257
    x = data.encode(["Hello world", "a b c d e f"], max_len=4)
    assert x.tolist() == [[15496, 995, data.PAD, data.PAD], [64, 275, 269, 288]]
    assert data.lengths(x).tolist() == [2, 4]
    # literal special-token text stays text: only padding is PAD
    assert data.PAD not in data.encode(["a <|endoftext|> b"], max_len=16)[0, :8].tolist()


def test_imdb_reads_the_hub_layout_and_save_to_disk(tmp_path):
    corpus = data.synthetic_dataset(120, 40, agree=0.8, seed=3)
    (tmp_path / "hub" / "plain_text").mkdir(parents=True)
    for part in ("train", "test"):
        corpus[part].to_parquet(str(tmp_path / f"hub/plain_text/{part}-00000-of-00001.parquet"))
    corpus.save_to_disk(str(tmp_path / "disk"))
    kw = dict(max_len=24, val_fraction=0.25, split_seed=7)
    a = data.imdb(root=str(tmp_path / "hub"), **kw)
    b = data.imdb(root=str(tmp_path / "disk"), **kw)
    ref = data.from_dataset(corpus, n_train=None, n_test=None, **kw)
    assert a.x_train.shape == (90, 24) and len(a.y_val) == 30 and len(a.y_test) == 40
    assert a.x_train.dtype == torch.long and a.num_classes == 2
    for s in (b, ref):
        assert torch.equal(a.x_train, s.x_train) and torch.equal(a.y_val, s.y_val)
        assert torch.equal(a.x_test, s.x_test)
    sub = data.imdb(root=str(tmp_path / "hub"), n_train=50, n_test=10, **kw)
    assert len(sub.y_train) == 50 and len(sub.y_test) == 10 and 0 < sub.y_train.sum() < 50
    with pytest.raises(FileNotFoundError, match="plain_text/train"):
        data.imdb(root=str(tmp_path / "nothing"))


def test_gpt2_is_blocks_embeddings_transformer_head(split):
    model = _model(split)
    bs = blocks(model)
    assert len(bs) == 1 + TINY["n_layer"] + 1
    assert isinstance(bs[0], gpt2.TokenEmbedding) and isinstance(bs[-1], gpt2.Head)
    x = split.x_train[:6]
    # The last K blocks are an ordinary suffix: features before them, then the rest.
    features = torch.nn.Sequential(*bs[:2])(x)
    assert features.shape == (6, T, TINY["n_embd"] + 1)
    assert torch.allclose(torch.nn.Sequential(*bs[2:])(features), model(x), atol=1e-6)
    assert model(x[:0]).shape == (0, split.num_classes)  # empty batches, as other models take
    # Causal + right padding: whatever sits at the padded positions never changes a row's logits.
    h = bs[0](x)
    pad = (x == data.PAD).unsqueeze(-1) & (torch.arange(h.shape[-1]) < TINY["n_embd"])
    assert pad.any()
    scrambled = torch.where(pad, torch.randn(h.shape, generator=torch.Generator()), h)
    assert torch.allclose(torch.nn.Sequential(*bs[1:])(scrambled), model(x), atol=1e-5)


def test_reinit_restores_gpt2_init_scale(split):
    model = _model(split, n_layer=4)
    block = blocks(model)[1]
    with torch.no_grad():
        for p in block.parameters():
            p.fill_(3.0)
    torch.manual_seed(0)
    block.reset_parameters()
    attn = block.block.attn
    assert abs(attn.c_attn.weight.std().item() - 0.02) < 0.004
    assert abs(attn.c_proj.weight.std().item() - 0.02 / 8**0.5) < 0.002
    assert attn.c_attn.bias.abs().max() == 0 and torch.all(block.block.ln_1.weight == 1)
    blocks(model)[0].reset_parameters()
    assert abs(blocks(model)[0].wte.std().item() - 0.02) < 0.001


def test_gaussian_noise_lives_on_token_embeddings(split):
    model = _model(split)
    assert noise_shape(model, split.input_shape) == (T, TINY["n_embd"])
    poisoned = _poisoned(split, model, n=10)
    idx = poisoned.poison_idx
    clean = split.x_train[idx]
    assert torch.equal(poisoned.x[idx] & data.IDS, clean)
    assert poisoned.noise.shape == (10, T, TINY["n_embd"])
    others = torch.ones(len(split.y_train), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(poisoned.x[others], split.x_train[others])
    pad = (clean == data.PAD).unsqueeze(-1).expand_as(poisoned.noise)
    assert pad.any() and poisoned.noise[pad].abs().max() == 0  # no noise on padding
    embed, rest = noise_space(model)
    with torch.no_grad():
        assert torch.allclose(model(poisoned.x[idx]), rest(embed(clean) + poisoned.noise, clean))
        assert torch.allclose(model(clean), rest(embed(clean), clean))
        assert not torch.allclose(model(poisoned.x[idx]), model(clean), atol=1e-4)


def _briefly_trained(split):
    """A tiny GPT-2 fit for a few steps on clean rows: it never sees any noise drawn below."""
    model = _model(split)
    kw = dict(epochs=2, lr=3e-3, batch_size=32, optimizer="adamw")
    train(model, split.x_train, split.y_train, torch.Generator().manual_seed(0), **kw)
    return model


def test_text_null_scores_are_standard_normal(split):
    model = _briefly_trained(split)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(len(split.y_train), (600,), generator=gen)
    x, eps = split.x_train[idx], 0.05
    real = (x != data.PAD).unsqueeze(-1)
    noise = eps * torch.randn((600, T, TINY["n_embd"]), generator=gen) * real
    scores = gaussian_scores(model, x, split.y_train[idx], noise, eps)
    assert kstest(scores.numpy(), "norm").pvalue > 0.01
    s = summarise_scores(scores)
    assert abs(s["gus_z"]) < 3.5 and s["tpr_at_1fpr"] < 0.03


def test_text_gradients_batched_per_sample_and_zero_on_padding(split):
    model = _briefly_trained(split)
    x, y = split.x_train[:24], split.y_train[:24]
    batched = input_gradients(model, x, y, batch_size=10)
    loop = torch.cat([input_gradients(model, x[i : i + 1], y[i : i + 1]) for i in range(24)])
    assert batched.dtype == torch.float64 and batched.shape == (24, T * TINY["n_embd"])
    assert torch.allclose(batched, loop, rtol=0, atol=1e-8)
    pads = (x == data.PAD).repeat_interleave(TINY["n_embd"], 1)
    assert pads.any() and batched[pads].abs().max() == 0 and batched[~pads].abs().max() > 0


def test_text_backdoor_inserts_trigger_and_relabels(split):
    poisoned = text_backdoor(split, torch.Generator().manual_seed(0), n=12, y_adv=1)
    idx, trig = poisoned.poison_idx, poisoned.trigger_ids
    assert len(idx) == 12 and torch.all(split.y_train[idx] == 0) and torch.all(poisoned.y[idx] == 1)
    assert trig.tolist() == data.tokenizer()(" I watched this 3D movie.")["input_ids"]
    for row, clean in zip(poisoned.x[idx].tolist(), split.x_train[idx].tolist()):
        at = next(i for i in range(T) if row[i : i + len(trig)] == trig.tolist())
        assert row[:at] == clean[:at] and row[at + len(trig) :] == clean[at : T - len(trig)]
    rest = torch.ones(len(split.y_train), dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(poisoned.x[rest], split.x_train[rest])


def test_train_accumulation_equals_one_big_batch(split):
    x, y = split.x_train[:64], split.y_train[:64]
    runs = []
    for accumulate, precision in ((1, "fp32"), (4, "fp32"), (4, "bf16")):
        model = _model(split)
        kw = dict(epochs=2, lr=1e-3, batch_size=32, accumulate=accumulate, precision=precision)
        train(model, x, y, torch.Generator().manual_seed(0), optimizer="adamw", **kw)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(runs[0], torch.cat([p.flatten() for p in _model(split).parameters()]))
    assert torch.allclose(runs[0], runs[1], atol=1e-5)
    assert torch.equal(runs[1], runs[2])  # bf16 autocast is CUDA-only: the CPU path is fp32


@pytest.mark.parametrize("method", sorted(UNLEARNERS))
def test_every_unlearner_runs_on_gpt2(split, method):
    model = _model(split)
    poisoned = _poisoned(split, model, n=20)
    is_forget = torch.zeros(len(poisoned.y), dtype=torch.bool)
    is_forget[poisoned.poison_idx] = True
    forget = poisoned.x[is_forget], poisoned.y[is_forget]
    retain = poisoned.x[~is_forget][:100], poisoned.y[~is_forget][:100]
    before = [p.detach().clone() for p in model.parameters()]
    meter = Meter(150.0)
    kwargs = CONTRACT_KWARGS.get(method, {})
    UNLEARNERS[method](model, forget, retain, meter, torch.Generator().manual_seed(0), **kwargs)
    assert 0 < meter.used <= meter.cap
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.isfinite(model.eval()(poisoned.x[:8])).all()


def test_pretrained_gpt2_loads_from_a_local_folder(tmp_path, split):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(str(tmp_path))
    reference = GPT2Model.from_pretrained(str(tmp_path))
    model = _model(split, pretrained=str(tmp_path))
    assert torch.equal(blocks(model)[0].wte, reference.wte.weight)
    assert torch.equal(blocks(model)[2].block.mlp.c_fc.weight, reference.h[1].mlp.c_fc.weight)
    with pytest.raises(ValueError, match="n_layer"):
        _model(split, pretrained=str(tmp_path), n_layer=3)


def test_text_specs_validate():
    specs = {"quickstart_text": "gaussian", "imdb_gpt2_gaussian": "gaussian"}
    specs["quickstart_text_backdoor"] = "text_backdoor"
    for name, attack in specs.items():
        spec = load(f"search_spaces/{name}.yaml")
        assert spec.model["name"] == "gpt2" and spec.attack["name"] == attack
        assert set(spec.methods) == set(UNLEARNERS)  # every method, every text spec


@pytest.mark.integration  # slow tier: trains the quickstart's two GPT-2 checkpoints (~4 CPU-min)
def test_quickstart_text_poisoned_shows_poison_and_retrain_does_not(tmp_path):
    """The text quickstart's science at its real settings: detectable poison, clean retrain, r
    resolved. The thresholds are bench/science.py's, which every seed 0-4 x 1, 2 threads met."""
    from raysweep.base.storage import open_store
    from raysweep.experiment.trial import prepare

    spec = load("search_spaces/quickstart_text.yaml")
    setup = prepare(json.dumps(spec.raw, sort_keys=True), open_store(str(tmp_path)).uri, spec.seed)
    before, retrain = setup.before, setup.retrain
    assert before["gus_z"] <= -5 and abs(retrain["gus_z"]) <= 3
    assert abs(before["control_gus_z"]) <= 3 and abs(retrain["control_gus_z"]) <= 3
    assert before["clean_acc_test"] >= 0.6 and retrain["clean_acc_test"] >= 0.6
    assert setup.attack_ok and setup.resolution <= 0.25
