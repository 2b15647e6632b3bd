"""ASHA that remembers its rungs across a resumed search.

Tune saves the search algorithm's and the callbacks' state with the experiment, but restores
the scheduler as it was when the search began (tuner.pkl): after `Tuner.restore` plain ASHA has
no recorded results and stops nothing. This ASHA writes its brackets (the rungs' recorded
results and which trial is in which bracket) to a file in the search's folder after every
decision, and reads them back the first time a restored copy is used. It also records which
trials it stopped (`stopped_trials`): after a Ctrl-C, Tune reports the trials it cut short
as TERMINATED too, so the stop decisions are what tell early-stopped from interrupted.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

_STATE = ("_brackets", "_trial_info", "_counter", "_num_stopped", "stopped")


def stopped_trials(state_file: str | Path) -> set[str]:
    """The ids of the trials this search's ASHA stopped (empty: no ASHA, or it stopped none)."""
    path = Path(state_file)
    if not path.is_file():
        return set()
    return set(pickle.loads(path.read_bytes()).get("stopped", ()))  # noqa: S301 - our own file


class RememberingASHA(ASHAScheduler):
    def __init__(self, *, state_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_file = state_file
        self._loaded = False
        self.stopped: set[str] = set()

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:  # never a trial's natural end: max_t is past the last step
            self.stopped.add(trial.trial_id)
        self._save()
        return decision

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_file)
        if path.is_file():
            for name, value in pickle.loads(path.read_bytes()).items():  # noqa: S301 - our own file
                setattr(self, name, value)

    def _save(self) -> None:
        path = Path(self.state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps({name: getattr(self, name) for name in _STATE}))
        tmp.replace(path)
