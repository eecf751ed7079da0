"""`optimsweep train`: one configuration from flags or a file, tutorial-style output."""

from __future__ import annotations

from optimsweep.cli import main


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
    code = main(["train", "--optimizer", "rmsprop"])
    err = capsys.readouterr().err
    assert code == 2
    assert "optimizer: 'rmsprop' is not allowed; choose one of: sgd, momentum, adam" in err
