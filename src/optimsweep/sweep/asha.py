"""Asynchronous successive halving, the promotion form (Li et al., "A System for Massively
Parallel Hyperparameter Tuning", MLSys 2020): `pruner: {name: asha, ...}` in a sweep file.

Rungs lie at `min_resource * reduction_factor**k` reports. A trial that reaches a rung goes
on while it stands in the top 1/η of every trial that reached that rung so far (while fewer
than η did, when it is the best of them); otherwise it is paused there with its checkpoint,
not killed. Whenever a worker is free it first promotes the paused trial that now stands in
the top 1/η of its rung (the highest rung first), else starts a new configuration. Nothing
waits for a rung to fill. When the budget is used up and nothing runs, the leader of the
highest rung reached is finished if nothing that went beyond it finished (`leader`); the
rest stay pruned at their rungs. Optuna's own `SuccessiveHalvingPruner` is the stopping
form: it kills what this pauses.

Everything here reads a study's trials (their intermediate values and user attributes), so
every process on every host takes the same decision from the same records; the claim (which
promotes, under the study lock) and a trial's life (which pauses) apply it.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from optimsweep.records.schema import Attr, is_paused


class Asha:
    """The options of `pruner: {name: asha}`, checked when the sweep file loads."""

    def __init__(self, min_resource: int = 1, reduction_factor: int = 3):
        if isinstance(min_resource, bool) or not isinstance(min_resource, int) \
                or min_resource < 1:
            raise ValueError(f"min_resource: {min_resource!r} must be an integer >= 1 "
                             "(reports: epochs, or budget.report_every)")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) \
                or reduction_factor < 2:
            raise ValueError(f"reduction_factor: {reduction_factor!r} must be an integer >= 2")
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor

    @classmethod
    def of(cls, pruner: dict) -> Asha | None:
        """The promotion form a `pruner:` section asks for, or None for any other pruner."""
        if pruner.get("name") != "asha":
            return None
        return cls(**{k: v for k, v in pruner.items() if k != "name"})

    def rungs(self, max_steps: int) -> list[int]:
        """The steps at which a trial of `max_steps` reports is judged (its last is not)."""
        rungs, step = [], self.min_resource
        while step < max_steps:
            rungs.append(step)
            step *= self.reduction_factor
        return rungs

    def keeps_going(self, trials: list[optuna.trial.FrozenTrial], number: int, step: int,
                    maximize: bool) -> bool:
        """True when trial `number` stands in the top 1/η of every trial that reached the
        rung at `step` (itself included), or is the best of fewer than η."""
        return number in self._top(trials, step, maximize)

    def promotable(self, trials: list[optuna.trial.FrozenTrial], maximize: bool
                   ) -> optuna.trial.FrozenTrial | None:
        """The paused trial a free worker should promote: one in the top 1/η of its rung,
        from the highest rung, best first; None when no paused trial qualifies."""
        paused = sorted((t for t in trials if is_paused(t)),
                        key=lambda t: (-t.user_attrs[Attr.PAUSED_AT], t.number))
        tops: dict[int, list[int]] = {}
        for trial in paused:
            step = trial.user_attrs[Attr.PAUSED_AT]
            if step not in tops:
                tops[step] = self._top(trials, step, maximize)
        best = [t for t in paused if t.number in tops[t.user_attrs[Attr.PAUSED_AT]]]
        if not best:
            return None
        top_step = best[0].user_attrs[Attr.PAUSED_AT]
        return min((t for t in best if t.user_attrs[Attr.PAUSED_AT] == top_step),
                   key=lambda t: tops[top_step].index(t.number))

    def leader(self, trials: list[optuna.trial.FrozenTrial], maximize: bool
               ) -> optuna.trial.FrozenTrial | None:
        """At the study's end, the paused trial to finish anyway: the best at the highest
        rung any trial is paused at, when no trial went beyond that rung and finished (or
        still runs). Without it a study whose trials beyond that rung all failed (or one
        paused before the first arrivals at a rung went on, when ⌊n/η⌋ paused them all)
        would end with no configuration trained on its whole budget. The leader goes on to
        the end (Attr.LEADER)."""
        paused = [t for t in trials if is_paused(t)]
        if not paused:
            return None
        step = max(t.user_attrs[Attr.PAUSED_AT] for t in paused)
        if any(max(t.intermediate_values, default=0) > step for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.RUNNING)):
            return None
        at_top = [t for t in paused if t.user_attrs[Attr.PAUSED_AT] == step]
        return min(at_top, key=lambda t: (-t.intermediate_values[step] if maximize
                                          else t.intermediate_values[step], t.number))

    def _top(self, trials: list[optuna.trial.FrozenTrial], step: int,
             maximize: bool) -> list[int]:
        """The numbers of the top ⌊n/η⌋ of the n trials with a value at `step`, best first
        (ties: the earlier trial); while fewer than η reached it, the best of them. An
        interrupted trial's values are its retry's.

        The best of fewer than η goes on as in Optuna's successive halving (Li et al.'s
        promotion form would pause it: ⌊n/η⌋ is 0). Strictly, the first trial to train its
        whole budget could only leave the top rung once η trials reached it, η² the rung
        below and so on: with 30 trials of 15 epochs at η = 3, near the study's end, so a
        user waited the whole study for a first finished model."""
        reached = [(t.intermediate_values[step], t.number) for t in trials
                   if step in t.intermediate_values and not t.user_attrs.get(Attr.INTERRUPTED)]
        reached.sort(key=lambda vn: (-vn[0] if maximize else vn[0], vn[1]))
        return [n for _, n in reached[:max(len(reached) // self.reduction_factor, 1)]]
