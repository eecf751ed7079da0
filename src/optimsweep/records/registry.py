"""The winner in MLflow's Model Registry: an MLflow model on its trial's run, a version of
the registered model, and the aliases `champion` and `challenger` moved by the metric the
study selects on.

The model is saved in torch.export's pt2 form (MLflow's pytorch flavor): a traced graph
with its weights, so it loads and serves where neither optimsweep nor the user's package
can be imported, and loading it runs no pickled code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from mlflow.exceptions import MlflowException

from optimsweep.records.schema import ModelTag
from optimsweep.records.tracking import Tracker, is_missing, store_call

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_NAME = "model"  # the logged model's name on the trial's run


@dataclass(frozen=True)
class Candidate:
    """A version's claim to be champion: the metric the study selected on and its value
    (the confirmed mean where `confirm` ran, else the single-seed validation value)."""

    metric: str
    maximize: bool
    value: float

    def beats(self, other: Candidate) -> bool:
        return self.value > other.value if self.maximize else self.value < other.value

    def tags(self) -> dict[str, str]:
        return {ModelTag.METRIC: self.metric,
                ModelTag.DIRECTION: "maximize" if self.maximize else "minimize",
                ModelTag.SELECTION_VALUE: repr(self.value)}

    @classmethod
    def of(cls, tags: dict[str, str]) -> Candidate | None:
        try:
            return cls(tags[ModelTag.METRIC], tags[ModelTag.DIRECTION] == "maximize",
                       float(tags[ModelTag.SELECTION_VALUE]))
        except (KeyError, ValueError):
            return None  # a version registered by hand, or by something else


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str  # CHAMPION or CHALLENGER
    why: str
    new: bool  # False: the trial's model was registered before, and is reused

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}"


def alias_for(candidate: Candidate, champion: Candidate | None, champion_version: str | None
              ) -> tuple[str, str]:
    """Where a new version goes, and why: champion only when it beats the champion on the
    same metric in the same direction."""
    if champion_version is None:
        return CHAMPION, "the first version with an alias"
    if champion is None:
        return CHALLENGER, (f"version {champion_version} is champion and says nothing of "
                            "the metric it was chosen on; move the alias by hand if this "
                            "one is better")
    if (champion.metric, champion.maximize) != (candidate.metric, candidate.maximize):
        return CHALLENGER, (f"version {champion_version} is champion on "
                            f"{_direction(champion)} {champion.metric}, this one was chosen on "
                            f"{_direction(candidate)} {candidate.metric}: not comparable")
    compared = (f"{candidate.metric} {candidate.value:.4f} against {champion.value:.4f} of "
                f"version {champion_version}")
    if candidate.beats(champion):
        return CHAMPION, f"better: {compared}"
    return CHALLENGER, f"not better: {compared}"


def _direction(candidate: Candidate) -> str:
    return "maximize" if candidate.maximize else "minimize"


@contextlib.contextmanager
def _fluent(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's model logging reads its store and experiment from the fluent API's state:
    point both at the study's for the block only, whatever the process had set."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = before


class ModelRegistry:
    """MLflow's Model Registry in the tracking store's own place (SQLite or a server);
    every store failure is a StoreError, as for the Tracker."""

    def __init__(self, tracker: Tracker):
        self.uri, self.client = tracker.uri, tracker.client
        self._http_retries = tracker._http_retries

    @store_call
    def version_of(self, name: str, run_id: str):
        """The version registered before from this run, if any (re-exporting the same
        trial makes no new version)."""
        try:
            found = self.client.search_model_versions(f"name = '{_quoted(name)}'")
        except MlflowException as exc:
            if is_missing(exc):
                return None
            raise
        return next((v for v in sorted(found, key=lambda v: int(v.version))
                     if v.run_id == run_id), None)

    @store_call
    def log_model(self, run_id: str, experiment_id: str, model: torch.nn.Module,
                  example: np.ndarray) -> str:
        """The trial's model as an MLflow model on its run (pt2, signature and input
        example from the training inputs); returns the model's URI."""
        import mlflow
        from mlflow.models import Model, infer_signature

        model = model.cpu().eval()
        with torch.no_grad():
            outputs = model(torch.from_numpy(example)).numpy()
        with _fluent(self.uri, experiment_id):
            info = Model.log(
                None, name=MODEL_NAME, flavor=mlflow.pytorch, run_id=run_id,
                pytorch_model=model, signature=infer_signature(example, outputs),
                input_example=example, serialization_format="pt2",
                # Given, not inferred: inferring loads the model in a new process (seconds)
                # and would list optimsweep, which serving does not need.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        return info.model_uri

    @store_call
    def register(self, name: str, model_uri: str, run_id: str, tags: dict[str, str],
                 description: str, experiment_id: str):
        with _fluent(self.uri, experiment_id):  # the store looks the model up through it
            return self._register(name, model_uri, run_id, tags, description)

    def _register(self, name: str, model_uri: str, run_id: str, tags: dict[str, str],
                  description: str):
        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if not is_missing(exc):
                raise
            self.client.create_registered_model(name, description=description)
        return self.client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                                model_id=model_uri.removeprefix("models:/"))

    @store_call
    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    @store_call
    def holder(self, name: str, alias: str):
        """The version holding `alias`, or None."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if is_missing(exc) or exc.error_code == "INVALID_PARAMETER_VALUE":
                return None
            raise

    @store_call
    def move(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    @store_call
    def drop(self, name: str, alias: str) -> None:
        self.client.delete_registered_model_alias(name, alias)

    def place(self, name: str, version: str, candidate: Candidate) -> tuple[str, str]:
        """Give `version` champion or challenger (see alias_for); a version that already
        holds champion keeps it."""
        champion = self.holder(name, CHAMPION)
        if champion is not None and str(champion.version) == version:
            return CHAMPION, "it already is the champion"
        alias, why = alias_for(candidate, champion and Candidate.of(champion.tags),
                               champion and str(champion.version))
        self.move(name, alias, version)
        if alias == CHAMPION:
            challenger = self.holder(name, CHALLENGER)
            if challenger is not None and str(challenger.version) == version:
                self.drop(name, CHALLENGER)
        return alias, why


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")
