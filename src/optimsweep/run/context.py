"""A study as the code that runs it holds it: where its records are (`StudyRef`, what a
worker process is handed) and the live objects this process opened on them (`OpenStudy`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from optimsweep.records.schema import Tag
from optimsweep.records.storage import StudyStorage
from optimsweep.records.tracking import Tracker
from optimsweep.sweep.spec import Spec


@dataclass(frozen=True)
class StudyRef:
    """Where a study's records are: everything a worker process needs to open the study
    itself (picklable)."""

    spec: Spec
    storage_url: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    n_trials: int  # the budget this invocation runs up to (`--n-trials` or the file's)
    study_uid: str | None = None  # the study's identity (None: made by an earlier version
    # and opened read-only since)

    def run_tags(self) -> dict[str, str]:
        """The tags that say which study a run belongs to, beyond its name."""
        return {Tag.STUDY_UID: self.study_uid} if self.study_uid else {}


@dataclass
class OpenStudy:
    """The one live study of a process: Optuna's study object (its sampler and pruner the
    sweep file's), the storage and tracker it writes through, and the trials this process
    has claimed and not yet closed (by storage id). A RUNNING trial that names this process
    but is not in `live` was left behind by an earlier command in it."""

    ref: StudyRef
    study: optuna.Study
    storage: StudyStorage
    tracker: Tracker
    live: set[int] = field(default_factory=set)

    @property
    def spec(self) -> Spec:
        return self.ref.spec

    def lock(self):
        """The study lock: one process at a time creates, claims or repairs."""
        return self.storage.lock(self.spec.name)
