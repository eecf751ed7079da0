"""A single lucky seed often wins a sweep: re-train the top configs with fresh seeds, as
child runs of the study's parent run, and rank them by the mean of the study's metric."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass

from optimsweep.core.train import load_data
from optimsweep.errors import SpecError
from optimsweep.records.schema import CONFIRM_ROLE, Attr, Ranking, State, Tag
from optimsweep.report import ranked_complete_trials
from optimsweep.run.context import OpenStudy
from optimsweep.run.life import run_confirmation
from optimsweep.run.repair import repair
from optimsweep.sweep.space import config_from_params


@dataclass
class Confirmation:
    trial: int
    params: dict
    seeds: list[int]
    values: list[float]  # the study's metric, one per seed (nan where that seed failed)
    test_accuracies: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        if any(math.isnan(v) for v in self.values):  # a config that failed on a seed
            return math.nan                           # ranks last (its mean is nan too)
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def _confirm_runs(opened: OpenStudy) -> list:
    """This study's confirm runs (children of its parent run)."""
    return [run for run in opened.tracker.runs(opened.ref.experiment_id, CONFIRM_ROLE)
            if run.data.tags.get(Tag.PARENT) == opened.ref.parent_run_id]


def _finished_runs(runs: list, metric: str) -> dict[tuple[int, int], object]:
    """The finished confirm runs, by (trial number, seed): a re-training that completed once
    is not trained again."""
    found = {}
    for run in runs:
        if run.info.status == "FINISHED" and metric in run.data.metrics:
            found.setdefault(_trial_and_seed(run), run)
    return found


def _interrupted_runs(runs: list) -> dict[tuple[int, int], list[str]]:
    """The confirm runs that ended failed, by (trial number, seed), newest first: a
    re-training goes on from their checkpoints."""
    found: dict[tuple[int, int], list[str]] = {}
    for run in sorted(runs, key=lambda r: -r.info.start_time):
        if run.info.status == "FAILED":
            found.setdefault(_trial_and_seed(run), []).append(run.info.run_id)
    return found


def _trial_and_seed(run) -> tuple[int, int]:
    return int(run.data.tags[Tag.TRIAL]), int(run.data.tags[Tag.SEED])


def confirm(opened: OpenStudy, *, top_k: int = 3, seeds: int = 3, log=print) -> list[Confirmation]:
    """Re-train the top-k configs with `seeds` fresh seeds each; rank by the mean metric
    and remember the ranking (and which trials it covered) for `export`."""
    spec, study, tracker = opened.spec, opened.study, opened.tracker
    if top_k < 1 or seeds < 1:
        raise SpecError(f"--top-k and --seeds must be >= 1 (got {top_k}, {seeds})")
    repair(opened, close_parent=True)
    top = ranked_complete_trials(study)[:top_k]
    if not top:
        raise SpecError(f"study {spec.name!r} has no complete trial to confirm")
    fresh = [spec.seed + 1 + i for i in range(seeds)]  # never the seed the sweep used
    # The split all trials share.
    data = load_data(config_from_params(spec.base_config(), top[0].params))
    runs = _confirm_runs(opened)
    finished, interrupted = _finished_runs(runs, spec.metric), _interrupted_runs(runs)
    results = []
    for trial in top:
        confirmation = Confirmation(trial.number, trial.params, fresh, [], [])
        trained = config_from_params(spec.base_config(), trial.params)
        for seed in fresh:
            earlier = finished.get((trial.number, seed))
            if earlier is not None:  # a confirm that was stopped: what finished stays done
                value = earlier.data.metrics[spec.metric]
                confirmation.values.append(value)
                if "test_accuracy" in earlier.data.metrics:
                    confirmation.test_accuracies.append(earlier.data.metrics["test_accuracy"])
                log(f"trial {trial.number} seed {seed}: {spec.metric} {value:.4f} (run "
                    f"{earlier.info.run_id}, finished earlier)")
                continue
            config = dataclasses.replace(trained, seed=seed)
            outcome = run_confirmation(opened, trial.number, config, trial.params, data,
                                       interrupted.get((trial.number, seed), []))
            if outcome.state != State.COMPLETE:
                confirmation.values.append(math.nan)
                log(f"trial {trial.number} seed {seed}: failed: {outcome.error}")
                continue
            confirmation.values.append(outcome.value)
            if outcome.test_accuracy is not None:
                confirmation.test_accuracies.append(outcome.test_accuracy)
            log(f"trial {trial.number} seed {seed}: {spec.metric} {outcome.value:.4f}")
        results.append(confirmation)
    maximize = study.direction.name == "MAXIMIZE"
    results.sort(key=lambda c: (math.isnan(c.mean), -c.mean if maximize else c.mean))
    winner = results[0]
    ranking = Ranking(winner=winner.trial, seeds=fresh, top_k=top_k,
                      trials=[c.trial for c in results],
                      ranking=[(c.trial, c.mean, c.std) for c in results],
                      single_seed_best=top[0].number)
    study.set_user_attr(Attr.CONFIRMED, ranking.as_attr())
    tracker.set_tag(opened.ref.parent_run_id, Tag.CONFIRMED_TRIAL, str(winner.trial))
    return results
