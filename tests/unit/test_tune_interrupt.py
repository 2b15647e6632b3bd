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


class SettlingClient(FakeClient):
    def set_tag(self, run_id, key, value):
        pass

    def delete_tag(self, run_id, key):
        pass

    def log_metric(self, run_id, key, value, step):
        pass


def test_a_stopped_trial_that_writes_after_the_search_ended_ends_finished(monkeypatch) -> None:
    """ASHA stopped trial b; its process ran on and its driver ended the run FAILED after the
    search had settled it: the watch after fit() puts it back to FINISHED."""
    client = SettlingClient([{"a": "FINISHED", "b": "RUNNING"}, {}, {"b": "FAILED"}])
    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(dict(client.status)))
    monkeypatch.setattr(tune, "time", FakeClock())
    trial = lambda tid, step: SimpleNamespace(trial_id=tid, status="TERMINATED", config={"params": {}},  # noqa: E731
                                              last_result={"step": step, "max_steps": 8, "val/loss": 1.0})
    grid = SimpleNamespace(_experiment_analysis=SimpleNamespace(trials=[trial("a", 8), trial("b", 2)]))
    result = tune.SearchResult(name="s", folder=None, parent_run_id="p", tracking_uri="", metric="val/loss", mode="min")
    base = SimpleNamespace(train=SimpleNamespace(max_steps=8))
    assert tune._settle_trials(grid, result=result, client=client, base=base) is False
    assert shutdowns == [{}]  # Ray's job ended before any run was settled
    assert [r.status for r in result.trials] == ["finished", "early-stopped"]
    assert client.status == {"a": "FINISHED", "b": "FINISHED"}
