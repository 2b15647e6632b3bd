"""Where `temper submit` sends a job: a Ray cluster's Job Submission API, or Kubernetes.

    temper submit JOB.yaml --to http://HEAD:8265   -> RayJobsTarget   (launch/submit/ray_jobs.py)
    temper submit JOB.yaml --to k8s[://NAMESPACE]  -> KubeRayTarget   (launch/submit/kuberay.py)

The shared interface and results are in launch/submit/base.py. TARGETS names each target's
class as "module:Class", imported only when `build_target` picks it, so this package never
imports its implementations (and the kubernetes client or Ray's SDK) before they are used.
"""

from __future__ import annotations

import importlib
import os

from temper.errors import TemperError
from temper.launch.submit.base import SPEC_FILE, STATES, JobStatus, Submission, SubmitTarget

#: `--to` kind -> its SubmitTarget class ("module:Class", imported when picked).
TARGETS: dict[str, str] = {
    "k8s": "temper.launch.submit.kuberay:KubeRayTarget",
    "ray": "temper.launch.submit.ray_jobs:RayJobsTarget",
}


def target_kind(address: str) -> str | None:
    """The TARGETS key for a `--to` address, or None when it is not a cluster address."""
    if address == "k8s" or address.startswith("k8s://"):
        return "k8s"
    if address.startswith(("http://", "https://")):
        return "ray"
    return None


def build_target(address: str | None) -> SubmitTarget:
    """`--to` (else $TEMPER_CLUSTER, else $RAY_ADDRESS when it is an http address)."""
    address = (address or os.environ.get("TEMPER_CLUSTER") or os.environ.get("RAY_ADDRESS") or "").strip()
    if not address:
        raise TemperError("no cluster given: pass --to http://HEAD:8265 (Ray) or --to k8s[://NAMESPACE], "
                          "or set TEMPER_CLUSTER")
    kind = target_kind(address)
    if kind is None:
        raise TemperError(f"--to {address!r} is not a cluster address; accepted: http(s)://HEAD:8265 "
                          "(a Ray dashboard / Jobs API), k8s or k8s://NAMESPACE")
    module, _, name = TARGETS[kind].partition(":")
    return getattr(importlib.import_module(module), name).from_address(address)


__all__ = ["SPEC_FILE", "STATES", "TARGETS", "JobStatus", "Submission", "SubmitTarget", "build_target",
           "target_kind"]
