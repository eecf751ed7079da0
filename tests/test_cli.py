"""`optimsweep train`: one configuration from flags or a file, tutorial-style output."""

from __future__ import annotations

import pytest

from optimsweep.cli import main
from sweeps import fashion_sweep, line_sweep


def test_train_prints_each_epoch_and_the_test_error(capsys, tmp_path):
    code = main(["train", "--task", "regression", "--model", "linear", "--lr", "0.01",
                 "--epochs", "3", "--save", str(tmp_path / "line.pt")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Epoch 1/3" in out and "Epoch 3/3" in out and "Test Error" in out
    assert (tmp_path / "line.pt").is_file()


def test_train_reads_a_config_file_and_flags_override_it(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("task: regression\nmodel: linear\nlr: 1e-2\nepochs: 5\n")
    assert main(["train", "--config", str(config), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "Epoch 3" not in out


def test_bad_value_exits_2_naming_field_and_choices(capsys):
    code = main(["train", "--optimizer", "lbfgs"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("optimizer: 'lbfgs' is not allowed; choose one of: sgd, momentum, adam, adamw, "
            "rmsprop") in err


@pytest.mark.parametrize("flags, message", [
    (["--n-trials", "0"], "--n-trials: 0 must be >= 1"),
    (["--n-trials", "-3"], "--n-trials: -3 must be >= 1"),
    (["--timeout", "-5"], "--timeout: -5.0 must be > 0"),
    (["--timeout", "0"], "--timeout: 0.0 must be > 0"),
    (["--workers", "0"], "--workers: 0 must be >= 1"),
    (["--n-trials", "many"], "argument --n-trials: invalid int value: 'many'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_sweep_flags_exit_2_with_one_line_and_create_nothing(tmp_path, capsys, flags,
                                                                 message):
    assert main(["sweep", str(line_sweep(tmp_path)), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "mlruns").exists()


def test_train_with_a_missing_config_file_is_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.yaml'}: no such config file\n"


@pytest.mark.parametrize("url, shown", [
    ("postgresql://optimsweep:s3cret@127.0.0.1:9/db", "postgresql://optimsweep:***@127.0.0.1:9/db"),
    ("postgresql://optimsweep@127.0.0.1:9/db?password=s3cret",
     "postgresql://optimsweep@127.0.0.1:9/db?password=***"),
], ids=["userinfo", "query"])
@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["", "debug"])
def test_a_password_in_a_storage_url_is_never_printed(url, shown, debug, capsys, monkeypatch):
    """Nor in the traceback --debug shows."""
    monkeypatch.setenv("OPTIMSWEEP_STORAGE", url)
    assert main([*debug, "best", "line"]) == 3
    err = capsys.readouterr().err
    assert shown in err and "s3cret" not in err
    assert ("Traceback" in err) == bool(debug)


def test_a_sweep_prints_one_line_per_failed_trial_and_a_summary_that_adds_up(tmp_path,
                                                                             capsys):
    """No Optuna info lines and no tracebacks in the terminal: the reason is on the run."""
    path = fashion_sweep(
        tmp_path, budget={"n_trials": 2, "epochs": 2},
        search_space={"optimizer": {"type": "categorical", "choices": ["momentum", "adam"]},
                      "lr": {"type": "float", "low": 1.0e-3, "high": 1.0e4, "log": True},
                      "momentum": 0.99},
        baseline=[{"optimizer": "momentum", "lr": 1.0e4}, {"optimizer": "adam", "lr": 1.0e-3}])
    assert main(["sweep", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "[I " not in out + err
    assert "trial 0 failed: training diverged" in err
    assert "study 'tiny': 2 trials: 1 complete, 0 pruned, 1 failed; budget 2 of 2 used" in out
