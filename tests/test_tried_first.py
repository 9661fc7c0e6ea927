"""Published settings first: validated against the method's space, queued as each new study's
first trials, never queued again on resume."""

from __future__ import annotations

import optuna
import pytest
import yaml

from raysweep.base.storage import open_store
from raysweep.experiment.spec import SpecError, load, validate
from raysweep.runner.progress import cell_key
from raysweep.runner.searcher import CellSearcher, cell_name, open_studies

FIRST = {"gd": [{"lr": 1e-3}, {"lr": 1e-2}], "ga": [{"lr": 5e-6}]}


def _error(tmp_path, spec: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


@pytest.mark.parametrize(
    "tried, expected",
    [
        ({"gd": [{"lr": 0.5}]}, ["tried_first.gd[0].lr", "out of range", "[0.0001, 0.1]"]),
        ({"gd": [{"lrr": 1e-3}]}, ["tried_first.gd[0]", "unknown key 'lrr'", "allowed: lr"]),
        ({"ga": [{"steps": 5}]}, ["tried_first.ga[0]", "unknown key 'steps'", "allowed: lr"]),
        ({"ngd": [{"lr": 1e-3}]}, ["tried_first", "unknown key 'ngd'", "allowed: ga, gd"]),
        ({"gd": {"lr": 1e-3}}, ["tried_first.gd", "allowed: a list of mappings"]),
    ],
)
def test_tried_first_is_checked_against_the_methods_space(
    tmp_path, tiny_spec_dict, tried, expected
):
    msg = _error(tmp_path, {**tiny_spec_dict, "tried_first": tried})
    assert all(e in msg for e in expected), msg


def test_int_parameters_take_ints_inside_their_range(tmp_path, tiny_spec_dict):
    tiny_spec_dict["methods"]["ga"]["steps"] = {"low": 1, "high": 10}
    assert validate({**tiny_spec_dict, "tried_first": {"ga": [{"steps": 3}]}})
    msg = _error(tmp_path, {**tiny_spec_dict, "tried_first": {"ga": [{"steps": 2.5}]}})
    assert "tried_first.ga[0].steps" in msg and "int in [1, 10]" in msg


def test_no_tried_first_keeps_the_spec_hash(tiny_spec_dict):
    # Experiments started before the key existed stay resumable (cluster.check_resume).
    assert "tried_first" not in validate(tiny_spec_dict).raw


def _suggest_all(spec, storage) -> list[dict]:
    store = open_store(storage)
    studies = open_studies(spec, store)
    # No trial runs here, so what is done comes from the studies (a sweep reads its rows).
    done = {n: {t.number for t in s.trials if t.state.is_finished()} for n, s in studies.items()}
    searcher = CellSearcher(spec, studies, done)
    configs = []
    while (config := searcher.suggest(f"t{len(configs)}")) is not CellSearcher.FINISHED:
        configs.append(config)
        cells = [c for c, _, _ in config["stops"]] + [config["cell"]]
        result = {cell_key("objective", c): 0.5 for c in cells}
        searcher.on_trial_complete(f"t{len(configs) - 1}", result)
    return configs


def _observed(configs) -> dict[str, list[tuple[int, dict]]]:
    """Each cell's (trial number, setting) in order: its own runs and its lead's checkpoints."""
    out = {}
    for c in configs:
        for cell, _, number in [*c["stops"], [c["cell"], c["budget"], c["number"]]]:
            out.setdefault(cell, []).append((number, c["params"]))
    return out


def test_tried_first_settings_are_each_cells_first_trials(tiny_spec_dict, tmp_path):
    spec = validate({**tiny_spec_dict, "trials_per_cell": 3, "tried_first": FIRST})
    observed = _observed(_suggest_all(spec, str(tmp_path)))
    for method, budget in spec.cells():
        cell = observed[cell_name(method, budget)]
        assert [number for number, _ in cell] == [0, 1, 2]
        first = FIRST[method]
        assert [{k: p[k] for k in first[0]} for _, p in cell[: len(first)]] == first
        if method == "ga":
            assert cell[0][1] == {"lr": 5e-6, "steps": 5}  # constants still apply

    # A resumed (longer) sweep continues the studies and queues nothing again.
    more = validate({**tiny_spec_dict, "trials_per_cell": 5, "tried_first": FIRST})
    observed = _observed(_suggest_all(more, str(tmp_path)))
    assert {n for cell in observed.values() for n, _ in cell} == {3, 4}
    tried = [p["lr"] for c, cell in observed.items() if c.startswith("gd") for _, p in cell]
    assert not set(tried) & {1e-3, 1e-2}


def test_at_most_trials_per_cell_settings_are_queued(tiny_spec_dict, tmp_path):
    spec = validate({**tiny_spec_dict, "trials_per_cell": 1, "tried_first": FIRST})
    observed = _observed(_suggest_all(spec, str(tmp_path)))
    assert [p["lr"] for c in ("gd-b0.05", "gd-b0.1") for _, p in observed[c]] == [1e-3, 1e-3]
    studies = open_studies(spec, open_store(str(tmp_path)))
    waiting = optuna.trial.TrialState.WAITING
    assert not any(t.state == waiting for s in studies.values() for t in s.trials)


def test_only_studies_that_sample_queue_them(tiny_spec_dict, tmp_path):
    """A prefix method's smaller cells get its largest cell's settings; a PER_BUDGET method's
    cells each sample, so each queues them."""
    tiny_spec_dict["methods"]["l1_sparse"] = {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}
    first = {"gd": [{"lr": 1e-3}], "l1_sparse": [{"lr": 1e-2}]}
    spec = validate({**tiny_spec_dict, "tried_first": first})
    studies = open_studies(spec, open_store(str(tmp_path)))
    queued = {n: [t.system_attrs["fixed_params"] for t in s.trials] for n, s in studies.items()}
    assert queued["gd-b0.1"] == [{"lr": 1e-3}] and queued["gd-b0.05"] == []
    assert queued["l1_sparse-b0.05"] == queued["l1_sparse-b0.1"] == [{"lr": 1e-2}]
