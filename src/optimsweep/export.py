"""The winner exported as a ready-to-run config, its state_dict and its metrics with
provenance (written into a temporary folder and renamed into place only when whole), then
registered in MLflow's Model Registry as a model that serves without this package."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from optimsweep.core.artifacts import load_state_dict
from optimsweep.core.data import Dataset, StreamingData
from optimsweep.core.models import build_model
from optimsweep.core.train import TrainConfig, load_data
from optimsweep.errors import Expected, Failed, SpecError, StoreError, chain, describe
from optimsweep.records.registry import Candidate, ModelRegistry, Registered
from optimsweep.records.schema import CONFIG_FILE, STATE_DICT, Attr, ModelTag, Ranking, Tag
from optimsweep.records.tracking import config_yaml
from optimsweep.report import ranked_complete_trials
from optimsweep.run.context import OpenStudy
from optimsweep.run.repair import repair
from optimsweep.sweep.space import config_from_params
from optimsweep.util.atomic import folder_replaced
from optimsweep.util.provenance import provenance

METRICS_FILE = "metrics.json"
EXPORT_FILES = (CONFIG_FILE, STATE_DICT, METRICS_FILE)
EXAMPLE_ROWS = 5  # training inputs saved as the model's input example (more than 1, so the
# exported graph keeps its batch dimension free)


class RegistryError(Failed):
    """The winner was exported to its folder but could not be registered as an MLflow
    model; the message says why."""


@dataclass
class Export:
    trial: optuna.trial.FrozenTrial
    folder: Path
    reason: str
    doubts: list[str] = field(default_factory=list)  # why the winner may be no good
    confirmed: tuple[float, float] | None = None  # its mean and std over confirm's seeds
    registered: Registered | None = None


def chosen_trial(study: optuna.Study
                 ) -> tuple[optuna.trial.FrozenTrial, str, tuple[float, float] | None]:
    """The confirmed winner when `confirm` covered the current best trial, else the best
    single-seed trial (a confirmation made before a better trial completed is stale)."""
    ranked = ranked_complete_trials(study)
    if not ranked:
        raise SpecError(f"study {study.study_name!r} has no complete trial to export")
    best = ranked[0]
    confirmed = Ranking.of(study)
    if confirmed and best.number in confirmed.trials:
        trial = study.trials[confirmed.winner]
        mean, std = confirmed.mean_std(trial.number)
        note = ("" if trial.number == best.number else
                f"; the single-seed best was trial {best.number}")
        return trial, (f"confirmed winner over {len(confirmed.seeds)} fresh seeds "
                       f"(mean {mean:.4f} ± {std:.4f}){note}"), (mean, std)
    reason = "best single-seed trial (`optimsweep confirm` checks it across seeds)"
    if confirmed:
        reason += (f"; the earlier confirmation is stale: trial {best.number} completed after "
                   "it, better than every trial it covered, so run `optimsweep confirm` again")
    return best, reason, None


def export_best(opened: OpenStudy, out: Path | None = None, register: bool = True) -> Export:
    """Write the winner's folder, then (unless `register` is False or the sweep file says
    `registry: false`) register it in MLflow's Model Registry."""
    spec, study, tracker = opened.spec, opened.study, opened.tracker
    repair(opened, close_parent=True)
    trial, reason, confirmed = chosen_trial(study)
    folder = Path(out or Path("exports") / spec.name)  # spec.name is a safe folder name
    others = sorted(p.name for p in folder.iterdir() if p.name not in EXPORT_FILES) \
        if folder.is_dir() else []
    if folder.is_symlink() or (folder.exists() and (others or not folder.is_dir())):
        raise SpecError(f"{folder}: holds other files ({', '.join(others[:5]) or folder.name}); "
                        "export replaces the whole folder, so give --out an empty or new "
                        "folder, or an earlier export")
    config = config_from_params(spec.base_config(), trial.params)
    run_id = trial.user_attrs[Attr.RUN_ID]
    run = tracker.run(run_id)
    if run is None:
        raise StoreError(f"tracking store: trial {trial.number}'s run {run_id} is missing; "
                         "nothing was exported")
    with folder_replaced(folder) as tmp:
        header = (f"# Exported from study {spec.name!r}, trial {trial.number}: {reason}.\n"
                  f"# Reproduce: optimsweep train --config {folder / CONFIG_FILE}\n")
        (tmp / CONFIG_FILE).write_text(header + config_yaml(config))
        weights = tracker.download(run_id, STATE_DICT, tmp)
        try:  # weights_only: a tampered file is refused, never executed
            load_state_dict(weights)
        except Exception as exc:
            raise StoreError(f"run {run_id}'s {STATE_DICT} is not a plain state_dict, so it "
                             f"was not exported ({describe(exc)})") from exc
        recorded = {k: v for k, v in run.data.tags.items()
                    if k in provenance() or k == "git_commit" or k.startswith(Tag.CODE)}
        metrics = {
            "study": spec.name, "trial": trial.number, "mlflow_run_id": run_id,
            "selected_by": f"{spec.direction} {spec.metric} (validation)", "reason": reason,
            spec.metric: trial.value,
            "final_epoch": dict(run.data.metrics),
            "confirmed": study.user_attrs.get(Attr.CONFIRMED),
            "provenance": {"trained_with": recorded, "exported_with": provenance(),
                           "sweep_file": str(spec.path),
                           "sweep_fingerprint": spec.fingerprint()},
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    # The chance check and the model's input example both read the data: load it once,
    # and only if one of them asks (a failed load is tried again, to say why, by the one
    # that can't do without it).
    data = functools.cache(lambda: load_data(config))
    done = Export(trial, folder, reason, doubts(opened, trial, data), confirmed)
    if register and spec.registry:
        done.registered = register_winner(opened, done, config, run, data)
    return done


def register_winner(opened: OpenStudy, done: Export, config: TrainConfig, run,
                    data: Callable[[], Dataset | StreamingData]) -> Registered:
    """The exported winner as a version of the registered model (a new one only the first
    time this trial is exported), placed as champion or challenger."""
    spec, registry = opened.spec, ModelRegistry(opened.tracker)
    run_id, name = run.info.run_id, spec.registry
    value = done.confirmed[0] if done.confirmed else done.trial.value
    candidate = Candidate(spec.metric, spec.maximize, float(value))
    tags = {ModelTag.STUDY: spec.name, ModelTag.TRIAL: str(done.trial.number),
            ModelTag.RUN_ID: run_id, ModelTag.FINGERPRINT: spec.fingerprint(),
            **candidate.tags(),
            **{k: f"{v:.6g}" for k, v in run.data.metrics.items()
               if k == spec.metric or k.startswith("test_")}}
    if commit := run.data.tags.get("git_commit"):
        tags[ModelTag.GIT_COMMIT] = commit
    if done.confirmed:
        mean, std = done.confirmed
        tags[ModelTag.CONFIRMED] = f"{mean:.4f} ± {std:.4f}"
    version = registry.version_of(name, run_id)
    new = version is None
    if new:
        model = _model_with_weights(config, done.folder / STATE_DICT)
        try:
            uri = registry.log_model(run_id, run.info.experiment_id, model,
                                     _input_example(data()))
        except StoreError as exc:
            if not _not_exportable(exc):
                raise
            raise RegistryError(
                f"exported to {done.folder}/, but not registered: torch.export could not "
                f"trace {config.model} ({describe(exc.__cause__ or exc)}); make its forward "
                "traceable, or skip registering with `export --no-register` or "
                "`registry: false` in the sweep file") from exc
        version = registry.register(
            name, uri, run_id, tags,
            description=f"Winners of optimsweep study {spec.name!r}, one version per export.",
            experiment_id=run.info.experiment_id)
    else:  # the same trial again: its tags follow a newer confirmation
        registry.set_tags(name, version.version, tags)
    alias, why = registry.place(name, str(version.version), candidate)
    return Registered(name, str(version.version), alias, why, new)


def _model_with_weights(config: TrainConfig, weights: Path) -> torch.nn.Module:
    model = build_model(config.model, config.model_kwargs, config.code_dir)
    model.load_state_dict(load_state_dict(weights))
    return model


def _input_example(data: Dataset | StreamingData):
    """The first training inputs, as the model saw them (dtype and shape): the model's
    input example and the shape its signature promises."""
    if isinstance(data, Dataset):
        rows = data.train_x[:EXAMPLE_ROWS]
    else:
        rows = torch.stack([torch.as_tensor(data.train[i][0])
                            for i in range(min(EXAMPLE_ROWS, len(data.train)))])
    return rows.detach().cpu().numpy()


def _not_exportable(exc: StoreError) -> bool:
    """torch.export refused the model: not the store's fault."""
    return any(type(e).__module__.startswith(("torch._dynamo", "torch.export", "torch._export",
                                              "torch.fx"))
               for e in chain(exc))


CHANCE_MARGIN = 0.02  # accuracy within 2 points of a constant guess is no better than chance


def _chance_accuracy(data: Callable[[], Dataset | StreamingData]) -> float | None:
    """What always guessing the commonest class scores on the validation split; None where
    that can't be known cheaply (data not at hand here, or streamed)."""
    try:
        data = data()
    except Expected:
        return None
    if not isinstance(data, Dataset) or not data.num_classes or not len(data.val_y):
        return None
    labels = data.val_y if not data.val_y.is_floating_point() else (data.val_y > 0.5).long()
    return float(torch.bincount(labels.flatten().cpu()).max()) / labels.numel()


def doubts(opened: OpenStudy, trial: optuna.trial.FrozenTrial,
           data: Callable[[], Dataset | StreamingData]) -> list[str]:
    """Why the exported winner may be no good: it is the study's baseline, no better than
    the baseline, or (accuracy) no better than always guessing the commonest class."""
    spec, study, found = opened.spec, opened.study, []
    maximize, metric = spec.direction == "maximize", spec.metric
    baselines = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.user_attrs.get(Attr.BASELINE)]
    if baselines:
        base = (max if maximize else min)(baselines, key=lambda t: t.value)
        if base.number == trial.number:
            found.append(f"the winner, trial {trial.number}, is the study's baseline: no "
                         "searched config did better")
        elif not (trial.value > base.value if maximize else trial.value < base.value):
            found.append(f"the winner, trial {trial.number} ({metric} {trial.value:.4f}), is "
                         f"no better than the baseline, trial {base.number} "
                         f"({base.value:.4f})")
    if metric == "val_accuracy":
        chance = _chance_accuracy(data)
        if chance is not None and trial.value <= chance + CHANCE_MARGIN:
            found.append(f"the winner, trial {trial.number}, reaches {100 * trial.value:.2f}% "
                         f"validation accuracy: no better than chance (always guessing the "
                         f"commonest class scores {100 * chance:.2f}%); every config may "
                         "have failed to learn")
    return found
