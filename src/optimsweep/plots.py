"""Plots for a study's parent run: regenerated at the end of every sweep invocation.

- plots/val_curves.png: every trial's validation curve overlaid (pruned ones dashed, paused
  ones dash-dotted), with the rungs of successive halving as vertical lines.
- plots/optimization_history.html, param_importances.html, parallel_coordinate.html:
  Optuna's own plots, with plotly embedded so they open without a network.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

if TYPE_CHECKING:
    from optimsweep.records.tracking import Tracker

CURVES = "val_curves.png"
OPTUNA_PLOTS = {
    "optimization_history.html": optuna.visualization.plot_optimization_history,
    "param_importances.html": optuna.visualization.plot_param_importances,
    "parallel_coordinate.html": optuna.visualization.plot_parallel_coordinate,
}


def plot_val_curves(study: optuna.Study, metric: str, path: Path,
                    rungs: list[int] = (), reports_per_epoch: int = 1) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    style = {TrialState.COMPLETE: "-", TrialState.PRUNED: "--", TrialState.FAIL: ":",
             TrialState.WAITING: "-."}
    best = study.best_trial.number if _has_complete(study) else None
    for t in study.get_trials(deepcopy=False, states=tuple(style)):
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        is_best = t.number == best
        ax.plot([s / reports_per_epoch for s in steps],
                [t.intermediate_values[s] for s in steps], style[t.state],
                linewidth=2.5 if is_best else 1.0, alpha=1.0 if is_best else 0.55,
                label=f"trial {t.number} (best)" if is_best else None)
    for k, step in enumerate(rungs):
        ax.axvline(step / reports_per_epoch, color="grey", linewidth=0.8, alpha=0.6)
        ax.annotate(f"rung {k}", (step / reports_per_epoch, 1), xycoords=("data", "axes fraction"),
                    xytext=(2, -10), textcoords="offset points", fontsize=8, color="grey")
    ax.set(xlabel="epoch", ylabel=metric,
           title=f"{study.study_name}: {metric} of every trial (dashed: pruned"
                 f"{', dash-dotted: paused' if rungs else ''})")
    ax.grid(alpha=0.3)
    if best is not None:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _has_complete(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def write_study_plots(study: optuna.Study, metric: str, folder: Path, rungs: list[int] = (),
                      reports_per_epoch: int = 1) -> list[Path]:
    """Write every plot the study's trials allow (importances need 2+ complete trials)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_val_curves(study, metric, folder / CURVES, rungs, reports_per_epoch)]
    if not _has_complete(study):
        return written
    for name, plot in OPTUNA_PLOTS.items():
        try:
            with warnings.catch_warnings():  # importances warn about sparse conditional params
                warnings.simplefilter("ignore", UserWarning)
                figure = plot(study, target_name=metric)
        except (ValueError, RuntimeError):  # e.g. importances with too few complete trials
            continue
        figure.write_html(folder / name, include_plotlyjs=True, full_html=True)
        written.append(folder / name)
    return written


def log_study_plots(study: optuna.Study, metric: str, tracker: Tracker, run_id: str,
                    rungs: list[int] = (), reports_per_epoch: int = 1) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_study_plots(study, metric, Path(tmp) / "plots", rungs, reports_per_epoch)
        tracker.log_artifacts(run_id, Path(tmp) / "plots", "plots")
    return [f"plots/{p.name}" for p in paths]
