"""After Ctrl-C, `temper tune` ends Ray's job and then watches the trials' runs: one a trial
created (or reopened) just after the interrupt, and one an interrupted trial ended FAILED as
its workers went away, both end KILLED; a trial that had failed before keeps FAILED."""

from __future__ import annotations

from types import SimpleNamespace

import ray

from temper.launch import tune


class FakeClient:
    """The child runs of one search; `writes[i]` are the trials' own status writes that land
    just before the i-th listing."""

    def __init__(self, writes: list[dict[str, str]]) -> None:
        self.writes, self.listings, self.status = writes, 0, {}

    def get_run(self, run_id):
        return SimpleNamespace(info=SimpleNamespace(experiment_id="0"))

    def search_runs(self, experiments, filter_string, max_results):
        if self.listings < len(self.writes):
            self.status.update(self.writes[self.listings])
        self.listings += 1
        return [SimpleNamespace(info=SimpleNamespace(run_id=t, status=s), data=SimpleNamespace(tags={tune.TRIAL_TAG: t}))
                for t, s in sorted(self.status.items())]

    def set_terminated(self, run_id, status):
        self.status[run_id] = status


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_late_writes_of_interrupted_trials_end_killed(monkeypatch) -> None:
    client = FakeClient([{"t0": "FAILED", "t1": "RUNNING"},  # t0 failed on its own before Ctrl-C
                         {},
                         {"t2": "RUNNING"},  # t2 was starting: it created its run after the interrupt
                         {"t1": "FAILED"}])  # t1's driver saw its workers go away
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(dict(client.status)))
    monkeypatch.setattr(tune, "time", FakeClock())
    cut = tune._stop_trials_and_kill_their_runs(client, "parent")
    assert shutdowns == [{"t0": "FAILED", "t1": "KILLED"}]  # Ray's job ends after the first pass
    assert cut == "t1, t2"
    assert client.status == {"t0": "FAILED", "t1": "KILLED", "t2": "KILLED"}
    assert tune.time.now >= 3 + tune.QUIET_S  # watched until QUIET_S passed with nothing to do


def test_the_watch_ends_after_settle_s_even_if_a_trial_keeps_writing(monkeypatch) -> None:
    client = FakeClient([{"t0": "RUNNING"}] * 1000)  # a trial that reopens its run each second
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(tune, "time", FakeClock())
    assert tune._stop_trials_and_kill_their_runs(client, "parent") == "t0"
    assert tune.time.now == tune.SETTLE_S
