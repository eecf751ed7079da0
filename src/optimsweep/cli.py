"""The command line: parse, call, print. The work lives in the modules it calls."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from optimsweep.errors import Expected, StoreError, UsageError, describe

# Only the standard library above: the signal handlers go in before torch, MLflow and Optuna
# are imported, so a Ctrl-C during start-up is handled like any other.
from optimsweep.util.signals import stop_on_signals
from optimsweep.util.terminal import quiet
from optimsweep.util.urls import redact_text

if TYPE_CHECKING:
    from optimsweep.core.train import EpochStats, TrainConfig


def _config_flags(parser: argparse.ArgumentParser) -> None:
    from optimsweep.core.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        if f.type == "dict":  # factory arguments: model.NAME / data.NAME in --config's file
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            metavar=f.name.upper(),
                            help=f"{f.metadata['doc']} (default: "
                            f"{'unset' if f.default is None else f.default})")


def load_config_file(path: Path) -> dict:
    import yaml

    from optimsweep.core.train import ConfigError

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: can't be read as YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of training parameters")
    return values


def _print_epoch(config: TrainConfig, stats: EpochStats) -> None:
    acc = "" if stats.val_accuracy is None else f"  val accuracy: {100 * stats.val_accuracy:.1f}%"
    acc += "".join(f"  {k}: {v:.4g}" for k, v in stats.extra.items())
    print(f"Epoch {stats.epoch}/{config.epochs}  train loss: {stats.train_loss:.6f}  "
          f"val loss: {stats.val_loss:.6f}{acc}  lr: {stats.lr:.3g}  ({stats.seconds:.1f}s)",
          flush=True)


def cmd_train(args) -> int:
    from optimsweep.core.train import TrainConfig, fit, load_data
    from optimsweep.core.usercode import is_import_string

    values = load_config_file(args.config) if args.config else {}
    if args.config and "code_dir" not in values and any(
            is_import_string(values.get(k)) for k in ("task", "model", "metric")):
        values["code_dir"] = str(Path(args.config).resolve().parent)  # your code beside it
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if getattr(args, f.name, None) is not None})
    config = TrainConfig.from_dict(values)
    data = load_data(config)
    n_train, n_val, n_test = data.sizes
    print(f"training {config.model} on {config.task} ({n_train} train / {n_val} validation / "
          f"{n_test} test{', streamed' if data.streaming else ''}) on {data.device}")
    saved = _checkpoint_of(args, config)
    result = fit(config, data, on_epoch=lambda s: _print_epoch(config, s), **saved)
    acc = "" if result.test_accuracy is None else f"Accuracy: {100 * result.test_accuracy:.1f}%, "
    extra = "".join(f", {k}: {v:.6g}" for k, v in result.test_extra.items())
    print(f"Test Error:\n {acc}Avg loss: {result.test_loss:.6f}{extra}")
    if args.save:
        from optimsweep.core.artifacts import save_state_dict

        save_state_dict(result.model, args.save)
        print(f"state_dict saved to {args.save}")
        _checkpoint_file(args.save).unlink(missing_ok=True)  # finished: nothing to go on from
    return 0


def _checkpoint_file(save: Path) -> Path:
    return save.with_name(save.name + ".checkpoint")


def _checkpoint_of(args, config) -> dict:
    """With --save, training is checkpointed beside the target, and goes on from a
    checkpoint found there (unless --fresh)."""
    from optimsweep.core import checkpoint
    from optimsweep.core.train import load_checkpoint

    if not args.save:
        return {}
    path, state = _checkpoint_file(args.save), None
    if path.exists() and not args.fresh:
        try:
            state = load_checkpoint(path, config)
            print(f"resumed at epoch {state.epoch} of {config.epochs} from {path}")
        except checkpoint.Refused as exc:
            print(f"note: checkpoint {path} refused: {exc}; training from epoch 0",
                  file=sys.stderr)
    writer = checkpoint.Checkpointer(checkpoint.file_sink(path), args.checkpoint_every)
    return {"resume": state, "checkpointer": writer}


def cmd_data(args) -> int:
    from optimsweep.core.data import prepare_fashion_mnist

    raw = prepare_fashion_mnist(args.root)
    print(f"FashionMNIST ready in {raw}")
    return 0


def _print_table(table) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 200,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))


def cmd_sweep(args) -> int:
    from optimsweep.report import summary_line, trials_table
    from optimsweep.run.runner import run_sweep
    from optimsweep.sweep.check import load_spec

    spec = load_spec(args.file)
    study = run_sweep(spec, n_trials=args.n_trials, timeout=args.timeout, workers=args.workers,
                      gpus_per_worker=args.gpus_per_worker, progress=not args.no_progress)
    print(f"\n{summary_line(study, args.n_trials or spec.budget.n_trials)}")
    print(f"top trials by {spec.metric} (validation; the test set's value is reported, never "
          "used to choose):")
    _print_table(trials_table(study, spec.metric, top=args.top))
    print(f"\ncompare the trials in MLflow (`make ui` serves a local store):\n  "
          f"{_trials_view(spec, study)}")
    print(f"next: make export SWEEP={spec.path}")
    return 0


def _trials_view(spec, study, port: int | None = None) -> str:
    """The MLflow UI address of the study's trials, flat, best first, in chart view."""
    from optimsweep.records.mlflow_ui import UI_PORT, trials_view, ui_base
    from optimsweep.records.schema import Attr
    from optimsweep.records.tracking import resolve_tracking_uri

    experiment_id = study.user_attrs.get(Attr.EXPERIMENT_ID)
    base = ui_base(resolve_tracking_uri(spec.tracking_uri), port or UI_PORT)
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    return trials_view(base, experiment_id, spec.metric, spec.maximize)


def cmd_url(args) -> int:
    from optimsweep.run.study import open_existing

    opened = open_existing(args.target)
    print(_trials_view(opened.spec, opened.study, args.port))
    return 0


def _print_confirmation(study) -> None:
    from optimsweep.records.schema import Ranking

    confirmed = Ranking.of(study)
    if not confirmed:
        return
    print(f"\nconfirmed over seeds {confirmed.seeds} (mean ± std, best first):")
    for trial, mean, std in confirmed.ranking:
        print(f"  trial {trial:4d}: {mean:.4f} ± {std:.4f}")


def cmd_best(args) -> int:
    from optimsweep.report import trials_table
    from optimsweep.run.study import open_existing

    opened = open_existing(args.target)
    print(f"study {opened.spec.name!r}, {opened.spec.direction} {opened.spec.metric}:")
    _print_table(trials_table(opened.study, opened.spec.metric, top=args.top))
    _print_confirmation(opened.study)
    return 0


def cmd_confirm(args) -> int:
    from optimsweep.confirm import confirm as run_confirm
    from optimsweep.run.study import open_existing

    opened = open_existing(args.target)
    results = run_confirm(opened, top_k=args.top_k, seeds=args.seeds)
    metric = opened.spec.metric
    print(f"\n{'rank':>4} {'trial':>5}  mean {metric} ± std      test accuracy (mean)  params")
    for rank, c in enumerate(results, 1):
        test = (f"{sum(c.test_accuracies) / len(c.test_accuracies):.4f}"
                if c.test_accuracies else "-")
        print(f"{rank:>4} {c.trial:>5}  {c.mean:.4f} ± {c.std:.4f}   {test:>20}  {c.params}")
    print(f"\nconfirmed winner: trial {results[0].trial}; `optimsweep export {args.target}` "
          "exports it")
    return 0


def cmd_export(args) -> int:
    from optimsweep.export import export_best
    from optimsweep.run.study import open_existing

    opened = open_existing(args.target)
    done = export_best(opened, args.out, register=not args.no_register)
    print(f"exported trial {done.trial.number} ({done.reason}) to {done.folder}/:")
    print("  config.yaml    every training parameter, ready to run")
    print("  state_dict.pt  its final weights (torch.load(..., weights_only=True))")
    print("  metrics.json   its metrics and provenance")
    print(f"reproduce: optimsweep train --config {done.folder / 'config.yaml'}")
    if reg := done.registered:
        made = "registered as" if reg.new else "already registered as"
        print(f"{made} {reg.name} version {reg.version}, now {reg.alias} ({reg.why})")
        print(f"serve:     make serve MODEL={reg.name}  (mlflow models serve -m {reg.uri} "
              "--env-manager local, MLFLOW_TRACKING_URI at the study's store)")
    print(f"compare:   {_trials_view(opened.spec, opened.study)}")
    for doubt in done.doubts:
        print(f"warning: {doubt}", file=sys.stderr)
    return 0


def cmd_services(args) -> int:
    from optimsweep import local_slurm, services

    slurm_dir = Path(args.dir) / "slurm"
    if args.action == "stop":
        stopped = services.stop(args.dir) + local_slurm.stop(slurm_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    endpoints = services.start(args.dir, args.pg_port, args.mlflow_port)
    print(f"PostgreSQL on 127.0.0.1:{endpoints.pg_port}, MLflow server (UI too) on "
          f"{endpoints.tracking_uri}; data in {endpoints.folder}/. To use them:")
    print(endpoints.exports())
    if args.slurm:
        cluster = local_slurm.start(slurm_dir, local_slurm.SLURMCTLD_PORT,
                                    local_slurm.SLURMD_PORT)
        print(f"a one-machine Slurm (partition debug) in {cluster.folder}/; its commands "
              "need:")
        print(cluster.exports())
    return 0


def cmd_slurm(args) -> int:
    import os

    from optimsweep import slurm
    from optimsweep.sweep.check import load_spec

    spec = load_spec(args.file)
    script, logs = slurm.default_paths(spec)
    job = slurm.ArrayJob(spec, args.array, logs=(args.logs or logs).resolve(),
                         lead=args.lead or slurm.stop_seconds(spec),
                         gpus_per_task=args.gpus_per_task,
                         gpus_per_worker=args.gpus_per_worker,
                         cpus_per_task=args.cpus_per_task, partition=args.partition,
                         time=args.time, requeue=args.requeue)
    environ, urls = dict(os.environ), slurm.stores(spec)  # a password refused: no script
    path = slurm.write(job, args.out or script, urls, environ)
    print(f"wrote {path}: {job.tasks} array tasks, one worker each "
          f"({'one per GPU of ' + str(job.gpus_per_task) if job.gpus_per_task else 'CPU'}), "
          f"output in {job.logs}/")
    print(f"time limit: warned {job.lead} s before it, the task checkpoints and requeues "
          f"itself; preempted, {'Slurm requeues it' if job.requeue else 'it is not requeued'}")
    if note := slurm.shared_disk_note(urls):
        print(f"note: {note}", file=sys.stderr)
    if not args.submit:
        print(f"submit: sbatch {path}")
        return 0
    job_id = slurm.submit(path, environ)
    print(f"submitted job array {job_id}: squeue -j {job_id}; tasks' output in "
          f"{job.logs}/optimsweep-{spec.name}-{job_id}_*.out")
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are expected failures too: one line and exit 2."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _every(value: str) -> str | float:
    from optimsweep.core.checkpoint import parse_every

    try:
        return parse_every(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _workers(value: str) -> int | str:
    from optimsweep.run.placement import parse_workers

    try:
        return parse_workers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optimsweep", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and library warnings")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one configuration (flags or --config FILE)")
    p.add_argument("--config", type=Path, help="YAML file of training parameters")
    p.add_argument("--save", type=Path, help="write the final state_dict here; training is "
                   "checkpointed to SAVE.checkpoint meanwhile and goes on from it if stopped")
    p.add_argument("--fresh", action="store_true",
                   help="start from epoch 0 even if SAVE.checkpoint exists")
    p.add_argument("--checkpoint-every", default="auto", type=_every,
                   help="seconds between checkpoints (0: every epoch; auto: at most 2%% of "
                   "the time)")
    _config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run or resume the study a sweep file declares")
    p.add_argument("file", type=Path, help="sweeps/NAME.yaml")
    p.add_argument("--n-trials", type=int, help="total trials for the study (default: budget)")
    p.add_argument("--timeout", type=float, help="seconds for this invocation")
    p.add_argument("--workers", type=_workers, default=None,
                   help="local worker processes, or auto: one per visible GPU (the default "
                   "where more than one is visible; else 1)")
    p.add_argument("--gpus-per-worker", type=int, default=None, metavar="K",
                   help="GPUs each worker sees (CUDA_VISIBLE_DEVICES), for trials that use "
                   "several")
    p.add_argument("--top", type=int, default=10, help="rows in the closing table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("best", help="the top trials of a study, best first")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--top", type=int, default=10, help="rows to show")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("confirm", help="re-train the top-k configs with fresh seeds")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--top-k", type=int, default=3, help="the best trials to re-train")
    p.add_argument("--seeds", type=int, default=3, help="fresh seeds each is trained with")
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("export", help="write the best (or confirmed) trial as a runnable config")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--out", type=Path, help="folder (default: exports/STUDY)")
    p.add_argument("--no-register", action="store_true",
                   help="only the folder: add no version to MLflow's Model Registry")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("url", help="the MLflow UI address that compares a study's trials")
    p.add_argument("target", help="sweep file or study name")
    p.add_argument("--port", type=int, help="where `mlflow ui` serves a local store "
                   "(default 5000)")
    p.set_defaults(func=cmd_url)

    p = sub.add_parser("services", help="start or stop a local PostgreSQL and MLflow server")
    p.add_argument("action", choices=("start", "stop"), help="start or stop them")
    p.add_argument("--dir", default=".services", help="their data, logs and password")
    p.add_argument("--pg-port", type=int, default=55432, help="PostgreSQL's port")
    p.add_argument("--mlflow-port", type=int, default=5001,
                   help="the MLflow tracking server's port")
    p.add_argument("--slurm", action="store_true", help="also a one-machine Slurm, to try "
                   "`optimsweep slurm` where no cluster is at hand")
    p.set_defaults(func=cmd_services)

    p = sub.add_parser("slurm", help="write (and --submit) a Slurm job array of workers for "
                       "a study")
    p.add_argument("file", type=Path, help="sweeps/NAME.yaml")
    p.add_argument("--array", type=int, required=True, metavar="N",
                   help="array tasks: N workers (one per GPU of each task)")
    p.add_argument("--gpus-per-task", type=int, metavar="K", help="GPUs Slurm gives each task")
    p.add_argument("--gpus-per-worker", type=int, metavar="G",
                   help="GPUs each worker of a task sees (default 1: one worker per GPU)")
    p.add_argument("--cpus-per-task", type=int, metavar="C",
                   help="CPUs Slurm gives each task (and its OMP_NUM_THREADS)")
    p.add_argument("--partition", metavar="P", help="the Slurm partition (default: Slurm's)")
    p.add_argument("--time", metavar="T", help="each task's time limit, as Slurm writes it "
                   "(MINUTES, HH:MM:SS, D-HH)")
    p.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=True,
                   help="a preempted task is started again (default: yes)")
    p.add_argument("--lead", type=int, metavar="S", help="seconds of warning before the time "
                   "limit (default: the sweep's store_timeout + 30)")
    p.add_argument("--out", type=Path, help="the script (default: slurm/STUDY.sbatch)")
    p.add_argument("--logs", type=Path, help="the tasks' output (default: slurm/logs/)")
    p.add_argument("--submit", action="store_true", help="submit it with sbatch")
    p.set_defaults(func=cmd_slurm)

    p = sub.add_parser("data", help="find, install or download FashionMNIST")
    p.add_argument("--root", type=Path, default=None, help="default: $OPTIMSWEEP_DATA or data/")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stop_on_signals()
    try:
        return _run(argv)
    except KeyboardInterrupt as exc:
        if "--debug" in argv:
            _print_traceback()
        print("\ninterrupted: the unfinished trial is marked failed and does not count; "
              "run the same command again to resume", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except Exception:  # a bug: its traceback, as Python would print it, less any secret
        _print_traceback()
        return 1


def _run(argv: list[str]) -> int:
    from optimsweep.records.storage import store_failures

    failures = store_failures()  # before anything can fail
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _expected(exc, "--debug" in argv)
    quiet(args.debug)
    try:
        return args.func(args)
    except Expected as exc:
        return _expected(exc, args.debug)
    except failures as exc:  # a store failing where no trial was running
        return _expected(StoreError(f"store: {describe(exc)}"), args.debug)


def _print_traceback() -> None:
    """--debug: the traceback, with every secret of a URL in it as ***."""
    print(redact_text(traceback.format_exc()), end="", file=sys.stderr)


def _expected(exc: Expected, debug: bool) -> int:
    """A failure a user can cause or meet: one line, no traceback (--debug shows it)."""
    if debug:
        _print_traceback()
    print(f"error: {redact_text(str(exc))}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
