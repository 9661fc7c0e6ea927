"""What the driver checks before it writes anything or starts Ray: the dataset's files, that one
trial fits this machine or a node of the cluster (CPUs, GPUs, memory), and that the
experiment's storage reads back whole (rows, Optuna journal, checkpoints).

Each problem is one line naming the file and the fix, raised before `run` or `run --resume`
changes a byte, so a damaged store is never half-rewritten and a missing dataset never fails
every trial of a cluster run one at a time. Read-only, like everything here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
import torch
import yaml
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState
from ray._private import state

from raysweep.analysis import results
from raysweep.base.specfile import show
from raysweep.base.storage import CorruptStorage, Store
from raysweep.experiment import checkpoints, footprint
from raysweep.experiment.spec import Spec, SpecError
from raysweep.poisoning.attacks import ATTACKS
from raysweep.poisoning.records import RECORDS
from raysweep.science.data import DATASETS, Split
from raysweep.science.models import MODELS

# ---------------------------------------------------------------- data


def _cifar10(source: str, root: str, **_) -> None:
    """torchvision's on-disk CIFAR-10 (python version): every file present, with its md5."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    base = Path(root).expanduser() / CIFAR10.base_folder
    files = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], None]]
    expected = (
        f"expected torchvision's layout {base}/{{data_batch_1..5, test_batch, batches.meta}} "
        "(cifar-10-python.tar.gz extracted under dataset.root)"
    )
    for name, md5 in files:
        path = base / name
        if not path.is_file():
            raise SpecError(f"{source}: dataset.root: {path} is missing; {expected}")
        if md5 is not None and not check_integrity(str(path), md5):
            raise SpecError(f"{source}: dataset.root: {path} is not CIFAR-10's (md5); {expected}")


def _imdb(source: str, root: str, **_) -> None:
    """A local IMDb copy where `root` says (an empty root means the hub: nothing to check)."""
    if not root:
        return
    path = Path(root).expanduser()
    parquet = all(any(path.rglob(f"{s}*.parquet")) for s in ("train", "test"))
    if not ((path / "dataset_dict.json").is_file() or parquet):
        raise SpecError(
            f"{source}: dataset.root: {path} holds no IMDb copy; expected the hub's parquet "
            "layout (plain_text/train-*.parquet, plain_text/test-*.parquet) or a save_to_disk "
            "folder (dataset_dict.json)"
        )


# Datasets read from files the user provides; the others are built in (digits, synthetic_imdb).
DATA_CHECKS = {"cifar10": _cifar10, "imdb": _imdb}


def check_data(spec: Spec) -> None:
    """SpecError (one line: the path and what was expected) if the dataset's files are not there."""
    name = spec.dataset["name"]
    if name not in DATA_CHECKS:
        return
    # The defaults live in the dataset function's signature.
    DATA_CHECKS[name](spec.source, **footprint.bound(DATASETS[name], spec.dataset))


# Opened in the driver to check the limits that depend on the data: the built-in datasets and
# CIFAR-10 (its files checked first). A local IMDb copy would be tokenised here and again in
# every trial, so its limits are left to the trials.
OPENED = {"digits", "synthetic_imdb", "cifar10"}


def draw_limits(split: Split, name: str, y_adv: int = -1) -> dict[str, tuple[int, str]]:
    """Each count parameter of attack `name` -> (the most it can draw on `split`, from which rows),
    for any class `y_adv` = -1 may draw: the pools its record says it draws from (records.Pool),
    whose own check in the attack would fail only inside every trial."""
    train = torch.bincount(split.y_train.cpu(), minlength=split.num_classes).tolist()
    test = torch.bincount(split.y_test.cpu(), minlength=split.num_classes).tolist()
    classes = range(split.num_classes) if y_adv < 0 else [y_adv]
    which = "whichever class y_adv=-1 draws" if y_adv < 0 else f"y_adv={y_adv}"
    pools = {
        "train": (len(split.y_train), "the train rows"),
        "train of y_adv": (
            min(train[c] for c in classes),
            f"the train rows of class y_adv, {which}",
        ),
        "train not of y_adv": (
            min(len(split.y_train) - train[c] for c in classes),
            f"the train rows not of class y_adv, {which}",
        ),
        "test not of y_adv": (
            min(len(split.y_test) - test[c] for c in classes),
            f"the test rows not of class y_adv, {which}",
        ),
    }
    return {key: pools[pool] for key, pool in RECORDS[name].draws.items()}


def check_fits(spec: Spec) -> None:
    """SpecError (one line: file, key, value, what this data allows) for a value inside its
    domain but not inside this data: more poisons (or targets) than the rows the attack draws
    them from (`draw_limits`), a class the data does not have, a backdoor patch larger
    than the image, a model that cannot be built for its inputs."""
    name, src = spec.dataset["name"], spec.source
    if name not in OPENED:
        return
    split = DATASETS[name](**footprint.bound(DATASETS[name], spec.dataset))
    attack = footprint.bound(ATTACKS[spec.attack["name"]], spec.attack)
    classes = split.num_classes
    if attack.get("y_adv", -1) >= classes:
        raise SpecError(
            f"{src}: attack.y_adv: {attack['y_adv']}; allowed: -1 (random) or 0..{classes - 1}"
        )
    limits = draw_limits(split, spec.attack["name"], attack.get("y_adv", -1))
    for key, (most, rows) in limits.items():
        if attack.get(key, 0) > most:
            raise SpecError(f"{src}: attack.{key}: {attack[key]}; allowed: 1..{most} ({rows})")
    if "patch" in attack and split.x_train.dim() == 4:
        side = min(split.input_shape[1:])
        if attack["patch"] > side:
            raise SpecError(f"{src}: attack.patch: {attack['patch']}; allowed: 1..{side}")
    model = MODELS[spec.model["name"]]
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model(split.input_shape, classes, **footprint.bound(model, spec.model))
    except (ValueError, AssertionError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(f"{src}: model: cannot be built for {name}'s inputs: {reason}") from None


# ---------------------------------------------------------------- machines


@dataclass(frozen=True)
class Node:
    """What one machine offers a trial; memory None where it is not known (bytes)."""

    name: str
    cpu: float
    gpu: float
    memory: int | None
    gpu_memory: int | None = None

    def __str__(self) -> str:
        memory = "memory unknown" if self.memory is None else footprint.show(self.memory)
        offer = f"{self.cpu:g} CPU, {self.gpu:g} GPU, {memory}"
        return f"{self.name} ({offer})" if self.name else offer


def this_machine(num_cpus: int | None = None) -> Node:
    """This machine as a local Ray sees it: `num_cpus` (else every CPU), its GPUs, its RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = torch.cuda.device_count()
    vram = torch.cuda.get_device_properties(0).total_memory if gpus else None
    return Node("", num_cpus or os.cpu_count() or 1, gpus, ram, vram)


AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` puts it on the head


def cluster_nodes() -> list[Node]:
    """The node types the cluster's autoscaler may start (as GCS holds them, else as `ray up`
    left them on the head), else its live nodes. Needs a connected Ray."""
    # Ray Data reads the autoscaler's node types the same way (ray.data's cluster autoscaler).
    config = state.state.get_cluster_config()
    groups = [g for g in (config.node_group_configs if config else []) if g.max_count != 0]
    if groups:
        return [_node(f"node type {g.name}", dict(g.resources)) for g in groups]
    # Ray 2.60's autoscaler reports no node types to GCS; `ray up` writes its config to the
    # head's home, where `ray job submit` runs the driver (a cluster scaled to zero has only
    # the head alive, which runs no trials).
    bootstrap = Path(AUTOSCALER_CONFIG).expanduser()
    if bootstrap.is_file():
        types = yaml.safe_load(bootstrap.read_text()).get("available_node_types") or {}
        return [_node(f"node type {k}", t.get("resources") or {}) for k, t in types.items()]
    alive = [n for n in ray.nodes() if n["Alive"]]
    return [_node(f"node {n['NodeManagerAddress']}", n["Resources"]) for n in alive]


def _node(name: str, resources: dict) -> Node:
    # Ray's `memory` resource leaves out the object store; the trial's tensors may use both.
    memory = resources.get("memory")
    if memory is not None:
        memory = int(memory + resources.get("object_store_memory", 0))
    return Node(name, resources.get("CPU", 0), resources.get("GPU", 0), memory)


def check_machine(spec: Spec, num_cpus: int | None = None) -> None:
    """SpecError (one line: file, key, this machine's limit) if one trial of a local run asks
    for more CPUs, GPUs or memory (`footprint.trial`) than this machine has."""
    check_nodes(spec, [this_machine(num_cpus)], "this machine has")


def check_cluster(spec: Spec) -> None:
    """SpecError (one line) if no node of the connected cluster can hold one trial."""
    check_nodes(spec, cluster_nodes(), "a node of the cluster has")


def check_nodes(spec: Spec, nodes: list[Node], where: str) -> None:
    """SpecError unless some node has one trial's CPUs and GPUs, and memory for its peak: RAM
    for a CPU trial, one GPU's memory (its share, below one GPU) for a GPU trial."""
    src = spec.source
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    shown = "; ".join(map(str, nodes[:4])) + (f"; {len(nodes) - 4} more" if len(nodes) > 4 else "")
    if cpu > max(n.cpu for n in nodes):
        raise SpecError(f"{src}: resources.cpu: {cpu:g}; allowed: at most what {where}: {shown}")
    if gpu > max(n.gpu for n in nodes):
        raise SpecError(f"{src}: resources.gpu: {gpu:g}; allowed: at most what {where}: {shown}")
    placed = [n for n in nodes if n.cpu >= cpu and n.gpu >= gpu]
    if not placed:
        raise SpecError(
            f"{src}: resources: cpu {cpu:g} with gpu {gpu:g}; allowed: both on one node, and "
            f"{where}: {shown}"
        )
    memory = [(n.gpu_memory and n.gpu_memory * min(gpu, 1)) if gpu else n.memory for n in placed]
    if any(m is None for m in memory):
        return  # a node whose memory is unknown might hold it
    fp = footprint.trial(spec)
    if fp.peak > max(memory):
        key, value, needs = footprint.culprit(spec, fp)
        kind = "GPU memory" if gpu else "memory"
        best = placed[memory.index(max(memory))]
        raise SpecError(
            f"{src}: {key}: {show(value)}: {needs}; allowed: at most the {kind} {where}: "
            f"{footprint.show(max(memory))}" + (f", {best.name}" if best.name else "")
        )


# ---------------------------------------------------------------- storage


def check_storage(spec: Spec, store: Store, df: pd.DataFrame) -> None:
    """CorruptStorage (one line: the file and the fix) if the experiment's storage is damaged:
    a journal line that is not an Optuna entry, a journal that does not record the rows `df`
    (`results.read`, which names a row file that does not read), an artifact made but missing
    its meta.json, or a checkpoint the rows used that fails its sha256."""
    check_journal(store, spec.name)
    check_agreement(store, spec.name, df)
    for kind in checkpoints.EVENTS:
        for key in store.list(kind):
            checkpoints.check_made(store, kind, key)
    if len(df):
        used = {*df["poisoned_key"].dropna(), *df["retrain_key"].dropna()}
        for key in sorted(used):
            if store.exists(f"checkpoints/{key}/meta.json"):
                checkpoints.read(store, "checkpoints", key)  # the sha256 check
    check_poisons(spec, store)


def check_poisons(spec: Spec, store: Store) -> None:
    """Every poison set crafted for this spec's dataset and attack (any seed) passes its sha256,
    before the run rather than mid-sweep in the trial that loads it. A meta.json that does not
    read is named too (checkpoints.read), whoever crafted it."""
    mine = json.loads(json.dumps({"attack": spec.attack, "dataset": spec.dataset}, default=str))
    for key in store.list("poisons"):
        meta = f"poisons/{key}/meta.json"
        if not store.exists(meta):
            continue  # never finished; a crafted one without meta.json is check_made's
        try:
            config = json.loads(store.read(meta))["config"]
            ours = {k: config[k] for k in mine} == mine
        except (ValueError, KeyError, TypeError):
            ours = True  # damaged: read() says how, in one line
        if ours:
            checkpoints.read(store, "poisons", key)


def journal_trials(store: Store, experiment: str) -> dict[tuple[str, int], bool]:
    """(study, trial number) -> finished (COMPLETE) for every trial in the experiment's journal,
    read from a copy: nothing is written to the storage."""
    rel = f"{experiment}/optuna.journal"
    if not store.exists(rel):
        return {}
    with tempfile.TemporaryDirectory(prefix="raysweep-check-") as tmp:
        path = os.path.join(tmp, "optuna.journal")
        with open(path, "wb") as f:
            f.write(store.read(rel))
        journal = JournalStorage(JournalFileBackend(path))
        # FrozenStudy keeps its id private; looking each name up instead is quadratic.
        return {
            (study.study_name, t.number): t.state == TrialState.COMPLETE
            for study in journal.get_all_studies()
            for t in journal.get_all_trials(study._study_id, deepcopy=False)
        }


def check_agreement(store: Store, experiment: str, df: pd.DataFrame) -> None:
    """CorruptStorage (one line) unless the journal and the tuning rows record the same trials.

    A row the journal does not know (the journal lost, or replaced by another) would be
    overwritten by the next trial given its number; a finished trial without its row lost its
    result. Trials that never finished (running, failed, queued) may lack a row: `reconcile`
    re-plans them.
    """
    tuned = df[df["phase"] == "tune"] if len(df) else pd.DataFrame(columns=["cell", "trial_number"])
    rows = {(cell, int(n)) for cell, n in zip(tuned["cell"], tuned["trial_number"])}
    trials = journal_trials(store, experiment)
    fix = f"`raysweep repair SPEC --storage {store.uri}` rebuilds the studies from the rows"
    unknown = sorted(rows - trials.keys())
    if unknown:
        first = results.row_name(experiment, "tune", *unknown[0])
        what = "missing or empty" if not trials else "does not record every row"
        raise CorruptStorage(
            f"{store.path(f'{experiment}/optuna.journal')}: {what}: {len(unknown)} of "
            f"{len(rows)} tuning rows have no trial there (first: {store.path(first)}); a "
            f"resume would overwrite them; {fix}"
        )
    lost = sorted(k for k, finished in trials.items() if finished and k not in rows)
    if lost:
        first = results.row_name(experiment, "tune", *lost[0])
        raise CorruptStorage(
            f"{store.path(f'{experiment}/results')}: {len(lost)} trials the journal records as "
            f"finished have no row (first: {store.path(first)}); {fix} (those trials run again)"
        )


def check_journal(store: Store, experiment: str) -> None:
    """Every line of <experiment>/optuna.journal is a JSON Optuna entry ending in a newline.

    Optuna skips a bad last line but appends after it, which turns it into a bad line in the
    middle; from there the journal no longer loads.
    """
    rel = f"{experiment}/optuna.journal"
    if not store.exists(rel):
        return
    lines = store.read(rel).split(b"\n")  # the last piece is b"" if it ends in a newline
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)
        if last and line == b"":
            return
        if last or not _is_entry(line):  # a last piece with bytes: a write that never ended
            keep = f"keep only its first {number - 1} lines (`head -n {number - 1}`)"
            raise CorruptStorage(
                f"{store.path(rel)}: line {number} is not an Optuna journal entry (a torn or "
                f"damaged write); {keep if number > 1 else 'delete it'}, then `raysweep run "
                "SPEC --resume` runs the trials recorded after that point again"
            )


def _is_entry(line: bytes) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(entry, dict) and "op_code" in entry
