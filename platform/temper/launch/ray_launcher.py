"""Ray launcher: Ray Train's TorchTrainer runs `resources.workers` workers.

Starts a local Ray instance, or joins `--address` / $RAY_ADDRESS. Rank 0's progress
events travel to the driver through a small ProgressSink actor, so the progress bar is
drawn where the user's terminal is, whichever node the workers run on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from temper.console import ProgressDisplay, console
from temper.errors import JobFailedError, TemperError, WorkerFailedError, root_cause
from temper.launch.base import STOP_GRACE_S, Job, Launcher, LaunchResult
from temper.launch.signals import sigterm_interrupts

log = logging.getLogger(__name__)

# Environment forwarded to the workers when set on the driver.
FORWARDED_ENV = (
    "TEMPER_LOG_LEVEL", "TEMPER_PEAK_TFLOPS", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
    "TEMPER_FAULT", "TEMPER_FAULT_ONCE", "TEMPER_TRACE_SAMPLES", "TEMPER_HOLD",  # rehearsals (runtime.faults)
    "TEMPER_SPOOL_DIR",  # where undelivered metrics wait (temper.tracking.spool)
    "TEMPER_VERBOSE",  # `temper run --verbose`
    # Ray Train's controller waits this long (60 s) for a worker group of the size it chose; an
    # elastic job that lost a node tries the old size first, so this is how long it takes to shrink
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
)


def _job_env() -> dict[str, str]:
    """Inside a Ray job (`temper submit`), the job's own env_vars: they reach every worker
    already, and ray.init refuses a runtime env that names one of them again."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return dict((config.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def append_shipped_log(path: str, *, start: int, data: bytes) -> None:
    """A rank on another node sent what it wrote to its log this attempt (from byte `start` of
    its file): append it to the driver's run folder, so the driver uploads every rank's log.
    Where the run folder is on shared storage the bytes are already there: nothing to add."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+b") as f:
        f.seek(start)
        if f.read(len(data)) == data:
            return
        f.seek(0, os.SEEK_END)
        f.write(data)


def _progress_sink_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressSink:
        def __init__(self) -> None:
            self.events: list[dict] = []
            self.stop = False
            self.nodes: dict[int, str] = {}
            self.mlflow_run_id: str | None = None  # set when the driver created the run late

        def register(self, rank: int, where: str) -> None:
            self.nodes[rank] = where  # each worker says where it runs (temper.nodes tag)

        def where(self) -> dict[int, str]:
            return self.nodes

        def push(self, event: dict) -> None:
            self.events.append(event)

        def request_stop(self) -> None:
            self.stop = True

        def request_preempt(self) -> None:
            self.preempt = True

        def preempt_requested(self) -> bool:
            return getattr(self, "preempt", False)

        def stop_requested(self) -> bool:
            return self.stop

        def set_run_id(self, run_id: str) -> None:
            self.mlflow_run_id = run_id

        def run_id(self) -> str | None:
            return self.mlflow_run_id

        def drain(self) -> list[dict]:
            events, self.events = self.events, []
            return events

        def node(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def append_log(self, path: str, start: int, data: bytes) -> None:
            append_shipped_log(path, start=start, data=data)

    return ProgressSink


#: Seconds past fault.preemption_grace_s before the driver stops waiting for the workers.
PREEMPT_MARGIN_S = 10.0


def scaling_kwargs(spec: Any) -> dict[str, Any]:
    """ScalingConfig's size: `workers`, or for an elastic job (min_workers < workers) Ray Train
    V2's (min, max) range with its resize check every resources.resize_interval_s."""
    r = spec.resources
    if r.min_workers is None or r.min_workers >= r.workers:
        return {"num_workers": r.workers}
    return {"num_workers": (r.min_workers, r.workers), "elastic_resize_monitor_interval_s": r.resize_interval_s}


def failure_retries(spec: Any) -> int:
    """FailureConfig.max_failures: fault.max_failures; an elastic job restarts (at its new size)
    on every lost worker, so it retries without limit (-1) unless max_failures says otherwise."""
    elastic = spec.resources.min_workers is not None and spec.resources.min_workers < spec.resources.workers
    return -1 if elastic and spec.fault.max_failures == 0 else spec.fault.max_failures


class RayLauncher(Launcher):
    name = "ray"

    def __init__(self, *, address: str | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            use_token_auth_if_available()  # before any `import ray`: Ray reads it at import
        self._started_ray = False
        self._stop = threading.Event()
        self._sink: Any = None
        self._run_id: str | None = None

    def _init_ray(self, job: Job) -> None:
        import ray

        if ray.is_initialized():
            return
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in _job_env()}
        if job.spec.resources.gpus_per_worker > 0:  # before Ray Train creates the NCCL group
            from temper.runtime.failure import flight_recorder_env

            env = {**flight_recorder_env(job.run_info.run_folder), **{k: v for k, v in os.environ.items()
                                                                       if k.startswith("TORCH_NCCL_")}, **env}
        # The dashboard hosts Ray's state API, which Ray Train's controller polls.
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True,
                                  "configure_logging": True, "logging_level": "WARNING"}
        if self.address:
            try:
                ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError) as e:
                raise TemperError(
                    f"--address {self.address}: cannot join the Ray cluster ({str(e).splitlines()[0]}); "
                    "check the address or drop --address to start a local Ray"
                ) from None
        else:
            r = job.spec.resources
            need = r.workers * r.cpus_per_worker
            ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), **kwargs)
        self._started_ray = True
        if not os.environ.get("TEMPER_VERBOSE"):
            quiet_ray_internal_tracebacks()
        self._check_resources(job)

    def _check_resources(self, job: Job) -> None:
        import ray

        r = job.spec.resources
        have_gpus = ray.cluster_resources().get("GPU", 0)
        if r.gpus_per_worker and r.workers * r.gpus_per_worker > have_gpus and not self.address:
            raise TemperError(
                f"resources.gpus_per_worker: {r.workers} workers x {r.gpus_per_worker} GPUs "
                f"requested but this machine's Ray sees {have_gpus:g}; lower resources.workers "
                "or resources.gpus_per_worker"
            )

    def _trainer(self, job: Job, sink: Any):
        from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from temper.runtime.entry import ray_train_loop

        r = job.spec.resources
        use_gpu = r.gpus_per_worker > 0
        resources = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
        storage = None if self.address else str((job.workdir / ".temper" / "ray").resolve())
        return TorchTrainer(
            ray_train_loop,
            train_loop_config={**job.payload(), "progress_sink": sink, **self.loop_config_extra()},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo",
                                     timeout_s=int(job.spec.fault.collective_timeout_s)),
            scaling_config=ScalingConfig(**scaling_kwargs(job.spec), use_gpu=use_gpu,
                                         resources_per_worker=resources,
                                         placement_strategy=r.placement.upper()),
            run_config=RunConfig(
                name=f"{job.spec.name}-{(job.run_info.run_id or 'norun')[:8]}",
                storage_path=storage,
                # A failed worker restarts the whole group; it resumes from the last checkpoint.
                failure_config=FailureConfig(max_failures=failure_retries(job.spec)),
                # Ray Train's own INFO lines (worker group start etc.) only when asked for.
                logging_config=LoggingConfig(log_level=os.environ.get("TEMPER_LOG_LEVEL", "WARNING").upper()),
                callbacks=self.train_callbacks(),
            ),
        )

    def loop_config_extra(self) -> dict[str, Any]:
        """More plain data for every worker (`temper tune`'s trials add the metric to report)."""
        return {}

    def train_callbacks(self) -> list[Any]:
        """Ray Train callbacks on the driver side of the trainer (`temper tune` forwards reports)."""
        return []

    def launch(self, job: Job) -> LaunchResult:
        import ray

        self._init_ray(job)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        sink = _progress_sink_class().options(scheduling_strategy=here).remote()  # the driver's node
        self._sink = sink
        if self._run_id is not None:  # created before the actor existed
            sink.set_run_id.remote(self._run_id)
        self._display = ProgressDisplay(title=job.spec.name)
        self._result = LaunchResult(steps=0)
        pump = threading.Thread(target=self._pump, args=(sink,), daemon=True)
        pump.start()
        try:
            self._fit(self._trainer(job, sink), sink, grace_s=job.spec.fault.preemption_grace_s)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # Ray wraps worker errors; surface the root cause
            raise _ray_root_cause(e) from e
        finally:
            self._stop.set()
            pump.join(timeout=5)
            self._consume(ray.get(sink.drain.remote()))
            self._display.close()
            _tag_nodes(job, ray.get(sink.where.remote()))
        return self._result

    @staticmethod
    def _fit(trainer: Any, sink: Any, *, grace_s: float = 0.0) -> None:
        """Run fit() off the main thread, owning Ctrl-C while it runs.

        Ray Train installs its own SIGINT handler when fit() runs on the main thread (it
        aborts the run and exits 1), so fit() runs in a thread and we handle SIGINT: the
        first Ctrl-C asks rank 0, through the sink, to stop at the next logging step, so
        every metric is flushed; a second Ctrl-C or STOP_GRACE_S later we raise
        KeyboardInterrupt and the driver's `stop()` shuts Ray down, killing what is left.
        """
        outcome: dict[str, BaseException] = {}
        deadline: list[float] = []
        preempt_deadline: list[float] = []

        def on_sigterm() -> None:  # fault.preemption_grace_s: save at the next step and exit
            preempt_deadline.append(time.monotonic() + grace_s + PREEMPT_MARGIN_S)
            sink.request_preempt.remote()
            console.print(f"SIGTERM: the workers save at their next step and exit "
                          f"(fault.preemption_grace_s={grace_s:g})...")

        def target() -> None:
            try:
                trainer.fit()
            except BaseException as e:  # handed to the main thread below
                outcome["error"] = e

        def on_sigint(signum: int, frame: Any) -> None:
            if deadline:
                raise KeyboardInterrupt
            deadline.append(time.monotonic() + STOP_GRACE_S)
            sink.request_stop.remote()
            console.print(f"stopping the workers at their next logging step (up to "
                          f"{STOP_GRACE_S:.0f} s; Ctrl-C again to kill them now)...")

        thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            # over ray.init's own SIGTERM handler (it just exits)
            with sigterm_interrupts(on_sigterm if grace_s > 0 else None):
                thread.start()
                while thread.is_alive():
                    thread.join(0.5)
                    if deadline and time.monotonic() > deadline[0]:
                        raise KeyboardInterrupt
                    if preempt_deadline and time.monotonic() > preempt_deadline[0]:
                        raise KeyboardInterrupt("preempted: the workers did not stop within "
                                                "fault.preemption_grace_s")
        finally:
            signal.signal(signal.SIGINT, previous)
        if deadline:
            raise KeyboardInterrupt  # stopped gracefully, but the user asked to stop
        if "error" in outcome:
            raise outcome["error"]

    def _consume(self, events: list[dict]) -> None:
        """Show rank 0's events and fold them into the result (steps, last metrics, curve)."""
        for event in events:
            self._display.update(event)
            self._result.steps = max(self._result.steps, int(event["step"]))
            if "preempted" in event:  # rank 0 saved (or kept the previous checkpoint) and stopped
                self._result.preempted, self._result.checkpoint_step = True, event.get("checkpoint_step")
            metrics = {k: v for k, v in event.items() if "/" in k}
            self._result.metrics.update(metrics)
            if "train/loss" in metrics:
                self._result.loss_history.append((int(event["step"]), metrics["train/loss"]))

    def _pump(self, sink: Any) -> None:
        import ray

        while not self._stop.wait(0.5):
            try:
                self._consume(ray.get(sink.drain.remote(), timeout=5))
            except Exception:  # the display is best effort; training must not care
                return

    def publish_run_id(self, run_id: str) -> None:
        self._run_id = run_id
        if self._sink is not None:
            self._sink.set_run_id.remote(run_id)

    def stop(self) -> None:
        self._stop.set()
        self.close()

    def close(self) -> None:
        """Shut down our Ray connection: kills the job's worker actors on a local Ray, and
        detaches from a remote cluster (its actors owned by this driver end with it)."""
        if self._started_ray:
            import ray

            ray.shutdown()


#: Ray Train's own actors: their tracebacks (a slow cleanup under load, the worker's failure
#: re-logged) would bury the root cause; `--verbose` shows them
RAY_INTERNAL_ACTORS = ("TrainController", "PlacementGroupCleaner")
_TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\)|\s|[\w.]+(Error|Exception|Timeout)\b.*:)")


def quiet_ray_internal_tracebacks() -> None:
    """Drop traceback lines from Ray Train's internal actors on their way to this console
    (every other forwarded line is kept). Uses Ray's log dispatcher, a private API: if it is
    not there, nothing changes."""
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handler, "temper_filtered", False):
                dispatcher.handlers[i] = (name, _filtered(handler))


def _filtered(handler):
    def handle(data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        if who.startswith(RAY_INTERNAL_ACTORS):
            lines = [line for line in data.get("lines", []) if not _TRACEBACK_LINE.match(line)]
            if not lines:
                return
            data = {**data, "lines": lines}
        handler(data)

    handle.temper_filtered = True
    return handle


def use_token_auth_if_available() -> None:
    """Join with token auth when a Ray token is at hand, as `ray start` itself decides.

    Ray 2.5x+ enables token authentication on clusters started where a token exists
    (~/.ray/auth_token, $RAY_AUTH_TOKEN or $RAY_AUTH_TOKEN_PATH), but a driver joining with
    `address=` does not apply that rule and is refused. A token-mode client still joins a
    cluster without authentication, so this is safe either way. An explicit
    $RAY_AUTH_MODE is always respected. The Ray Jobs client (launch/submit/ray_jobs.py) calls
    it too.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def _tag_nodes(job: Job, nodes: dict[int, str]) -> None:
    """Record where each rank ran as the run tag `temper.nodes` ("0=IP/NODE_ID,1=...")."""
    info = job.run_info
    if not nodes or not info.run_id or not info.tracking_uri:
        return
    from temper.tracking.runs import RunHandle, tag_run

    value = ",".join(f"{rank}={nodes[rank]}" for rank in sorted(nodes))
    handle = RunHandle(run_id=info.run_id, experiment_id="", tracking_uri=info.tracking_uri, ui_url=None)
    try:
        tag_run(handle, {"temper.nodes": value})
    except Exception as e:  # noqa: BLE001 - a missing tag must not fail a finished job
        log.warning("could not tag MLflow run %s with temper.nodes (%s)", info.run_id, e)


def _ray_root_cause(error: Exception) -> JobFailedError:
    """The lowest failing rank's own error (run_worker's "rank R: cause"), out of Ray's wrappers."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        cause = _unwrap(failures[rank])
        if isinstance(cause, JobFailedError):
            return cause
        line, tb = root_cause(cause)
        return WorkerFailedError(f"rank {rank}: {line}", traceback=tb)
    cause = _unwrap(error)
    if isinstance(cause, JobFailedError):
        return cause
    lines = [line for line in str(error).splitlines() if line.strip()]
    return JobFailedError(lines[-1] if lines else type(error).__name__)


def _unwrap(error: BaseException) -> BaseException:
    """Through Ray's RayTaskError/TrainingFailedError layers (`.cause`, `__cause__`) to ours."""
    seen = 0
    while seen < 10 and not isinstance(error, JobFailedError):
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException):
            break
        error, seen = inner, seen + 1
    return error
