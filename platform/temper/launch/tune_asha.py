"""ASHA that remembers its rungs across a resumed search.

Tune saves the search algorithm's and the callbacks' state with the experiment, but restores
the scheduler as it was when the search began (tuner.pkl): after `Tuner.restore` plain ASHA has
no recorded results and stops nothing. This ASHA writes its brackets (the rungs' recorded
results and which trial is in which bracket) to a file in the search's folder after every
decision, and reads them back the first time a restored copy is used.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

_STATE = ("_brackets", "_trial_info", "_counter", "_num_stopped")


class RememberingASHA(ASHAScheduler):
    def __init__(self, *, state_file: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state_file = state_file
        self._loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)
        self._save()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load()
        decision = super().on_trial_result(tune_controller, trial, result)
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
