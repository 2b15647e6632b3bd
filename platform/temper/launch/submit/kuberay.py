"""`temper submit --to k8s[://NAMESPACE]`: a KubeRay RayJob created with the kubernetes client.

    submit  -> (MLflow run, when its server is reachable from here) + RayJob + ConfigMap
               `<job>-spec` (owned by the RayJob, so deleting the RayJob deletes it)
    status  -> RayJob .status.jobDeploymentStatus / .jobStatus mapped onto submit.base.STATES
    logs    -> the submitter pod's log (it follows the Ray job's driver), else the head's
    stop    -> deletes the RayJob (its Ray cluster, pods and ConfigMap go with it)
    list    -> RayJobs labelled app.kubernetes.io/managed-by=temper

Credentials: the kubeconfig ($KUBECONFIG, ~/.kube/config) or, inside a pod, its
ServiceAccount. The namespace is k8s://NAMESPACE, else the kubeconfig context's, else
"default". Needs exactly the temper-submitter Role (docs/cluster.md). The manifest
itself is built by temper.launch.submit.kuberay_manifest (pure, no I/O).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from temper.console import console
from temper.errors import MissingDependencyError, TemperError
from temper.launch.submit import kuberay_manifest as km
from temper.launch.submit.base import JobStatus, Submission, open_submission_run
from temper.spec.job import JobSpec

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TIMEOUT_S = 30
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_NAMESPACE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


def map_state(status: dict[str, Any]) -> tuple[str, str]:
    """(one of submit.base.STATES, message) from a RayJob's .status."""
    deployment = status.get("jobDeploymentStatus") or ""
    job = status.get("jobStatus") or ""
    message = " ".join(x for x in (status.get("reason"), status.get("message")) if x)
    if deployment == "Failed":
        return "FAILED", message or "the RayJob failed"
    if deployment == "Complete":
        return (job if job in ("SUCCEEDED", "FAILED", "STOPPED") else "FAILED"), message
    if deployment in ("Suspended", "Suspending"):
        return "STOPPED", message or f"RayJob {deployment.lower()}"
    if deployment == "Retrying":
        return "PENDING", message or f"retrying on a new Ray cluster (failed {status.get('failed', 0)}x)"
    if job in ("RUNNING", "SUCCEEDED", "FAILED", "STOPPED"):
        return job, message
    return "PENDING", message or (f"RayJob {deployment}" if deployment else "waiting for the operator")


def _unix(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def job_status(obj: dict[str, Any]) -> JobStatus:
    status = obj.get("status") or {}
    state, message = map_state(status)
    meta = obj.get("metadata") or {}
    extra = {k: str(status[k]) for k in ("jobDeploymentStatus", "jobStatus", "rayClusterName",
                                         "dashboardURL", "jobId", "failed", "succeeded") if status.get(k)}
    extra["namespace"] = meta.get("namespace", "")
    if run_id := (meta.get("annotations") or {}).get(km.ANNOTATION_RUN_ID):
        extra["run_id"] = run_id
    info = status.get("rayJobInfo") or {}
    return JobStatus(job_id=meta.get("name", ""), state=state, message=message,
                     start_time=_unix(info.get("startTime") or status.get("startTime")),
                     end_time=_unix(info.get("endTime") or status.get("endTime")), extra=extra)


def checkpoint_warning(spec: JobSpec) -> str | None:
    """Why a retried/resumed RayJob would not find this job's checkpoints, or None."""
    if not spec.checkpoint.enabled:
        return None
    where = spec.checkpoint.dir
    if where and "://" in where and not where.startswith("file://"):
        return None
    return (f"checkpoint.dir is {where or 'unset (temper-runs/<name> in the pod)'}: local to the Ray "
            "head's pod, so checkpoints vanish with the cluster and a retried RayJob "
            "(cluster.backoff_limit) starts over; set checkpoint.dir=s3://BUCKET/PREFIX")


def tracking_reachable(uri: str, *, timeout_s: float = 3.0) -> bool:
    """Whether this machine can open a TCP connection to the tracking server (an in-cluster
    name such as http://temper-mlflow:5000 cannot be resolved from outside)."""
    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


class KubeRayTarget:
    """One namespace of one Kubernetes cluster (the current kubeconfig context)."""

    def __init__(self, *, namespace: str | None = None, address: str = "k8s",
                 kubeconfig: str | None = None, context: str | None = None) -> None:
        self.address = address
        self.kubeconfig, self.context = kubeconfig, context
        self._namespace = namespace
        self._api_client: Any = None

    @classmethod
    def from_address(cls, address: str) -> KubeRayTarget:
        """'k8s' (the kubeconfig context's namespace) or 'k8s://NAMESPACE'."""
        namespace = address[len("k8s://"):].strip("/") if address.startswith("k8s://") else None
        if namespace is not None and (not namespace or len(namespace) > 63
                                      or set(namespace) - _NAMESPACE_CHARS
                                      or namespace[0] == "-" or namespace[-1] == "-"):
            raise TemperError(f"--to {address!r}: {namespace!r} is not a Kubernetes namespace name "
                              "(lowercase letters, digits, '-'); use k8s or k8s://NAMESPACE")
        return cls(namespace=namespace, address=address)

    # ------------------------------------------------------------------ connection

    @property
    def namespace(self) -> str:
        """k8s://NAMESPACE, else the kubeconfig context's namespace, else the pod's, else default.
        Reads files only; contacts nothing."""
        if self._namespace is None:
            self._namespace = self._context_namespace() or "default"
        return self._namespace

    def _config_file(self) -> str:
        """Read $KUBECONFIG now: the kubernetes package reads it once, when first imported."""
        return self.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"

    def _context_namespace(self) -> str | None:
        try:
            from kubernetes import config
        except ImportError:
            return None
        try:
            contexts, active = config.list_kube_config_contexts(config_file=self._config_file())
        except Exception:  # noqa: BLE001 - no kubeconfig: maybe in a pod
            return _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.is_file() else None
        chosen = next((c for c in contexts if c["name"] == self.context), active) if self.context else active
        return (chosen or {}).get("context", {}).get("namespace")

    def _client(self) -> Any:
        if self._api_client is None:
            try:
                from kubernetes import client, config
            except ImportError:
                raise MissingDependencyError("kubernetes", feature="temper submit --to k8s",
                                             extra="k8s") from None
            configuration = client.Configuration()
            try:
                config.load_kube_config(config_file=self._config_file(), context=self.context,
                                        client_configuration=configuration)
            except Exception as kube_error:  # noqa: BLE001 - ConfigException, missing file
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    raise TemperError(
                        f"--to {self.address}: no Kubernetes credentials ({kube_error}); set "
                        "KUBECONFIG or ~/.kube/config (kubectl config current-context), or run "
                        "inside a pod with the temper-submitter ServiceAccount") from None
            configuration.retries = 1
            self._api_client = client.ApiClient(configuration)
        return self._api_client

    def _custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._client())

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._client())

    @contextlib.contextmanager
    def _errors(self, what: str, *, name: str | None = None) -> Iterator[None]:
        """Kubernetes API errors -> one TemperError line with the fix."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            yield
        except ApiException as e:
            raise TemperError(self._explain(e, what=what, name=name)) from None
        except (HTTPError, OSError) as e:
            host = self._client().configuration.host
            raise TemperError(f"{what}: cannot reach the Kubernetes API at {host} ({_reason(e)}); "
                              "check the cluster is up and the kubeconfig context "
                              "(kubectl config current-context)") from None

    def _explain(self, e: Any, *, what: str, name: str | None) -> str:
        ns, host = self.namespace, self._client().configuration.host
        detail = _api_message(e)
        if e.status == 401:
            return (f"{what}: the Kubernetes API at {host} refused the credentials (401 "
                    f"Unauthorized); refresh the kubeconfig's token or certificate")
        if e.status == 403:
            return (f"{what}: forbidden in namespace {ns} (403: {detail}); the user or "
                    "ServiceAccount needs the temper-submitter Role there (docs/cluster.md, RBAC)")
        if e.status == 404 and name:
            return (f"{what}: RayJob {name} not found in namespace {ns}; "
                    f"`temper list --to k8s://{ns}` shows the jobs")
        if e.status == 404 and "namespaces" in detail:
            return f"{what}: namespace {ns} does not exist; create it or use --to k8s://NAMESPACE"
        if e.status == 404:
            return (f"{what}: the API at {host} does not serve ray.io/v1 RayJobs (404); install the "
                    "KubeRay operator first (docs/cluster.md)")
        if e.status == 409:
            return f"{what}: {detail} (409 conflict); submit again (a new name is drawn)"
        if e.status == 422:
            return (f"{what}: the API server rejected the object (422: {detail}); check the "
                    "cluster: section (temper submit --dry-run -o yaml shows what is sent)")
        return f"{what}: the Kubernetes API answered HTTP {e.status} ({detail})"

    def _check_crd(self) -> None:
        """Fail early, with the fix, when the KubeRay operator (its CRDs) is not installed."""
        with self._errors("checking for KubeRay"):
            found = self._custom().get_api_resources(GROUP, VERSION, _request_timeout=TIMEOUT_S)
        if not any(r.name == PLURAL for r in found.resources or []):
            raise TemperError(f"the Kubernetes API at {self._client().configuration.host} serves "
                              "ray.io/v1 without RayJobs; upgrade the KubeRay operator (>= 1.1)")

    # -------------------------------------------------------------------- protocol

    def submit(self, spec: JobSpec, *, workdir: Path, run_id: str | None,
               dry_run: bool = False) -> Submission:
        name = km.job_name(spec.name)
        if dry_run:  # contacts nothing: no MLflow run, no API call
            rayjob = km.build_rayjob(spec, name=name, namespace=self.namespace, run_id=run_id)
            configmap = km.build_spec_configmap(spec, name=name, namespace=self.namespace)
            return Submission(job_id=name, target=self.address, run_id=run_id,
                              manifest=km.manifest_yaml(rayjob, configmap))
        km.worker_shape(spec)  # a spec that cannot fit fails before anything is created
        if warning := checkpoint_warning(spec):
            console.print(f"warning: {warning}", markup=False, style="yellow")
        self._check_crd()
        run_url = None
        if run_id is None:
            run_id, run_url = self._open_run(spec, workdir=workdir)
        rayjob = km.build_rayjob(spec, name=name, namespace=self.namespace, run_id=run_id)
        self._create(spec, rayjob=rayjob, name=name)
        return Submission(job_id=name, target=self.address, run_id=run_id, run_url=run_url)

    def _open_run(self, spec: JobSpec, *, workdir: Path) -> tuple[str | None, str | None]:
        """Create the MLflow run when its server is reachable from here; else (None, None)."""
        if not spec.tracking.enabled:
            return None, None
        from temper.tracking.backend import is_http_uri
        from temper.tracking.runs import resolve_tracking_uri

        uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
        if is_http_uri(uri) and not tracking_reachable(uri):
            console.print(
                f"warning: tracking.uri {uri} is not reachable from here (an in-cluster address?); "
                "the job creates its MLflow run itself, and a retried RayJob resumes the newest "
                "unfinished run in checkpoint.dir", markup=False, style="yellow")
            return None, None
        handle = open_submission_run(spec, workdir=workdir, target=self.address)
        return (handle.run_id, handle.ui_url) if handle else (None, None)

    def _create(self, spec: JobSpec, *, rayjob: dict[str, Any], name: str) -> None:
        """RayJob first, then its ConfigMap owned by it (pods wait for the volume to appear);
        the submitter Role has no update/patch, so the owner is set at creation."""
        with self._errors(f"creating RayJob {name}"):
            created = self._custom().create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, rayjob, _request_timeout=TIMEOUT_S)
        configmap = km.build_spec_configmap(spec, name=name, namespace=self.namespace,
                                            owner_uid=created["metadata"]["uid"])
        try:
            with self._errors(f"creating ConfigMap {km.spec_configmap_name(name)}"):
                self._core().create_namespaced_config_map(self.namespace, configmap,
                                                          _request_timeout=TIMEOUT_S)
        except TemperError:
            with contextlib.suppress(Exception):  # do not leave a job that can never start
                self._custom().delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=TIMEOUT_S)
            raise

    def _get(self, job_id: str) -> dict[str, Any]:
        with self._errors(f"RayJob {job_id}", name=job_id):
            return self._custom().get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, job_id, _request_timeout=TIMEOUT_S)

    def status(self, job_id: str) -> JobStatus:
        return job_status(self._get(job_id))

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        """Lines of the submitter pod's log (the Ray job's driver output, followed by `ray job
        logs --follow`); the head pod's before a submitter exists. follow=True ends when the
        pod's container ends."""
        obj = self._get(job_id)
        pod, container = self._log_pod(job_id)
        if pod is None:
            state, message = map_state(obj.get("status") or {})
            raise TemperError(f"RayJob {job_id} has no pod to read logs from yet ({state}"
                              f"{': ' + message if message else ''}); try again when it runs")
        with self._errors(f"logs of pod {pod}"):
            response = self._core().read_namespaced_pod_log(
                pod, self.namespace, container=container, follow=follow, _preload_content=False,
                _request_timeout=None if follow else TIMEOUT_S)
        return _lines(response)

    def _log_pod(self, job_id: str) -> tuple[str | None, str | None]:
        for component, container in (("submitter", None), ("head", km.HEAD_CONTAINER)):
            selector = f"{km.LABEL_INSTANCE}={job_id},{km.LABEL_COMPONENT}={component}"
            with self._errors(f"pods of RayJob {job_id}"):
                pods = self._core().list_namespaced_pod(self.namespace, label_selector=selector,
                                                        _request_timeout=TIMEOUT_S).items
            if pods:
                newest = max(pods, key=lambda p: p.metadata.creation_timestamp or datetime.min)
                return newest.metadata.name, container
        return None, None

    def stop(self, job_id: str) -> JobStatus:
        """Delete the RayJob (KubeRay's suspend needs update rights the submitter Role does not
        grant); a finished job is left as it is."""
        current = self.status(job_id)
        if current.state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return current
        with self._errors(f"deleting RayJob {job_id}", name=job_id):
            self._custom().delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, job_id, _request_timeout=TIMEOUT_S)
        return JobStatus(job_id=job_id, state="STOPPED", extra=current.extra,
                         start_time=current.start_time,
                         message="RayJob deleted; its Ray cluster, pods and spec ConfigMap go with it")

    def list(self) -> list[JobStatus]:
        selector = f"{km.LABEL_MANAGED_BY}={km.MANAGED_BY}"
        with self._errors(f"listing RayJobs in namespace {self.namespace}"):
            found = self._custom().list_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, label_selector=selector,
                _request_timeout=TIMEOUT_S)
        items = sorted(found.get("items", []),
                       key=lambda o: o.get("metadata", {}).get("creationTimestamp") or "")
        return [job_status(o) for o in items]


def _lines(response: Any) -> Iterator[str]:
    """Text lines of a streamed (urllib3) response, as they arrive."""
    pending = b""
    try:
        for chunk in iter(lambda: response.read1(65536), b""):  # what has arrived, not 64 KiB
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", errors="replace")
        if pending:
            yield pending.decode("utf-8", errors="replace")
    finally:
        response.release_conn()


def _api_message(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or e.reason
    except (TypeError, ValueError, AttributeError):
        return str(e.reason)


def _reason(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e)
    return text.splitlines()[0][:200] if text else type(e).__name__
