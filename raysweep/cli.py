"""Command line: `raysweep validate SPEC`, `raysweep plan SPEC [--workers N] [--throughput X |
--calibrate] [--price USD]`, `raysweep run SPEC [--storage URI] [--address ADDR]
[--resume] [--mlflow URI]`, `raysweep repair SPEC [--storage URI]`, `raysweep report RUN_DIR
[--out DIR]`, `raysweep doctor [--address ADDR] [--storage URI]`, `raysweep mechanism SPEC [--seeds N ...] [--storage URI] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys

from raysweep.base.specfile import SpecError


def load(path: str):
    """The spec at `path`, validated (experiment.spec.load). Imported here, not at the top:
    validation binds the spec to the registries and so loads torch, which `raysweep report`
    never needs (tests/test_report.py checks that it never loads)."""
    from raysweep.experiment.spec import load as validated

    return validated(path)


def _validate(args) -> int:
    spec = load(args.spec)
    low, high = spec.trials_range()
    cells = len(spec.cells())
    n = f"{cells * low}" if low == high else f"{cells * low}-{cells * high}"  # a range: min-max
    print(f"{args.spec}: ok ({cells} cells, {n} trials, spec hash {spec.hash})")
    return 0


# The longest a sweep may compute before its first trial can report: training one seed's
# checkpoints and one run at the largest budget, which no number of workers shortens. Past it, a
# spec's mistake (`train.epochs: 1e9`) is far likelier than an intent, and it would run for
# ever without a word.
MAX_SERIAL_DAYS = 30
# A GPU trial's speed is not measured here (that would hold a CUDA context in the driver for
# the whole sweep): without bench/'s measurement of the model, a speed no GPU reaches, so only
# what is hopeless on any GPU is refused.
FASTEST_TFLOPS = 10_000


def _check_time(spec) -> None:
    """SpecError (one line: file, key, value) if the serial part of the sweep's plan (`raysweep
    plan`: one seed's trainings, one run at the largest budget) takes more than MAX_SERIAL_DAYS
    at a trial's throughput: calibrated on this machine's CPUs (64 examples, a fraction of a
    second for small models), or for a GPU trial as above."""
    import torch

    from raysweep.runner import plan
    from raysweep.runner.preflight import this_machine

    try:
        p = plan.make(spec)
    except (ValueError, AssertionError, RuntimeError):
        return  # a model that cannot be built for its inputs: preflight.check_fits says why
    if spec.resources.gpu:
        fastest = f"{FASTEST_TFLOPS:,} TFLOP/s per GPU, faster than any"
        rate = plan.measured(p) or plan.from_tflops(p, FASTEST_TFLOPS, 1.0, fastest)
    elif p.footprint.peak > this_machine().memory:
        return  # not built here to be timed: preflight.check_machine refuses it in one line
    else:
        rate = plan.calibrate(p, examples=64, device=torch.device("cpu"))
    units = sum(p.seed_units.values()) + max(b for _, b in spec.cells()) * p.c_train
    days = units / rate.train / 86400
    if days > MAX_SERIAL_DAYS:
        raise SpecError(
            f"{spec.source}: train.epochs: {spec.train.epochs}: one seed's "
            f"trainings and one run take {days:,.0f} days at {rate.train:,.0f} examples/s "
            f"({rate.source}) before any trial reports; allowed: at most {MAX_SERIAL_DAYS} days "
            "(`raysweep plan SPEC --calibrate` shows the whole plan)"
        )


def _run(args) -> int:
    spec = load(args.spec)  # fails here, before Ray starts, on any spec problem
    # Imported by the commands that need them, not for a cycle: Ray, Optuna and pandas would
    # double `raysweep validate`'s start-up (about 4 s to 9 s).
    from raysweep.analysis import results
    from raysweep.reporting import report
    from raysweep.runner import sweep, tracking
    from raysweep.runner.cluster import RunStateError

    _check_time(spec)  # before Ray starts or anything is written
    try:
        # MLflow is checked before any compute: a missing extra or a bad URI fails in seconds.
        tracker = tracking.connect(args.mlflow, spec.name) if args.mlflow else None
        df, record = sweep.run_recorded(
            spec,
            args.storage,
            address=args.address,
            num_cpus=args.num_cpus,
            resume=args.resume,
            max_concurrent=args.max_concurrent,
        )
    except (RunStateError, tracking.TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tracker:
        n = tracking.log_rows(tracker, spec, df)
        print(f"MLflow: {n} new runs in experiment '{spec.name}' at {args.mlflow}")
    # This run's trials as the sweep recorded them (sweep.Record), not the files on disk: old
    # rows must not stand in for new ones that were lost.
    where = f"{args.storage}/{spec.name}/results"
    print(
        f"\n{spec.name}: {len(record.written)} trials run ({record.failed} failed), {len(df)} "
        f"recorded in all; Parquet rows in {where}\n"
    )
    failed = int((df["status"] != "ok").sum()) if len(df) else 0
    if len(df) and failed == len(df):  # nothing to tabulate: say why, and fail the command
        errors = df["error"].fillna("no error recorded").map(lambda e: e.splitlines()[0][:300])
        counts = errors.value_counts()
        print(
            f"error: all {failed} trials failed; the most common error ended {counts.iloc[0]} "
            f"of them: {counts.index[0]}",
            file=sys.stderr,
        )
        return 1
    if len(df):
        table = results.table(df, spec.trials_range()[1])
        print(report.markdown_table(table))
        print(
            f"\n{report.not_converged_line(table)} `raysweep run SPEC --resume` with a larger "
            "trials_per_cell continues them."
        )
        print(f"\nTables and figures: raysweep report {args.storage}/{spec.name}")
    return 0


def _repair(args) -> int:
    spec = load(args.spec)
    from raysweep.runner import sweep
    from raysweep.runner.cluster import RunStateError

    try:
        print(sweep.repair(spec, args.storage))
    except RunStateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args) -> int:
    spec = load(args.spec)
    from raysweep.runner import plan

    p = plan.make(spec, args.storage)
    rate = plan.measured(p)
    if args.throughput:
        rate = plan.given(p, args.throughput, args.fp64, "given with --throughput")
    if args.tflops:
        rate = plan.from_tflops(p, args.tflops, args.fp64, f"{args.tflops:g} TFLOP/s per GPU")
    if args.calibrate:
        rate = plan.calibrate(p)
    sched = None
    if rate is not None:
        slots = plan.slots(spec, args.workers, args.worker_cpus, args.worker_gpus)
        if slots == 0:
            print(plan.render(p))
            print(
                f"error: {args.spec}: resources: {spec.raw['resources']} does not fit a worker of "
                f"{args.worker_cpus:g} CPUs and {args.worker_gpus:g} GPUs",
                file=sys.stderr,
            )
            return 2
        gpus = args.worker_gpus if args.workers else 0
        sched = plan.schedule(p, rate, slots, args.workers or 1, gpus)
    print(plan.render(p, rate, sched, args.price))
    return 0


def _report(args) -> int:
    from raysweep.reporting import report

    try:
        md, paths = report.write(args.run_dir, args.out)
    except report.ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print("\n".join(["", "wrote:", *paths]))
    return 0


def _doctor(args) -> int:
    from raysweep.runner import doctor

    return doctor.main(address=args.address, storage=args.storage)


def _mechanism(args) -> int:
    spec = load(args.spec)
    import torch

    from raysweep.mechanism import figures as mechanism_figures
    from raysweep.mechanism import study as mechanism

    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # as the sweep runs one trial

    seeds = args.seeds if args.seeds is not None else [spec.seed + i for i in range(5)]
    df = mechanism.study(spec, args.storage, seeds)
    out = args.out or f"{args.storage}/{spec.name}/mechanism"
    paths = mechanism_figures.write(df, out, spec.budgets)
    print(mechanism.verdict_h1(df))
    print(mechanism.verdict_h2(df, max(spec.budgets)))
    print("\n".join(["", "wrote:", *paths]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raysweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a spec (names, keys, ranges) in seconds")
    p.add_argument("spec")
    p.set_defaults(fn=_validate)
    p = sub.add_parser("run", help="run a sweep on local Ray or a cluster")
    p.add_argument("spec")
    p.add_argument("--storage", default="runs", help="local path or s3:// / gs:// URI")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start locally)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment already in --storage (error if there is none)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: what the cluster fits now; set it to let autoscaling grow)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        default=None,
        help="also log every trial as an MLflow run at this tracking URI (pip install "
        "'raysweep[mlflow]')",
    )
    p.set_defaults(fn=_run)
    p = sub.add_parser(
        "repair", help="rebuild an experiment's Optuna studies from its rows (a lost journal)"
    )
    p.add_argument("spec")
    p.add_argument("--storage", default="runs", help="local path or s3:// / gs:// URI")
    p.set_defaults(fn=_repair)
    p = sub.add_parser("plan", help="what a sweep will run and cost: runs, FLOPs, memory, hours")
    p.add_argument("spec")
    p.add_argument(
        "--storage", default=None, help="continue the plan of the experiment already there"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="worker nodes (default: this machine alone)"
    )
    p.add_argument("--worker-cpus", type=float, default=4, help="CPUs per worker (cluster.yaml: 4)")
    p.add_argument("--worker-gpus", type=float, default=1, help="GPUs per worker (cluster.yaml: 1)")
    p.add_argument(
        "--throughput",
        type=float,
        default=None,
        metavar="EXAMPLES_PER_S",
        help="one trial's training examples/s at the spec's resources (forward passes at the "
        "FLOP ratio); default: bench/gpu.py's measurement of this model, if any",
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=None,
        help="instead of --throughput: the sustained TFLOP/s of one GPU (a trial gets its "
        "resources.gpu share), turned into examples/s by the model's counted FLOPs",
    )
    p.add_argument(
        "--fp64",
        type=float,
        default=0.5,
        help="float64 speed as a fraction of float32 with --throughput (the Gaussian score; "
        "0.5 on CPUs and H100s, 1/32 on A10G and consumer GPUs)",
    )
    p.add_argument(
        "--calibrate", action="store_true", help="measure the throughput here on the spec's model"
    )
    p.add_argument("--price", type=float, default=None, metavar="USD_PER_GPU_HOUR")
    p.set_defaults(fn=_plan)
    p = sub.add_parser("report", help="tables (Markdown, CSV) and figures of a finished run")
    p.add_argument("run_dir", help="<storage>/<experiment>, e.g. runs/quickstart")
    p.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    p.set_defaults(fn=_report)
    p = sub.add_parser("doctor", help="check a cluster and a storage before a long run")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start locally)")
    p.add_argument("--storage", default=None, help="local path or s3:// / gs:// URI to probe")
    p.set_defaults(fn=_doctor)
    p = sub.add_parser(
        "mechanism", help="the paper's §6 mechanism study on a linear spec (rows and figures)"
    )
    p.add_argument("spec")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=None, help="default: the spec's seed and the next 4"
    )
    p.add_argument("--storage", default="runs", help="checkpoints: local path or s3:// / gs:// URI")
    p.add_argument("--out", default=None, help="where to write (default: STORAGE/<name>/mechanism)")
    p.set_defaults(fn=_mechanism)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
