"""What a study adds up to: counts by outcome, the budget used, the table of best trials,
and the summary written onto the study's MLflow parent run."""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna
import pandas as pd
from optuna.trial import TrialState

from optimsweep.records.schema import Attr, Tag, counted_trials, is_paused

if TYPE_CHECKING:
    from optimsweep.records.tracking import Tracker


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome; "fail" and "interrupted" don't overlap, so the counts add up to
    every trial that has started."""
    counts = dict.fromkeys(("complete", "pruned", "fail", "interrupted", "running", "paused"), 0)
    for t in study.get_trials(deepcopy=False):
        if is_paused(t):
            counts["paused"] += 1
        if t.state == TrialState.WAITING:
            continue
        if t.state == TrialState.RUNNING:
            counts["running"] += 1
        elif t.user_attrs.get(Attr.INTERRUPTED):
            counts["interrupted"] += 1
        else:
            counts[t.state.name.lower()] += 1
    return counts


def summary_line(study: optuna.Study, budget: int) -> str:
    counts = state_counts(study)
    total = sum(counts.values())
    trials = study.get_trials(deepcopy=False)
    halted = sum(t.state == TrialState.PRUNED and t.user_attrs.get(Attr.PAUSED_AT) is not None
                 for t in trials)  # closed at the rung they were paused at
    parts = [f"{counts['complete']} complete",
             f"{counts['pruned']} pruned" + (f" ({halted} of them paused at a rung when the "
                                             "study ended)" if halted else ""),
             f"{counts['fail']} failed"]
    if counts["interrupted"]:
        parts.append(f"{counts['interrupted']} interrupted (not counted)")
    if counts["running"]:
        parts.append(f"{counts['running']} still running elsewhere")
    if counts["paused"]:
        parts.append(f"{counts['paused']} paused (promoted when the study resumes, or "
                     "closed as pruned when it ends)")
    promotions = sum(t.user_attrs.get(Attr.PROMOTIONS, 0) for t in trials)
    if promotions:
        parts.append(f"{promotions} promotions")
    used = len(counted_trials(study))
    return (f"study {study.study_name!r}: {total} trials: {', '.join(parts)}; budget "
            f"{used} of {budget} used")


def log_summary(study: optuna.Study, metric: str, tracker: Tracker, run_id: str) -> None:
    """Counts by outcome, the best trial and the leaderboard (trials_table, every finished
    trial, best first) on the study's parent run."""
    counts = state_counts(study)
    metrics = {f"n_{k}": v for k, v in counts.items()}
    tags = {}
    if counts["complete"]:
        best = study.best_trial
        metrics[f"best_{metric}"] = best.value
        if "test_accuracy" in best.user_attrs:
            metrics["best_test_accuracy"] = best.user_attrs["test_accuracy"]
        tags = {Tag.BEST_TRIAL: str(best.number),
                Tag.BEST_RUN_ID: best.user_attrs.get(Attr.RUN_ID, "")}
    tracker.log_summary(run_id, metrics, tags)
    tracker.log_leaderboard(run_id, trials_table(study, metric, top=None))


def trials_table(study: optuna.Study, metric: str, top: int | None = 10) -> pd.DataFrame:
    """Finished trials, best first: number, state, the metric and its value on the test set
    (test_accuracy for val_accuracy, ...), params, run id."""
    test = "test_" + metric.removeprefix("val_")
    rows = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():
            continue
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values
            else float("nan"))
        state = "interrupted" if t.user_attrs.get(Attr.INTERRUPTED) else t.state.name.lower()
        rows.append({"trial": t.number, "state": state, metric: value,
                     test: t.user_attrs.get(test, float("nan")),
                     "epochs": t.user_attrs.get(Attr.EPOCHS_RUN, 0), **t.params,
                     "run_id": t.user_attrs.get(Attr.RUN_ID, "")})
    if not rows:
        return pd.DataFrame(columns=["trial", "state", metric, test, "run_id"])
    table = pd.DataFrame(rows)
    table = table[[c for c in table.columns if c != "run_id"] + ["run_id"]]
    table["_complete"] = table["state"] == "complete"
    ascending = study.direction.name == "MINIMIZE"
    table = table.sort_values(["_complete", metric], ascending=[False, ascending],
                              na_position="last").drop(columns="_complete")
    return table.head(top) if top else table


def ranked_complete_trials(study: optuna.Study) -> list:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
