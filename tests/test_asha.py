"""Successive halving that pauses instead of killing (`pruner: asha`): trials below the cut
at a rung wait with their checkpoint; a free worker promotes one once it stands in the top
1/η of its rung; promoted trials go on in the same run from where they stopped, bit for bit;
at the study's end the trials still paused are closed as pruned at their rung."""

from __future__ import annotations

import itertools
import signal

import pytest
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from optimsweep.core import train
from optimsweep.core.artifacts import load_state_dict
from optimsweep.sweep.asha import Asha
from optimsweep.sweep.space import config_from_params
from records import (
    DATA,
    assert_invariant,
    finish,
    load_study,
    mlflow_runs,
    run_cli,
    start,
    wait_until,
)
from sweeps import fashion_sweep
from sweeps import load as load_spec

ASHA = {"name": "asha", "min_resource": 1, "reduction_factor": 3}
# 9 configurations of 9 epochs: rungs at epochs 1 and 3; a third of a second an epoch.
NINE = {"pruner": ASHA, "budget": {"n_trials": 9, "epochs": 9},
        "search_space": {"optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                         "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True}}}

# Every trial the same config: their values tie, the earlier trial ranks first, and which
# trial pauses and which is promoted is known in advance.
ONE_CONFIG = {"optimizer": {"type": "categorical", "choices": ["adam"]},
              "lr": {"type": "categorical", "choices": [3.0e-3]}}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTIMSWEEP_DATA", str(DATA))


def trial(number: int, values: dict[int, float], paused_at: int | None = None,
          state: TrialState | None = None, **attrs):
    if state is None:
        state = TrialState.WAITING if paused_at is not None else TrialState.PRUNED
    made = create_trial(state=state, params={"lr": 0.1}, intermediate_values=values,
                        value=values[max(values)] if state == TrialState.COMPLETE else None,
                        distributions={"lr": FloatDistribution(0.01, 1)},
                        user_attrs={**({"paused_at": paused_at} if paused_at else {}), **attrs})
    made.number = number
    return made


def test_rungs_and_the_top_third_of_a_rung():
    asha = Asha(min_resource=1, reduction_factor=3)
    assert asha.rungs(9) == [1, 3] and asha.rungs(27) == [1, 3, 9] and asha.rungs(1) == []
    # Fewer than η trials at a rung: the best of them goes on, the others wait.
    first = [trial(0, {1: 0.5}), trial(1, {1: 0.7}, paused_at=1)]
    assert asha.keeps_going(first[:1], 0, 1, maximize=True)  # alone there: the best
    assert not asha.keeps_going(first, 0, 1, maximize=True)
    assert asha.promotable(first, maximize=True).number == 1
    assert asha.promotable(first, maximize=False) is None  # val_loss: 0 went on, 1 is worse
    third = [trial(0, {1: 0.5}, paused_at=1), trial(1, {1: 0.7}, paused_at=1),
             trial(2, {1: 0.6}, paused_at=1)]
    assert asha.promotable(third, maximize=True).number == 1
    assert asha.promotable(third, maximize=False).number == 0  # val_loss: lower is better
    assert not asha.keeps_going(third, 2, 1, maximize=True)
    # Five: still one in the top third (⌊5/3⌋), the sixth makes it two.
    five = [*third, trial(3, {1: 0.4}), trial(4, {1: 0.3})]
    assert asha.keeps_going(five, 1, 1, maximize=True)
    assert not asha.keeps_going(five, 2, 1, maximize=True)
    assert asha.keeps_going([*five, trial(5, {1: 0.2})], 2, 1, maximize=True)
    # A trial paused at a higher rung is promoted first.
    higher = [trial(n, {1: 0.9, 3: 0.9 - n / 10}, paused_at=3) for n in (3, 4, 5)]
    assert asha.promotable(third + higher, maximize=True).number == 3


def test_the_leader_of_the_top_rung_is_finished_when_every_trial_beyond_it_failed():
    """At the study's end, the best paused at the highest rung goes on if nothing that went
    beyond that rung finished or still runs: a study ends with a config trained whole."""
    asha = Asha(min_resource=1, reduction_factor=3)
    diverged = trial(0, {1: 0.9, 3: 0.9, 5: 0.9}, state=TrialState.FAIL)
    paused = [trial(1, {1: 0.8, 3: 0.7}, paused_at=3), trial(2, {1: 0.85, 3: 0.8}, paused_at=3),
              trial(3, {1: 0.5}, paused_at=1)]
    assert asha.leader([diverged, *paused], maximize=True).number == 2
    assert asha.leader([diverged, *paused], maximize=False).number == 1
    finished = trial(0, {1: 0.9, 3: 0.9, 5: 0.9}, state=TrialState.COMPLETE)
    assert asha.leader([finished, *paused], maximize=True) is None
    assert asha.leader([diverged], maximize=True) is None  # nothing paused


def test_a_retry_is_judged_at_its_rungs_once_and_its_interrupted_trial_not_at_all():
    """A retry carries the reports its checkpoint held; the trial it retries, failed by a
    kill, stands for nothing at a rung (else that config would count twice there)."""
    asha = Asha(min_resource=1, reduction_factor=3)
    killed = trial(0, {1: 0.9, 2: 0.91}, state=TrialState.FAIL, interrupted=True)
    retry = trial(3, {1: 0.9, 2: 0.91}, state=TrialState.RUNNING, retry_of=0)
    trials = [killed, trial(1, {1: 0.5}), trial(2, {1: 0.6}), retry]
    # Three configs at rung 1, the retry the best: it goes on. Counted with the killed one
    # (four values, a tie broken by the earlier number), it would be paused.
    assert asha.keeps_going(trials, 3, 1, maximize=True)
    assert not asha.keeps_going(trials, 0, 1, maximize=True)


@pytest.mark.parametrize("options, problem", [
    ({"reduction_factor": 1}, "reduction_factor: 1 must be an integer >= 2"),
    ({"min_resource": 0}, "min_resource: 0 must be an integer >= 1"),
])
def test_bad_options_name_the_key_before_any_study_exists(tmp_path, capsys, options, problem):
    path = fashion_sweep(tmp_path, **{**NINE, "pruner": {**ASHA, **options}})
    code, _, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 2 and problem in err and "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()


def test_asha_needs_checkpoints(tmp_path, capsys):
    path = fashion_sweep(tmp_path, **NINE, checkpoint=False)
    code, _, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 2 and "checkpoint: false is not allowed with pruner asha" in err


def test_paused_trials_are_promoted_and_go_on_in_the_same_run(tmp_path, capsys):
    path = fashion_sweep(tmp_path, **NINE)
    spec = load_spec(path)
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    client, runs, trials = assert_invariant(spec)
    assert len(trials) == 9  # promotions cost epochs, not trials
    promoted = [t for t in trials if t.user_attrs.get("promotions")]
    assert promoted and "paused at epoch 1" in err and "promoted, goes on from epoch" in err
    runs = {r.info.run_id: r for r in runs}
    for t in trials:
        run = runs[t.user_attrs["mlflow_run_id"]]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        # one curve per trial, each epoch once, the same values Optuna holds
        assert steps == list(range(1, len(steps) + 1)) == sorted(t.intermediate_values)
        assert "checkpoints" not in [a.path for a in client.list_artifacts(run.info.run_id)]
        if t.state == TrialState.PRUNED:  # stopped at a rung: which one, on the run
            assert run.data.tags["optimsweep.rung"] in ("0 (epoch 1)", "1 (epoch 3)")
            assert len(steps) in (1, 3)
    # Every rung's top third went on (promoted if it was paused there), and trial 0, the
    # first at each rung and so the best of fewer than 3, trained all 9 epochs.
    assert len(trials[0].intermediate_values) == 9
    for rung, following in itertools.pairwise((1, 3, 9)):
        ranked = sorted((t for t in trials if rung in t.intermediate_values),
                        key=lambda t, r=rung: (-t.intermediate_values[r], t.number))
        assert all(following in t.intermediate_values for t in ranked[:len(ranked) // 3])
    promotions = sum(t.user_attrs.get("promotions", 0) for t in trials)
    stopped = sum(t.state == TrialState.PRUNED for t in trials)
    assert f"{stopped} pruned ({stopped} of them paused at a rung" in out
    assert f"{promotions} promotions" in out
    # A promoted trial ends where its config trained in one go ends, tensor for tensor.
    for t in promoted:
        epochs = len(t.intermediate_values)
        saved = load_state_dict(client.download_artifacts(
            t.user_attrs["mlflow_run_id"], "state_dict.pt", str(tmp_path / str(t.number))))
        config = config_from_params(spec.base_config(), t.params)
        straight = train.fit(config, train.load_data(config),
                             on_epoch=lambda stats, n=epochs: stats.epoch >= n)
        assert all(torch.equal(saved[k], v) for k, v in straight.model.state_dict().items())


def test_a_sweep_cut_short_leaves_trials_paused_and_the_next_run_promotes_them(tmp_path,
                                                                              capsys):
    """Two of nine trials: the first, alone at each rung, trains to the end; the second,
    worse at epoch 1, pauses there and waits for the next sweep."""
    path = fashion_sweep(tmp_path, **NINE, baseline=[{"optimizer": "adam", "lr": 3.0e-3},
                                                     {"optimizer": "sgd", "lr": 1.0e-4}])
    spec = load_spec(path)
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress", "--n-trials", "2")
    assert code == 0, err
    trials = assert_invariant(spec, n_trials=2)[2]
    (paused,) = [t for t in trials if t.state == TrialState.WAITING]
    (first,) = [t for t in trials if t.state == TrialState.COMPLETE]
    assert first.number == 0 and len(first.intermediate_values) == 9
    assert paused.number == 1 and paused.user_attrs["paused_at"] == 1
    assert "1 paused" in out  # not the study's end: still promotable
    client, runs = mlflow_runs(spec, "trial")
    assert sorted((r.info.status, r.data.tags["optimsweep.state"]) for r in runs) == \
        [("FINISHED", "complete"), ("SCHEDULED", "paused")]
    code, _, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    trials = assert_invariant(spec)[2]
    assert len(trials) == 9 and not any(t.state == TrialState.WAITING for t in trials)


def test_a_promoted_trial_killed_mid_way_is_retried_from_its_checkpoint(tmp_path):
    path = fashion_sweep(tmp_path, **NINE, checkpoint={"every": 0})
    spec = load_spec(path)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)

    def promoted_and_past_its_rung():
        study = load_study(spec)
        return any(t.state == TrialState.RUNNING and t.user_attrs.get("promotions")
                   and len(t.intermediate_values) >= 2 for t in study.trials)

    wait_until(promoted_and_past_its_rung, timeout=180, what="a promoted trial at epoch 2")
    process.send_signal(signal.SIGKILL)
    finish(process)
    process = start("sweep", path, "--no-progress", cwd=tmp_path)
    code, _, err = finish(process, timeout=300)
    assert code == 0, err
    client, runs, trials = assert_invariant(spec)
    retry = next(t for t in trials if t.user_attrs.get("retry_of") is not None)
    assert retry.user_attrs["resumed_from"]["epoch"] >= 2
    assert len([t for t in trials if not t.user_attrs.get("interrupted")]) == 9


def test_rungs_within_an_epoch_pause_and_resume_mid_epoch_exactly(tmp_path, capsys):
    # 1k images at batch 128: 8 batches an epoch, 4 reports of 2 batches; rungs at 1/4,
    # 3/4 and 2 1/4 epochs, each within an epoch. Nine trials of one config: every value
    # ties, so the earlier trial ranks first and each decision is known in advance.
    path = fashion_sweep(tmp_path, **{**NINE, "budget": {"n_trials": 9, "epochs": 3,
                                                         "report_every": 0.25},
                                      "search_space": ONE_CONFIG},
                         fixed={"batch_size": 128})
    spec = load_spec(path)
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    client, runs, trials = assert_invariant(spec)
    # Trial 0, first at every rung, trains to the end. At 1/4 epoch the others pause; the
    # sixth arrival makes the top third two (trial 1 promoted), the ninth three (trial 2);
    # each then pauses at 3/4 epoch, behind trial 0.
    assert [(t.state, len(t.intermediate_values), t.user_attrs.get("promotions", 0))
            for t in trials] == [(TrialState.COMPLETE, 12, 0)] + \
        [(TrialState.PRUNED, 3, 1)] * 2 + [(TrialState.PRUNED, 1, 0)] * 6
    assert "paused at epoch 0.25" in err and "paused at epoch 0.75" in err
    epochs = client.get_metric_history(trials[0].user_attrs["mlflow_run_id"], "epoch")
    assert [(m.step, m.value) for m in epochs] == [(s, s / 4) for s in range(1, 13)]
    # Stopped after 2 batches and resumed at the third: the weights of one straight run.
    config = config_from_params(spec.base_config(), trials[1].params)
    (straight,) = train.fit_group([config], train.load_data(config),
                                  [lambda stats: stats.epoch >= 3], reports_per_epoch=4)
    straight = straight.model.state_dict()
    for t in trials[1:3]:
        assert t.user_attrs["paused_at"] == 3
        saved = load_state_dict(client.download_artifacts(
            t.user_attrs["mlflow_run_id"], "state_dict.pt", str(tmp_path / str(t.number))))
        assert all(torch.equal(saved[k], v) for k, v in straight.items())
    rungs = sorted(r.data.tags.get("optimsweep.rung", "") for r in runs)
    assert rungs == [""] + ["0 (epoch 0.25)"] * 6 + ["1 (epoch 0.75)"] * 2


def test_report_every_must_divide_an_epoch(tmp_path, capsys):
    path = fashion_sweep(tmp_path, budget={"n_trials": 2, "epochs": 2, "report_every": 0.4})
    code, _, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 2 and "budget.report_every: 0.4 is not allowed" in err


def test_fused_trials_pause_and_are_promoted_one_by_one(tmp_path, capsys):
    path = fashion_sweep(tmp_path, **{**NINE, "search_space": ONE_CONFIG}, fuse=3)
    spec = load_spec(path)
    code, out, err = run_cli(capsys, "sweep", path, "--no-progress")
    assert code == 0, err
    client, runs, trials = assert_invariant(spec)
    # Groups of three: trial 0 goes on alone; the sixth and ninth arrivals at epoch 1 let
    # trials 1 and 2 be promoted, each by itself, to pause again at epoch 3 behind trial 0.
    assert [(t.state, len(t.intermediate_values), t.user_attrs.get("promotions", 0))
            for t in trials] == [(TrialState.COMPLETE, 9, 0)] + \
        [(TrialState.PRUNED, 3, 1)] * 2 + [(TrialState.PRUNED, 1, 0)] * 6
    assert err.count("promoted, goes on from epoch") == 2
    assert {r.data.tags["optimsweep.fused"] for r in runs} >= {"3"}
    for t in trials:
        history = client.get_metric_history(t.user_attrs["mlflow_run_id"], "val_accuracy")
        assert [m.step for m in history] == sorted(t.intermediate_values)


def test_the_sampler_learns_from_paused_trials_as_from_pruned_ones():
    # 20 trials paused at their first rung, the best near x = 0.8: TPE, which skips WAITING
    # trials, sees them as pruned there and samples near 0.8 instead of at random.
    import optuna

    from optimsweep.records.optuna_adapter import paused_seen_as_pruned, start_trial
    from optimsweep.sweep.samplers import build_sampler

    study = optuna.create_study(direction="maximize",
                                sampler=build_sampler({"name": "random"}, seed=0))
    for _ in range(20):
        t = start_trial(study)
        t.report(-abs(t.suggest_float("x", 0, 1) - 0.8), 1)
        t.set_user_attr("paused_at", 1)
        study._storage.set_trial_state_values(t._trial_id, TrialState.WAITING)
    study.sampler = paused_seen_as_pruned(build_sampler({"name": "tpe"}, seed=0))
    drawn = []
    for _ in range(8):
        t = start_trial(study)
        drawn.append(t.suggest_float("x", 0, 1))
        study.tell(t, state=TrialState.PRUNED)
    assert sorted(abs(x - 0.8) for x in drawn)[4] < 0.1, drawn  # 5 of 8 (at random: 1.6)
    assert sum(t.state == TrialState.WAITING for t in study.trials) == 20  # still paused
