"""The `cluster:` section: how `temper submit --to k8s` shapes the KubeRay RayJob.

Only `temper submit --to k8s[://NAMESPACE]` reads it (launch/submit/kuberay_manifest.py turns it
into a ray.io/v1 RayJob); `temper run` and `--to http://HEAD:8265` ignore it. Fields left
at null are derived from `resources:` when the manifest is built (one Ray worker pod per
Temper worker, each with the worker's CPUs and GPUs).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

import temper
from temper.spec.base import BaseSpec

#: The runtime image (its recipe: helm/image/Dockerfile); the tag is the package version.
DEFAULT_IMAGE = f"ghcr.io/temper-ml/temper:{temper.__version__}"

#: Secrets users create beforehand (see docs/cluster.md); missing ones are skipped.
DEFAULT_ENV_SECRETS = ("temper-mlflow-auth", "temper-s3")

# A Kubernetes resource quantity as people write them ("500m", "2", "1.5", "8Gi").
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes label/annotation key ([prefix/]name), or None."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"key {key!r}: the prefix before '/' must be a DNS subdomain (lowercase, digits, '-', '.')"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (f"key {key!r}: the name must be 1-63 characters of letters, digits, '-', '_', '.', "
                "starting and ending with a letter or digit")
    return None


def _quantity(value: object) -> object:
    """A number (YAML `cpu: 2`) becomes its text; a string must be a quantity."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        value = f"{value:g}"
    if isinstance(value, str) and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. '2', '500m', '1.5', '8Gi'")
    return value


def _check_names(names: list[str], *, what: str) -> list[str]:
    for name in names:
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise ValueError(f"{what} {name!r} is not a Kubernetes object name; use lowercase "
                             "letters, digits, '-' and '.'")
    return names


class HeadSpec(BaseSpec):
    """The Ray head pod: it runs the job's driver (`temper run`), not the training workers."""

    cpu: str = Field(default="1", description="CPU request and limit (Kubernetes quantity).")
    memory: str = Field(default="4Gi", description="Memory request and limit.")

    _quantities = field_validator("cpu", "memory", mode="before")(_quantity)


class WorkerSpec(BaseSpec):
    """Each Ray worker pod (one Temper worker each by default)."""

    cpu: str | None = Field(
        default=None,
        description="CPU request and limit; null: resources.cpus_per_worker rounded up.")
    memory: str = Field(default="8Gi", description="Memory request and limit.")
    gpus: int | None = Field(
        default=None, ge=0,
        description="nvidia.com/gpu per pod; null: resources.gpus_per_worker (a whole number).")

    _quantities = field_validator("cpu", "memory", mode="before")(_quantity)


class TolerationSpec(BaseSpec):
    """A Kubernetes toleration, set on every pod of the job."""

    key: str | None = Field(default=None, description="Taint key; null with operator Exists: every taint.")
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(default=None, description="Taint value (operator Equal only).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="null: every effect.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="NoExecute only: how long the pod stays after the taint appears.")

    @model_validator(mode="after")
    def _consistent(self) -> TolerationSpec:
        if self.key is not None and (problem := label_key_problem(self.key)):
            raise ValueError(f"toleration {problem}")
        if self.operator == "Exists" and self.value:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value; drop value "
                             "or use operator Equal")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("toleration: operator Equal needs a key; set key, or operator Exists "
                             "to tolerate every taint")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(f"toleration {self.key!r}: toleration_seconds only applies to effect "
                             "NoExecute; set effect=NoExecute or drop toleration_seconds")
        return self


class ClusterSpec(BaseSpec):
    """Kubernetes (KubeRay RayJob) settings for `temper submit --to k8s`; ignored elsewhere."""

    image: str = Field(default=DEFAULT_IMAGE, min_length=1,
                       description="Runtime image of every pod (temper, Ray, Python).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="null: Kubernetes' default for the tag.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry.")
    service_account: str | None = Field(
        default=None,
        description="ServiceAccount the pods run as (they need no Kubernetes API access); "
        "null: the namespace's default. Not the submitter's own account.")
    head: HeadSpec = HeadSpec()
    worker: WorkerSpec = WorkerSpec()
    workers: int | None = Field(
        default=None, ge=1, description="Ray worker pods; null: resources.workers (one pod per worker).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels every pod requires.")
    tolerations: list[TolerationSpec] = Field(default_factory=list, description="Taints every pod tolerates.")
    env_from_secrets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ENV_SECRETS),
        description="Secrets whose keys become environment variables in every pod (optional: a "
        "missing secret is skipped).")
    env: dict[str, str] = Field(default_factory=dict, description="Extra plain environment variables.")
    shutdown_after_job_finishes: bool = Field(
        default=True, description="Delete the Ray cluster when the job ends.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0,
        description="Seconds the finished cluster is kept before deletion (needs shutdown_after_job_finishes).")
    backoff_limit: int = Field(
        default=0, ge=0,
        description="Retries of a failed job, each on a new Ray cluster; a retry resumes the same "
        "MLflow run from checkpoint.dir (use shared storage: s3://).")
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job after this many seconds (null: no limit).")
    ray_version: str | None = Field(
        default=None, pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$",
        description="rayVersion of the cluster; null: the Ray installed here.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on the RayJob and its pods.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra annotations on the RayJob.")

    @field_validator("image_pull_secrets", "env_from_secrets")
    @classmethod
    def _secret_names(cls, names: list[str]) -> list[str]:
        return _check_names(names, what="secret")

    @field_validator("service_account")
    @classmethod
    def _account_name(cls, name: str | None) -> str | None:
        return name if name is None else _check_names([name], what="service_account")[0]

    @field_validator("node_selector", "labels", "annotations")
    @classmethod
    def _keys(cls, mapping: dict[str, str]) -> dict[str, str]:
        for key in mapping:
            if problem := label_key_problem(key):
                raise ValueError(problem)
        return mapping

    @field_validator("labels", "node_selector")
    @classmethod
    def _label_values(cls, mapping: dict[str, str]) -> dict[str, str]:
        for key, value in mapping.items():
            if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
                raise ValueError(f"value {value!r} of {key!r} is not a label value: up to 63 letters, "
                                 "digits, '-', '_', '.', starting and ending with a letter or digit")
        return mapping

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"env {name!r} is not an environment variable name")
        return env

    @model_validator(mode="after")
    def _ttl_needs_shutdown(self) -> ClusterSpec:
        if self.ttl_seconds_after_finished and not self.shutdown_after_job_finishes:
            raise ValueError(
                "ttl_seconds_after_finished needs shutdown_after_job_finishes=true (KubeRay keeps "
                "the cluster forever otherwise); set cluster.shutdown_after_job_finishes=true or "
                "drop cluster.ttl_seconds_after_finished")
        return self
