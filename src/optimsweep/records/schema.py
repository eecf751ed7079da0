"""What the records hold, in one vocabulary: a trial's state with its Optuna and MLflow faces,
the name of every user attribute and tag, the artifact files, and the confirm ranking.

Both stores are read by people (the MLflow UI, `optuna-dashboard`) and by earlier versions of
this tool: every name here is part of the records' format, and changing one orphans what
existing studies hold.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState


class State(enum.Enum):
    """How a trial (or a confirm run) stands, as Optuna and MLflow each say it."""

    RUNNING = ("running", TrialState.RUNNING, "RUNNING")
    COMPLETE = ("complete", TrialState.COMPLETE, "FINISHED")
    PRUNED = ("pruned", TrialState.PRUNED, "KILLED")
    FAILED = ("failed", TrialState.FAIL, "FAILED")
    # Successive halving with promotion (`pruner: asha`): stopped at a rung with its
    # checkpoint, no process of its own, until a free worker promotes it.
    PAUSED = ("paused", TrialState.WAITING, "SCHEDULED")

    def __init__(self, word: str, trial_state: TrialState, run_status: str):
        self.word = word  # the `optimsweep.state` tag
        self.trial_state = trial_state
        self.run_status = run_status  # MLflow's run status

    @classmethod
    def of_trial(cls, trial: optuna.trial.FrozenTrial) -> State:
        """A finished, running or paused trial's state (a WAITING trial that is not paused
        is a queue entry: it has no run, and no State)."""
        return next(s for s in cls if s.trial_state == trial.state)


# A run's role in the study's experiment (tag ROLE).
STUDY_ROLE, TRIAL_ROLE, CONFIRM_ROLE = "study", "trial", "confirm"


class Tag:
    """MLflow tag names. Every run: ROLE, STUDY, STUDY_UID (studies made by earlier versions
    have none until this version first opens them). Child runs: TRIAL, STATE, HOST, PID
    (which process owns it, so a later command can close it if that process died), ERROR."""

    ROLE = "optimsweep.role"
    STUDY = "optimsweep.study"
    STUDY_UID = "optimsweep.study_uid"  # the identity of the study it belongs to (Attr.STUDY_UID)
    TRIAL = "optimsweep.trial_number"
    STATE = "optimsweep.state"
    HOST = "optimsweep.host"
    PID = "optimsweep.pid"
    ERROR = "optimsweep.error"
    # a trial's run
    DEVICE = "optimsweep.device"  # cuda:0 or cpu, as the worker saw it
    DEVICE_NAME = "optimsweep.device_name"  # "NVIDIA H100 80GB HBM3", or the CPU's model
    DEVICE_MEMORY = "optimsweep.device_memory_gib"  # a GPU's
    DEVICE_INDEX = "optimsweep.device_index"  # the machine's GPU (CUDA_VISIBLE_DEVICES), or cpu
    VISIBLE_DEVICES = "optimsweep.cuda_visible_devices"  # what its worker was given, if set
    SLURM_JOB = "optimsweep.slurm_job"  # "1234_3 restart 2": the array task that ran it
    FUSED = "optimsweep.fused"  # members of its group
    PRECISION = "optimsweep.precision"  # fp32 or bf16, `auto` resolved
    RETRY_OF = "optimsweep.retry_of"
    RESUMED_FROM = "optimsweep.resumed_from"  # "trial 7 epoch 6": the checkpoint it went on from
    CHECKPOINTS = "optimsweep.checkpoints"  # "3 writes, 0.41 s (0.6% of training)"
    RUNG = "optimsweep.rung"  # "2 (epoch 9)": the highest rung it reached (pruner asha)
    PROMOTIONS = "optimsweep.promotions"
    SAMPLED = "optimsweep.sampled"
    CODE = "optimsweep.code."  # + data/model/metric: the user's factory and its version
    # a confirm run
    SEED = "optimsweep.seed"
    # the study's parent run
    SAMPLER = "optimsweep.sampler"
    SAMPLER_OPTIONS = "optimsweep.sampler_options"
    PRUNER = "optimsweep.pruner"
    PRUNER_OPTIONS = "optimsweep.pruner_options"
    METRIC = "optimsweep.metric"
    STORAGE = "optimsweep.storage"  # redacted
    FINGERPRINT = "optimsweep.sweep_fingerprint"
    NOTE = "optimsweep.note"
    SUMMARIZED = "optimsweep.summarized"  # the trials the summary and plots show
    BEST_TRIAL = "optimsweep.best_trial"
    BEST_RUN_ID = "optimsweep.best_run_id"
    CONFIRMED_TRIAL = "optimsweep.confirmed_trial"
    PARENT = "mlflow.parentRunId"


class ModelTag:
    """Tags of a registered model version: where it came from and what it was chosen on."""

    STUDY = "optimsweep.study"
    TRIAL = "optimsweep.trial_number"
    RUN_ID = "optimsweep.run_id"
    FINGERPRINT = "optimsweep.sweep_fingerprint"
    GIT_COMMIT = "optimsweep.git_commit"
    METRIC = "optimsweep.metric"  # what the aliases compare: the study's selection metric,
    DIRECTION = "optimsweep.direction"
    SELECTION_VALUE = "optimsweep.selection_value"  # its confirmed mean, else its value
    CONFIRMED = "optimsweep.confirmed"  # "0.8712 ± 0.0031 over seeds [1, 2, 3]"


class Attr:
    """Optuna user attribute names: of a trial, then of the study."""

    RUN_ID = "mlflow_run_id"  # the trial's MLflow run
    HOST = "host"  # the process that claimed it
    PID = "pid"
    INTERRUPTED = "interrupted"  # never got a verdict: not counted, its config run again
    ERROR = "error"
    BASELINE = "baseline"
    RETRY_OF = "retry_of"  # the trial number whose config this one runs again
    RETRIES = "retries"
    EPOCHS_RUN = "epochs_run"
    RESUMED_FROM = "resumed_from"  # {"trial": 7, "epoch": 6}: the checkpoint it went on from
    PAUSED_AT = "paused_at"  # the step (epoch) of the rung it waits at; None once promoted
    PROMOTIONS = "promotions"  # how many times a paused trial was promoted
    LEADER = "leader"  # promoted at the study's end to train its whole budget (asha.leader)
    # the study's
    STUDY_UID = "study_uid"  # given when the study is created: its runs carry it as a tag, so
    # a repair deletes only runs it can prove are this very study's (not a same-named one's)
    FINGERPRINT = "fingerprint"
    SWEEP_FILE = "sweep_file"
    SWEEP_TEXT = "sweep_text"  # redacted: `export STUDY` works without the file
    EXPERIMENT_ID = "mlflow_experiment_id"
    PARENT_RUN_ID = "mlflow_parent_run_id"
    CONFIRMED = "confirmed"  # a Ranking, as_attr()


# Artifacts of a trial's run.
STATE_DICT = "state_dict.pt"
CONFIG_FILE = "config.yaml"
TRACEBACK_FILE = "traceback.txt"
CHECKPOINT_DIR = "checkpoints"  # the latest training state (and one being written) while
# the run can still be resumed; removed once its trial is finished
INTERRUPTED = "interrupted: Ctrl-C or SIGTERM"  # the reason of a trial stopped by a signal
# Artifact of the study's parent run: every finished trial, best first (MlflowClient.log_table).
LEADERBOARD_FILE = "leaderboard.json"

# Metrics of a trial's run besides its curves: the best report of the study's metric so far
# (best_<metric>, e.g. best_val_loss) and the step it came at (best_epoch; in reports when
# reports_per_epoch > 1). Logged at every report, so the latest value is the best so far.
BEST_STEP = "best_epoch"


def best_metric(metric: str) -> str:
    """best_val_accuracy for val_accuracy: the best value of `metric` over a run's reports."""
    return f"best_{metric}"

# States whose trials use up budget (unless interrupted); WAITING ones only when paused.
_COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                   TrialState.WAITING)


def is_paused(trial: optuna.trial.FrozenTrial) -> bool:
    """Paused at a rung (pruner asha): WAITING for a promotion, not a queue entry."""
    return trial.state == TrialState.WAITING and trial.user_attrs.get(Attr.PAUSED_AT) is not None


def is_queued(trial: optuna.trial.FrozenTrial) -> bool:
    """Enqueued params waiting for a claim to run them (a baseline, a retry)."""
    return trial.state == TrialState.WAITING and not is_paused(trial)


def is_counted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that uses up budget: started (a paused one too), and not one that never gave
    its config a verdict (interrupted, or stopped by a store failure)."""
    return (trial.state in _COUNTED_STATES and not is_queued(trial)
            and not trial.user_attrs.get(Attr.INTERRUPTED))


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=_COUNTED_STATES)
            if is_counted(t)]


@dataclass(frozen=True)
class Ranking:
    """What `confirm` found: the top configs re-trained with fresh seeds, best mean first.
    Stored on the study as a user attribute (`as_attr`)."""

    winner: int  # trial number
    seeds: list[int]
    top_k: int
    trials: list[int]  # the trials it covered
    ranking: list[tuple[int, float, float]]  # (trial, mean, std), best first
    single_seed_best: int

    def as_attr(self) -> dict:
        return {"winner": self.winner, "seeds": list(self.seeds), "top_k": self.top_k,
                "trials": list(self.trials),
                "ranking": [[n, mean, std] for n, mean, std in self.ranking],
                "single_seed_best": self.single_seed_best}

    @classmethod
    def of(cls, study: optuna.Study) -> Ranking | None:
        """The study's ranking; None before any `confirm`. Rankings stored before `trials`
        was recorded covered exactly the trials they rank."""
        raw = study.user_attrs.get(Attr.CONFIRMED)
        if not raw:
            return None
        ranking = [tuple(row) for row in raw["ranking"]]
        return cls(winner=raw["winner"], seeds=list(raw["seeds"]), top_k=raw.get("top_k", 0),
                   trials=list(raw.get("trials", [n for n, *_ in ranking])), ranking=ranking,
                   single_seed_best=raw.get("single_seed_best", ranking[0][0]))

    def mean_std(self, trial: int) -> tuple[float, float]:
        return next((mean, std) for n, mean, std in self.ranking if n == trial)
