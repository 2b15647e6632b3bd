"""The KubeRay RayJob (ray.io/v1) and its spec ConfigMap, built from a JobSpec. Pure: no I/O.

    build_rayjob(spec, name=..., namespace=..., run_id=...)  -> the RayJob as a dict
    build_spec_configmap(spec, name=..., namespace=...)      -> ConfigMap `<name>-spec`

The RayJob owns its Ray cluster (rayClusterSpec: one head, one worker group of
`cluster.workers` pods) and runs in K8sJobMode: KubeRay's submitter pod (our template, its
command filled in by the operator) runs `ray job submit` against the head, then follows the
job's logs. The entrypoint runs on the head: it copies the resolved spec from the mounted
ConfigMap into a writable folder and runs `temper run temper-job.yaml [--run-id ID]` there.
Every pod gets the Pod Security "restricted" settings and tolerates missing secrets.
"""

from __future__ import annotations

import math
import re
import secrets
from importlib import metadata
from typing import Any

from temper.errors import TemperError
from temper.launch.submit.base import SPEC_FILE, entrypoint
from temper.spec.job import JobSpec
from temper.spec.loader import spec_to_yaml

API_VERSION = "ray.io/v1"
MANAGED_BY = "temper"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"  # the RayJob's name, on every object and pod
LABEL_COMPONENT = "app.kubernetes.io/component"  # head | worker | submitter | spec
ANNOTATION_RUN_ID = "temper.io/run-id"
ANNOTATION_JOB_NAME = "temper.io/job-name"

SPEC_MOUNT = "/etc/temper"  # read-only ConfigMap mount on head and workers
JOB_DIR = "/tmp/temper-job"  # writable working folder of `temper run` on the head
WORKER_GROUP = "workers"
HEAD_CONTAINER = "ray-head"
MAX_NAME = 47  # KubeRay: a RayJob name <= 53 - 6 characters, a DNS-1035 label
RUN_AS = 1000  # the runtime image's non-root user


def job_name(spec_name: str, *, suffix: str | None = None) -> str:
    """A fresh RayJob name from the spec's name: DNS-1035, <= 47 characters, random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", spec_name.lower()).strip("-")
    if not base or not base[0].isalpha():
        base = f"t-{base}".rstrip("-")
    suffix = suffix or "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(5))
    return f"{base[:MAX_NAME - len(suffix) - 1].rstrip('-')}-{suffix}"


def spec_configmap_name(name: str) -> str:
    return f"{name}-spec"


def cpu_count(quantity: str) -> float:
    """CPUs in a Kubernetes CPU quantity ('500m' -> 0.5, '2' -> 2.0)."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def ray_version() -> str | None:
    """The Ray version installed here (the image is built with the same pin), if any."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return None


def worker_shape(spec: JobSpec) -> tuple[int, str, int]:
    """(pods, cpu quantity, gpus) of the worker group, checked to hold resources.workers."""
    c, r = spec.cluster, spec.resources
    gpus = c.worker.gpus
    if gpus is None:
        if r.gpus_per_worker != int(r.gpus_per_worker):
            raise TemperError(
                f"resources.gpus_per_worker={r.gpus_per_worker} is not a whole number of "
                "nvidia.com/gpu per pod; set cluster.worker.gpus (GPUs per worker pod)")
        gpus = int(r.gpus_per_worker)
    cpu = c.worker.cpu or str(max(1, math.ceil(r.cpus_per_worker)))
    pods = c.workers or r.workers
    per_pod = math.floor(cpu_count(cpu) / r.cpus_per_worker + 1e-9)
    if r.gpus_per_worker:
        per_pod = min(per_pod, math.floor(gpus / r.gpus_per_worker + 1e-9))
    if pods * per_pod < r.workers:
        raise TemperError(
            f"cluster: {pods} worker pod(s) with cpu={cpu}, gpus={gpus} hold {pods * per_pod} "
            f"worker(s) of resources.cpus_per_worker={r.cpus_per_worker}, gpus_per_worker="
            f"{r.gpus_per_worker}, but resources.workers={r.workers}; raise cluster.workers, "
            "cluster.worker.cpu or cluster.worker.gpus")
    return pods, cpu, gpus


def worker_replicas(spec: JobSpec) -> tuple[int, int]:
    """(minReplicas, maxReplicas) of the worker group: fixed at `pods`, or for an elastic job
    (resources.min_workers) as few pods as hold min_workers, up to the full group."""
    pods, cpu, gpus = worker_shape(spec)
    r = spec.resources
    if r.min_workers is None or r.min_workers >= r.workers:
        return pods, pods
    per_pod = max(1, math.ceil(r.workers / pods))  # workers per pod when the group is full
    return min(pods, math.ceil(r.min_workers / per_pod)), pods


#: Seconds a pod gets past fault.preemption_grace_s before the kubelet's SIGKILL: the driver's
#: own margin (launch/ray_launcher.py PREEMPT_MARGIN_S) plus Ray's shutdown and the MLflow close.
TERMINATION_MARGIN_S = 30


def termination_grace_s(spec: JobSpec) -> int | None:
    """terminationGracePeriodSeconds covering the preemption save; None: Kubernetes' default."""
    grace = spec.fault.preemption_grace_s
    return math.ceil(grace) + TERMINATION_MARGIN_S if grace > 0 else None


def job_entrypoint(*, run_id: str | None) -> str:
    """The Ray job's shell command: a writable copy of the mounted spec, then `temper run`."""
    steps = [f"mkdir -p {JOB_DIR}", f"cp {SPEC_MOUNT}/{SPEC_FILE} {JOB_DIR}/{SPEC_FILE}",
             f"cd {JOB_DIR}", entrypoint(spec_file=SPEC_FILE, run_id=run_id)]
    return " && ".join(steps)


def restricted_container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "runAsUser": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_spec(spec: JobSpec, *, name: str, container: dict[str, Any], mount_spec: bool) -> dict[str, Any]:
    c = spec.cluster
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
    }
    if c.service_account:
        pod["serviceAccountName"] = c.service_account
    if c.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in c.image_pull_secrets]
    if c.node_selector:
        pod["nodeSelector"] = dict(c.node_selector)
    if c.tolerations:
        pod["tolerations"] = [_toleration(t) for t in c.tolerations]
    grace = termination_grace_s(spec)
    if grace is not None:  # SIGTERM (eviction, spot reclaim): time to save the checkpoint
        pod["terminationGracePeriodSeconds"] = grace
    if mount_spec:
        pod["volumes"] = [{"name": "temper-job", "configMap": {"name": spec_configmap_name(name)}}]
        container["volumeMounts"] = [{"name": "temper-job", "mountPath": SPEC_MOUNT, "readOnly": True}]
    return pod


def _toleration(t: Any) -> dict[str, Any]:
    out = {"key": t.key, "operator": t.operator, "value": t.value, "effect": t.effect,
           "tolerationSeconds": t.toleration_seconds}
    return {k: v for k, v in out.items() if v is not None}


def _container(spec: JobSpec, *, name: str, cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    c = spec.cluster
    resources = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    container: dict[str, Any] = {
        "name": name, "image": c.image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": restricted_container_security(),
    }
    if c.image_pull_policy:
        container["imagePullPolicy"] = c.image_pull_policy
    if c.env_from_secrets:
        container["envFrom"] = [{"secretRef": {"name": s, "optional": True}} for s in c.env_from_secrets]
    if c.env:
        container["env"] = [{"name": k, "value": v} for k, v in c.env.items()]
    return container


def _template(spec: JobSpec, *, name: str, component: str, container: dict[str, Any],
              mount_spec: bool = True) -> dict[str, Any]:
    return {"metadata": {"labels": pod_labels(spec, name=name, component=component)},
            "spec": _pod_spec(spec, name=name, container=container, mount_spec=mount_spec)}


def pod_labels(spec: JobSpec, *, name: str, component: str) -> dict[str, str]:
    return {**spec.cluster.labels, LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: name,
            LABEL_COMPONENT: component}


def build_cluster_spec(spec: JobSpec, *, name: str) -> dict[str, Any]:
    """rayClusterSpec: a head that holds no training workers (num-cpus 0) and one worker group."""
    c = spec.cluster
    pods, cpu, gpus = worker_shape(spec)
    low, high = worker_replicas(spec)
    head = _container(spec, name=HEAD_CONTAINER, cpu=c.head.cpu, memory=c.head.memory)
    worker = _container(spec, name="ray-worker", cpu=cpu, memory=c.worker.memory, gpus=gpus)
    cluster: dict[str, Any] = {
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0"},
                          "template": _template(spec, name=name, component="head", container=head)},
        "workerGroupSpecs": [{
            "groupName": WORKER_GROUP, "replicas": high, "minReplicas": low, "maxReplicas": high,
            "rayStartParams": {},
            "template": _template(spec, name=name, component="worker", container=worker)}],
    }
    if low < high:  # elastic: the autoscaler adds worker pods as room appears (spot pools)
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"upscalingMode": "Default", "idleTimeoutSeconds": 60}
    version = c.ray_version or ray_version()
    if version:
        cluster["rayVersion"] = version
    return cluster


def build_submitter_template(spec: JobSpec, *, name: str) -> dict[str, Any]:
    """KubeRay's submitter pod, restricted; no command, so the operator fills in `ray job submit`."""
    container = _container(spec, name="ray-job-submitter", cpu="500m", memory="512Mi")
    container["resources"]["limits"] = {"cpu": "1", "memory": "1Gi"}
    container.pop("envFrom", None)  # it only talks to the head's dashboard
    container.pop("env", None)
    template = _template(spec, name=name, component="submitter", container=container, mount_spec=False)
    template["spec"]["restartPolicy"] = "Never"
    return template


def build_rayjob(spec: JobSpec, *, name: str, namespace: str, run_id: str | None) -> dict[str, Any]:
    """The RayJob that runs `spec` on its own Ray cluster (see the module docstring)."""
    c = spec.cluster
    job_spec: dict[str, Any] = {
        "entrypoint": job_entrypoint(run_id=run_id),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": c.shutdown_after_job_finishes,
        "backoffLimit": c.backoff_limit,
        "rayClusterSpec": build_cluster_spec(spec, name=name),
        "submitterPodTemplate": build_submitter_template(spec, name=name),
    }
    if c.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = c.ttl_seconds_after_finished
    if c.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = c.active_deadline_seconds
    annotations = {**c.annotations, ANNOTATION_JOB_NAME: spec.name}
    if run_id:
        annotations[ANNOTATION_RUN_ID] = run_id
    return {
        "apiVersion": API_VERSION, "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {**c.labels, LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: name},
                     "annotations": annotations},
        "spec": job_spec,
    }


def build_spec_configmap(spec: JobSpec, *, name: str, namespace: str,
                         owner_uid: str | None = None) -> dict[str, Any]:
    """ConfigMap `<name>-spec` holding the resolved spec; owned by the RayJob when its uid is
    known (then Kubernetes deletes it with the RayJob)."""
    meta: dict[str, Any] = {
        "name": spec_configmap_name(name), "namespace": namespace,
        "labels": {LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: name, LABEL_COMPONENT: "spec"}}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": "RayJob", "name": name,
                                    "uid": owner_uid}]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
            "data": {SPEC_FILE: spec_to_yaml(spec)}}


def manifest_yaml(*objects: dict[str, Any]) -> str:
    """Kubernetes objects as one multi-document YAML (what `--dry-run -o yaml` prints)."""
    import yaml

    return yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False)

