"""Optuna runs the study: storage, sampler, pruner, and the objective that joins the shared
training core to MLflow tracking. A trial is "sample a config, then run `fit`"."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from optimsweep.plots import log_study_plots
from optimsweep.spec import PRUNERS, SAMPLERS, Spec, SpecError
from optimsweep.train import DivergedError

DEFAULT_STORAGE = "mlruns/optuna.journal"
COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


# ---------------------------------------------------------------- storage, sampler, pruner

def resolve_storage(spec_storage: str | None = None) -> str:
    return os.environ.get("OPTIMSWEEP_STORAGE") or spec_storage or DEFAULT_STORAGE


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A URL (postgresql://, sqlite:///) is an RDB; anything else is a journal file path,
    which several local worker processes can share safely (SQLite can't)."""
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(url))
    return optuna.storages.JournalStorage(backend)


def grid_space(spec: Spec) -> dict[str, list]:
    grid = {}
    for name, param in spec.search_space.items():
        dist = param.distribution
        if isinstance(dist, CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        elif isinstance(dist, FloatDistribution) and dist.step is not None:
            n = int(round((dist.high - dist.low) / dist.step))
            grid[name] = [dist.low + i * dist.step for i in range(n + 1)]
        else:
            raise ValueError(f"grid needs every search_space entry to be categorical or a "
                             f"range with a step; {name} is a continuous range")
    return grid


def build_sampler(spec: Spec, seed: int | None = None) -> optuna.samplers.BaseSampler:
    options = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler.get("name", "tpe")
    if name == "grid":
        return SAMPLERS[name](grid_space(spec), seed=seed, **options)
    if name == "tpe":
        # Conditional spaces: multivariate TPE with groups models each branch on its own.
        options.setdefault("multivariate", True)
        options.setdefault("group", options["multivariate"])
    with warnings.catch_warnings():  # "experimental" options are the ones worth using here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS[name](seed=seed, **options)


def build_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    options = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner.get("name", "median")
    if name == "hyperband":
        options.setdefault("max_resource", spec.budget.epochs)
    if name == "percentile":
        options.setdefault("percentile", 50.0)
    return PRUNERS[name](**options)


# ---------------------------------------------------------------- the objective

@dataclass
class StudyContext:
    """What every worker needs to run trials of one study; picklable for worker processes."""

    spec: Spec
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str


def make_objective(ctx: StudyContext, data, tracker):
    from optimsweep.space import suggest_config
    from optimsweep.train import fit

    spec = ctx.spec

    def objective(trial: optuna.Trial) -> float:
        config = suggest_config(trial, spec)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        run_id = tracker.start_trial(ctx.experiment_id, ctx.parent_run_id, spec.name,
                                     trial.number, config, trial.params,
                                     tags={"optimsweep.device": str(data.device)})
        trial.set_user_attr("mlflow_run_id", run_id)

        def on_epoch(stats) -> bool:
            tracker.log_epoch(run_id, stats)
            value = getattr(stats, spec.metric)
            if not math.isfinite(value):
                raise DivergedError(stats.epoch, 0, value, what=spec.metric)
            trial.report(value, stats.epoch)
            return trial.should_prune()

        try:
            result = fit(config, data, on_epoch=on_epoch)
        except DivergedError as exc:
            trial.set_user_attr("error", str(exc))
            tracker.finish_trial(run_id, "failed", error=str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            tracker.finish_trial(run_id, "failed", error="interrupted")
            raise
        except BaseException as exc:
            tracker.finish_trial(run_id, "failed", error=repr(exc))
            raise
        tracker.log_result(run_id, result)
        trial.set_user_attr("test_loss", result.test_loss)
        if result.test_accuracy is not None:
            trial.set_user_attr("test_accuracy", result.test_accuracy)
        trial.set_user_attr("epochs_run", len(result.history))
        value = getattr(result.final, spec.metric)
        if result.stopped_early:
            tracker.finish_trial(run_id, "pruned")
            raise optuna.TrialPruned(f"pruned after epoch {result.final.epoch}")
        tracker.finish_trial(run_id, "complete")
        return value

    return objective


def run_worker(ctx: StudyContext, n_trials: int, timeout: float | None, worker: int,
               n_workers: int, progress: bool) -> None:
    """One process's share of the study: load the data once, then run trials."""
    import torch

    from optimsweep.tracking import Tracker
    from optimsweep.train import TrainConfig, load_data

    if n_workers > 1:  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = ctx.spec
    data = load_data(TrainConfig.from_dict(spec.base_config()))
    storage = open_storage(ctx.storage_url)
    done = len(storage.get_all_trials(storage.get_study_id_from_name(spec.name),
                                      deepcopy=False))
    # Distinct seeds per worker and per resume, so no two samplers repeat each other.
    study = optuna.load_study(study_name=spec.name, storage=storage,
                              sampler=build_sampler(spec, seed=spec.seed * 10_007 + done * 101
                                                    + worker),
                              pruner=build_pruner(spec))
    study.optimize(make_objective(ctx, data, Tracker(ctx.tracking_uri)), n_trials=n_trials,
                   timeout=timeout, catch=(DivergedError,), show_progress_bar=progress)


# ---------------------------------------------------------------- the sweep

def counted_trials(study: optuna.Study) -> list:
    """Trials that use up the budget: all but waiting ones and those cut off by Ctrl-C."""
    return [t for t in study.get_trials(deepcopy=False, states=COUNTED_STATES)
            if not t.user_attrs.get("interrupted")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, tracker) -> int:
    """RUNNING trials left by a killed worker on this host never finish: fail them, mark them
    interrupted (so they don't use up the budget) and close their MLflow runs."""
    host, stale = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _pid_alive(int(t.user_attrs.get("pid", -1))):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.user_attrs.get("mlflow_run_id"):
            tracker.finish_trial(t.user_attrs["mlflow_run_id"], "failed", error="interrupted")
        stale += 1
    return stale


def open_study(spec: Spec, *, workers: int = 1):
    """Create or resume the study and its MLflow parent run; returns (study, context,
    tracker)."""
    from optimsweep.tracking import Tracker, resolve_tracking_uri

    storage_url = resolve_storage(spec.storage)
    if workers > 1 and storage_url.startswith("sqlite"):
        raise SpecError(f"{spec.path}: storage: SQLite can't serve {workers} parallel workers; "
                        "use a journal file path (the default) or a PostgreSQL URL")
    study = optuna.create_study(study_name=spec.name, storage=open_storage(storage_url),
                                direction=spec.direction, load_if_exists=True,
                                sampler=build_sampler(spec, seed=spec.seed),
                                pruner=build_pruner(spec))
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", spec.fingerprint())
        study.set_user_attr("sweep_file", str(spec.path))
        study.set_user_attr("sweep_text", spec.text)  # `export STUDY` works without the file
    elif known != spec.fingerprint():
        raise SpecError(
            f"{spec.path}: name: study {spec.name!r} already exists with a different task, "
            "search space, metric or fixed values; its trials would not be comparable. Give "
            "this sweep a new name (or delete the old study).")
    for params in spec.baseline:
        study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=True)

    tracker = Tracker(resolve_tracking_uri(spec.tracking_uri))
    experiment_id = tracker.experiment_id(spec.name)
    parent = tracker.study_run(
        experiment_id, spec.name, sweep_text=spec.text, sweep_file=str(spec.path),
        tags={"optimsweep.sampler": spec.sampler.get("name", "tpe"),
              "optimsweep.sampler_options": str(spec.sampler),
              "optimsweep.pruner": spec.pruner.get("name", "median"),
              "optimsweep.pruner_options": str(spec.pruner),
              "optimsweep.metric": f"{spec.direction} {spec.metric}",
              "optimsweep.storage": storage_url,
              "optimsweep.sweep_fingerprint": spec.fingerprint()})
    study.set_user_attr("mlflow_experiment_id", experiment_id)
    study.set_user_attr("mlflow_parent_run_id", parent)
    fail_stale_trials(study, tracker)
    ctx = StudyContext(spec, storage_url, tracker.uri, experiment_id, parent)
    return study, ctx, tracker


def _split_quota(total: int, workers: int) -> list[int]:
    return [total // workers + (1 if i < total % workers else 0) for i in range(workers)]


def _watch(study: optuna.Study, processes, target: int, start_count: int) -> None:
    """A progress bar over all worker processes, with the best value so far."""
    from tqdm import tqdm

    with tqdm(total=target, desc=study.study_name, unit="trial") as bar:
        while any(p.is_alive() for p in processes):
            time.sleep(1.0)
            bar.n = min(target, len(counted_trials(study)) - start_count)
            if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                best = study.best_trial
                bar.set_postfix_str(f"best: trial {best.number} = {best.value:.4f}")
            bar.refresh()


def run_sweep(spec: Spec, *, n_trials: int | None = None, timeout: float | None = None,
              workers: int = 1, progress: bool = True) -> optuna.Study:
    """Run (or resume) the study up to its total trial budget; returns the study."""
    if workers < 1:
        raise SpecError(f"{spec.path}: workers: {workers} must be >= 1")
    total = n_trials or spec.budget.n_trials
    timeout = timeout or spec.budget.timeout
    study, ctx, tracker = open_study(spec, workers=workers)
    counted = len(counted_trials(study))
    remaining = max(0, total - counted)
    status = "FINISHED"
    try:
        if remaining and workers == 1:
            run_worker(ctx, remaining, timeout, 0, 1, progress)
        elif remaining:
            mp = multiprocessing.get_context("spawn")
            quotas = [q for q in _split_quota(remaining, workers) if q]
            processes = [mp.Process(target=run_worker,
                                    args=(ctx, q, timeout, i, len(quotas), False))
                         for i, q in enumerate(quotas)]
            for p in processes:
                p.start()
            if progress:
                _watch(study, processes, remaining, counted)
            for p in processes:
                p.join()
            failed = [p.exitcode for p in processes if p.exitcode != 0]
            if failed:
                status = "FAILED"
                raise RuntimeError(f"{len(failed)} worker process(es) failed "
                                   f"(exit codes {failed}); see their output above")
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.client.set_terminated(ctx.parent_run_id, status)
    finish_study_run(study, ctx, tracker)
    log_study_plots(study, spec.metric, tracker.client, ctx.parent_run_id)
    return study


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Finished trials by outcome: {"complete": n, "pruned": n, "fail": n}."""
    trials = study.get_trials(deepcopy=False)
    return {s.name.lower(): sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}


def finish_study_run(study: optuna.Study, ctx: StudyContext, tracker) -> None:
    """Summarise the study on its parent run: counts by state and the best trial."""
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    counts = state_counts(study)
    metrics = [Metric(f"n_{k}", v, now, 0) for k, v in counts.items()]
    tags = []
    if counts["complete"]:
        best = study.best_trial
        metrics.append(Metric(f"best_{ctx.spec.metric}", best.value, now, 0))
        if "test_accuracy" in best.user_attrs:
            metrics.append(Metric("best_test_accuracy", best.user_attrs["test_accuracy"], now, 0))
        tags = [RunTag("optimsweep.best_trial", str(best.number)),
                RunTag("optimsweep.best_run_id", best.user_attrs.get("mlflow_run_id", ""))]
    tracker.client.log_batch(ctx.parent_run_id, metrics=metrics, tags=tags)


def trials_table(study: optuna.Study, metric: str, top: int | None = 10) -> pd.DataFrame:
    """Finished trials, best first: number, state, the metric, test accuracy, params, run id."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
            else float("nan"))
        rows.append({"trial": t.number, "state": t.state.name.lower(), metric: value,
                     "test_accuracy": t.user_attrs.get("test_accuracy", float("nan")),
                     "epochs": t.user_attrs.get("epochs_run", 0), **t.params,
                     "run_id": t.user_attrs.get("mlflow_run_id", "")})
    if not rows:
        return pd.DataFrame(columns=["trial", "state", metric, "test_accuracy", "run_id"])
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if c != "run_id"] + ["run_id"]]
    table["_complete"] = table["state"] == "complete"
    ascending = study.direction.name == "MINIMIZE"
    table = table.sort_values(["_complete", metric], ascending=[False, ascending],
                              na_position="last").drop(columns="_complete")
    return table.head(top) if top else table
