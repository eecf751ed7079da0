"""After a sweep: the best trials, the winner confirmed across fresh seeds, and the winner
exported as a ready-to-run config, its state_dict and its metrics with provenance."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optimsweep.provenance import provenance
from optimsweep.spec import Spec, SpecError, load_spec, parse_spec
from optimsweep.study import open_storage, resolve_storage
from optimsweep.tracking import (
    CONFIG_FILE,
    STATE_DICT,
    Tracker,
    config_yaml,
    resolve_tracking_uri,
)

METRICS_FILE = "metrics.json"


@dataclass
class OpenStudy:
    spec: Spec
    study: optuna.Study
    tracker: Tracker

    @property
    def parent_run_id(self) -> str:
        return self.study.user_attrs["mlflow_parent_run_id"]

    @property
    def experiment_id(self) -> str:
        return self.study.user_attrs["mlflow_experiment_id"]


def open_existing(target: str | Path) -> OpenStudy:
    """A sweep file or a study name -> its study and tracking, without creating anything."""
    path = Path(target)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        spec = load_spec(path)
        name, storage_url = spec.name, resolve_storage(spec.storage)
    else:
        spec, name, storage_url = None, str(target), resolve_storage(None)
    if "://" not in storage_url and not Path(storage_url).is_file():
        raise SpecError(f"no study store at {storage_url}; run `optimsweep sweep FILE` first")
    storage = open_storage(storage_url)
    if name not in optuna.get_all_study_names(storage):
        raise SpecError(f"no study named {name!r} in {storage_url}; known: "
                        f"{', '.join(optuna.get_all_study_names(storage)) or 'none'}")
    study = optuna.load_study(study_name=name, storage=storage)
    if spec is None:  # the study keeps the sweep file it was created from
        if "sweep_text" not in study.user_attrs:
            raise SpecError(f"study {name!r} does not hold its sweep file; pass the file "
                            f"instead ({study.user_attrs.get('sweep_file', 'sweeps/NAME.yaml')})")
        spec = parse_spec(study.user_attrs["sweep_text"], study.user_attrs["sweep_file"])
    return OpenStudy(spec, study, Tracker(resolve_tracking_uri(spec.tracking_uri)))


def ranked_complete_trials(study: optuna.Study) -> list:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(trials, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")


# ---------------------------------------------------------------- confirm

@dataclass
class Confirmation:
    trial: int
    params: dict
    seeds: list[int]
    values: list[float]  # the study's metric, one per seed
    test_accuracies: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def confirm(opened: OpenStudy, *, top_k: int = 3, seeds: int = 3, log=print) -> list[Confirmation]:
    """Re-train the top-k configs with `seeds` fresh seeds each, as child runs of the study's
    parent run; rank by the mean metric and remember the winner for `export`."""
    from optimsweep.space import config_from_params
    from optimsweep.train import DivergedError, fit, load_data

    spec, study, tracker = opened.spec, opened.study, opened.tracker
    if top_k < 1 or seeds < 1:
        raise SpecError(f"top-k and seeds must be >= 1 (got {top_k}, {seeds})")
    top = ranked_complete_trials(study)[:top_k]
    if not top:
        raise SpecError(f"study {spec.name!r} has no complete trial to confirm")
    fresh = [spec.seed + 1 + i for i in range(seeds)]  # never the seed the sweep used
    data = load_data(config_from_params(spec, top[0].params))  # the split all trials share
    results = []
    for trial in top:
        confirmation = Confirmation(trial.number, trial.params, fresh, [], [])
        trained = config_from_params(spec, trial.params)
        for seed in fresh:
            config = dataclasses.replace(trained, seed=seed)
            run_id = tracker.start_trial(opened.experiment_id, opened.parent_run_id, spec.name,
                                         trial.number, config, trial.params, role="confirm",
                                         tags={"optimsweep.seed": str(seed)},
                                         run_name=f"confirm trial {trial.number:03d} seed {seed}")
            try:
                result = fit(config, data, on_epoch=lambda s, r=run_id: tracker.log_epoch(r, s))
            except DivergedError as exc:
                tracker.finish_trial(run_id, "failed", error=str(exc))
                confirmation.values.append(math.nan)
                continue
            tracker.log_result(run_id, result)
            tracker.finish_trial(run_id, "complete")
            confirmation.values.append(getattr(result.final, spec.metric))
            if result.test_accuracy is not None:
                confirmation.test_accuracies.append(result.test_accuracy)
            log(f"trial {trial.number} seed {seed}: {spec.metric} "
                f"{confirmation.values[-1]:.4f}")
        results.append(confirmation)
    maximize = study.direction.name == "MAXIMIZE"
    results.sort(key=lambda c: (math.isnan(c.mean), -c.mean if maximize else c.mean))
    winner = results[0]
    study.set_user_attr("confirmed", {
        "winner": winner.trial, "seeds": fresh, "top_k": top_k,
        "ranking": [[c.trial, c.mean, c.std] for c in results],
        "single_seed_best": top[0].number})
    tracker.client.set_tag(opened.parent_run_id, "optimsweep.confirmed_trial", str(winner.trial))
    return results


# ---------------------------------------------------------------- export

@dataclass
class Export:
    trial: optuna.trial.FrozenTrial
    folder: Path
    reason: str


def chosen_trial(study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, str]:
    """The confirmed winner when `confirm` ran, else the best single-seed trial."""
    confirmed = study.user_attrs.get("confirmed")
    if confirmed:
        trial = study.trials[confirmed["winner"]]
        mean, std = next((m, s) for n, m, s in confirmed["ranking"] if n == trial.number)
        note = ("" if trial.number == confirmed["single_seed_best"] else
                f"; the single-seed best was trial {confirmed['single_seed_best']}")
        return trial, (f"confirmed winner over {len(confirmed['seeds'])} fresh seeds "
                       f"(mean {mean:.4f} ± {std:.4f}){note}")
    ranked = ranked_complete_trials(study)
    if not ranked:
        raise SpecError(f"study {study.study_name!r} has no complete trial to export")
    return ranked[0], "best single-seed trial (`optimsweep confirm` checks it across seeds)"


def export_best(opened: OpenStudy, out: Path | None = None) -> Export:
    from optimsweep.space import config_from_params

    spec, study, tracker = opened.spec, opened.study, opened.tracker
    trial, reason = chosen_trial(study)
    folder = Path(out or Path("exports") / spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    config = config_from_params(spec, trial.params)
    run_id = trial.user_attrs["mlflow_run_id"]
    header = (f"# Exported from study {spec.name!r}, trial {trial.number}: {reason}.\n"
              f"# Reproduce: optimsweep train --config {folder / CONFIG_FILE}\n")
    (folder / CONFIG_FILE).write_text(header + config_yaml(config))
    tracker.client.download_artifacts(run_id, STATE_DICT, str(folder))
    run = tracker.client.get_run(run_id)
    recorded = {k: v for k, v in run.data.tags.items() if k in provenance() or k == "git_commit"}
    metrics = {
        "study": spec.name, "trial": trial.number, "mlflow_run_id": run_id,
        "selected_by": f"{spec.direction} {spec.metric} (validation)", "reason": reason,
        spec.metric: trial.value,
        "final_epoch": {k: v for k, v in run.data.metrics.items()},
        "confirmed": study.user_attrs.get("confirmed"),
        "provenance": {"trained_with": recorded, "exported_with": provenance(),
                       "sweep_file": str(spec.path)},
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return Export(trial, folder, reason)
