"""The winner in MLflow's Model Registry: `export` adds a version, the aliases follow the
metric the study selects on, and the same trial exported again adds nothing."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from optimsweep.cli import main
from optimsweep.records.registry import Candidate, alias_for
from sweeps import line_sweep, load


def study_of_one_config(tmp_path, name: str, optimizer: str, lr: float, epochs: int):
    """A one-trial regression study (so its winner is known) whose winner goes to the
    registered model `line`, recorded in one store shared by the studies of a test."""
    space = {"optimizer": {"type": "categorical", "choices": [optimizer]},
             "lr": {"type": "categorical", "choices": [lr]},
             "batch_size": {"type": "categorical", "choices": [16]}}
    path = line_sweep(tmp_path, name, search_space=space, registry={"name": "line"},
                      budget={"n_trials": 1, "epochs": epochs})
    assert main(["sweep", str(path), "--no-progress"]) == 0
    return path


def test_champion_moves_only_to_a_better_winner_and_the_same_trial_adds_no_version(
        tmp_path, capsys):
    # val_loss on the seed's line: about 0.17, 0.23 and 0.013
    middle = study_of_one_config(tmp_path, "middle", "sgd", 0.01, 2)
    worse = study_of_one_config(tmp_path, "worse", "sgd", 0.001, 1)
    better = study_of_one_config(tmp_path, "better", "adam", 0.05, 4)
    client = MlflowClient(load(middle).tracking_uri)
    capsys.readouterr()

    def export(path, *args) -> str:
        assert main(["export", str(path), "--out", str(tmp_path / "out" / path.stem),
                     *args]) == 0
        return capsys.readouterr().out

    def holder(alias: str) -> str:
        return client.get_model_version_by_alias("line", alias).tags["optimsweep.study"]

    assert "registered as line version 1, now champion" in export(middle)
    printed = export(worse)
    assert "registered as line version 2, now challenger (not better: val_loss" in printed
    assert (holder("champion"), holder("challenger")) == ("middle", "worse")
    assert "registered as line version 3, now champion (better: val_loss" in export(better)
    assert (holder("champion"), holder("challenger")) == ("better", "worse")

    assert "already registered as line version 3, now champion" in export(better)
    assert "registered" not in export(middle, "--no-register")
    assert len(client.search_model_versions("name = 'line'")) == 3

    models = client.search_logged_models([client.get_experiment_by_name(n).experiment_id
                                          for n in ("middle", "worse", "better")])
    assert len(models) == 3  # one MLflow model per registered trial, on the trial's run
    version = client.get_model_version_by_alias("line", "champion")
    assert version.run_id in {m.source_run_id for m in models}


def test_a_sweep_file_can_name_the_registered_model_or_register_nothing(tmp_path, capsys):
    assert load(line_sweep(tmp_path, "a")).registry == "a"
    assert load(line_sweep(tmp_path, "b", registry={"name": "house-prices"})).registry == \
        "house-prices"
    path = line_sweep(tmp_path, "c", registry=False, budget={"n_trials": 1, "epochs": 1})
    assert load(path).registry is None
    assert main(["sweep", str(path), "--no-progress"]) == 0
    assert main(["export", str(path), "--out", str(tmp_path / "c")]) == 0
    assert "registered" not in capsys.readouterr().out
    assert MlflowClient(load(path).tracking_uri).search_registered_models() == []


@pytest.mark.parametrize("registry, problem", [
    ({"name": "a/b"}, "registry.name: 'a/b' is not allowed"),
    ({"nme": "x"}, "registry.nme: unknown key; allowed: name"),
    ("yes", "registry: expected a mapping, got str"),
])
def test_a_bad_registry_key_is_one_clear_line(tmp_path, capsys, registry, problem):
    path = line_sweep(tmp_path, registry=registry)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {problem}" in err and "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()


def test_aliases_compare_only_the_same_metric_in_the_same_direction():
    accuracy = Candidate("val_accuracy", True, 0.90)
    assert alias_for(accuracy, None, None)[0] == "champion"
    assert alias_for(accuracy, Candidate("val_accuracy", True, 0.89), "1")[0] == "champion"
    assert alias_for(accuracy, Candidate("val_accuracy", True, 0.90), "1")[0] == "challenger"
    loss = Candidate("val_loss", False, 0.1)
    alias, why = alias_for(loss, accuracy, "4")
    assert alias == "challenger" and "not comparable" in why
    assert alias_for(loss, Candidate("val_loss", False, 0.2), "1")[0] == "champion"
    assert alias_for(accuracy, None, "2")[0] == "challenger"  # a champion set by hand


BRANCHY = """
import torch


class Branchy(torch.nn.Module):
    \"\"\"A forward that branches on the data: torch.export can't trace it.\"\"\"

    def __init__(self):
        super().__init__()
        self.line = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.line(x) if x.sum() > 0 else -self.line(x)
"""


def test_a_model_torch_export_cannot_trace_is_exported_but_not_registered(tmp_path, capsys):
    (tmp_path / "branchy.py").write_text(BRANCHY)
    path = line_sweep(tmp_path, "branchy", model="branchy:Branchy",
                      budget={"n_trials": 1, "epochs": 1})
    assert main(["sweep", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "but not registered: torch.export could not trace branchy:Branchy" in err
    assert "--no-register" in err and "Traceback" not in err
    assert (tmp_path / "out" / "state_dict.pt").is_file()
    client = MlflowClient(load(path).tracking_uri)
    assert client.search_model_versions("name = 'branchy'") == []
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--no-register"]) == 0
