"""The KubeRay RayJob that `temper submit --to k8s` builds: validated against the KubeRay CRD
(../shared/kuberay-crds, unknown fields rejected) and the operator's own cross-field rules
(tests/fixtures/k8s_api.py), for several specs; the `cluster:` section's validation; state
mapping; dry run. The kubernetes-client path: tests/integration/test_kuberay_api.py."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from temper.errors import SpecError, TemperError
from temper.launch.submit import kuberay_manifest as km
from temper.launch.submit.kuberay import KubeRayTarget, checkpoint_warning, map_state
from temper.spec import spec_to_dict, validate_spec
from tests.fixtures.k8s_api import CRDS, rayjob_problems, schema_problems

BASE = {"name": "k8s-job", "model": {"kind": "gpt", "flavor": "tiny"}}


def make_spec(**sections):
    return validate_spec({**BASE, **sections}, source="job.yaml")


def rayjob(spec, *, run_id: str | None = "0123abcd"):
    return km.build_rayjob(spec, name=km.job_name(spec.name), namespace="ml", run_id=run_id)


def pods(job: dict) -> dict:
    cluster = job["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"]["template"],
            "worker": cluster["workerGroupSpecs"][0]["template"],
            "submitter": job["spec"]["submitterPodTemplate"]}


SPECS = {
    "cpu": {"resources": {"workers": 2, "cpus_per_worker": 2}},
    "gpus": {"train": {"device": "cuda"}, "resources": {"workers": 4, "gpus_per_worker": 1},
             "cluster": {"workers": 2, "worker": {"gpus": 2, "cpu": "8", "memory": "64Gi"},
                         "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                         "tolerations": [
                             {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                             {"key": "spot", "value": "true", "effect": "NoExecute",
                              "toleration_seconds": 60}]}},
    "secrets": {"cluster": {"env_from_secrets": ["team-mlflow", "team-s3"], "env": {"NCCL_DEBUG": "WARN"},
                            "image": "registry.example.com/temper:dev", "image_pull_policy": "Always",
                            "image_pull_secrets": ["regcred"], "service_account": "trainer",
                            "labels": {"team": "vision"}, "annotations": {"owner": "me@example.com"}}},
    "deadlines": {"cluster": {"ttl_seconds_after_finished": 600, "active_deadline_seconds": 3600,
                              "backoff_limit": 3}},
    "keep-cluster": {"cluster": {"shutdown_after_job_finishes": False, "ray_version": "2.60.0"}},
    "elastic-spot": {"resources": {"workers": 4, "min_workers": 2}, "train": {"grad_accum": 3},
                     "fault": {"preemption_grace_s": 90},
                     "cluster": {"node_selector": {"cloud.google.com/gke-spot": "true"},
                                 "tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                                  "value": "true", "effect": "NoSchedule"}]}},
}


def test_the_crds_are_there() -> None:
    assert (CRDS / "ray.io_rayjobs.yaml").is_file(), f"{CRDS}: ../shared/kuberay-crds must sit beside the repo"


@pytest.mark.parametrize("case", sorted(SPECS))
def test_generated_rayjobs_pass_the_crd_schema_and_the_operator_rules(case: str) -> None:
    job = rayjob(make_spec(**SPECS[case]))
    assert schema_problems(job) == []
    assert rayjob_problems(job) == []
    configmap = km.build_spec_configmap(make_spec(**SPECS[case]), name=job["metadata"]["name"], namespace="ml")
    assert configmap["metadata"]["name"] == f"{job['metadata']['name']}-spec"


def test_cpu_job_one_worker_pod_per_worker_and_a_head_that_runs_no_workers() -> None:
    job = rayjob(make_spec(**SPECS["cpu"]))
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert job["spec"]["submissionMode"] == "K8sJobMode"
    assert job["spec"]["shutdownAfterJobFinishes"] is True and "ttlSecondsAfterFinished" not in job["spec"]
    assert cluster["rayVersion"] == km.ray_version()


def test_gpu_job_node_selector_and_tolerations_on_every_pod() -> None:
    job = rayjob(make_spec(**SPECS["gpus"]))
    worker = pods(job)["worker"]["spec"]
    assert worker["containers"][0]["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2}
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    for template in pods(job).values():
        assert template["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert template["spec"]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
             "tolerationSeconds": 60}]
    head = pods(job)["head"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_env_from_optional_secrets_image_and_account() -> None:
    job = rayjob(make_spec(**SPECS["secrets"]))
    for role in ("head", "worker"):
        spec = pods(job)[role]["spec"]
        container = spec["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "team-mlflow", "optional": True}},
                                        {"secretRef": {"name": "team-s3", "optional": True}}]
        assert container["env"] == [{"name": "NCCL_DEBUG", "value": "WARN"}]
        assert (container["image"], container["imagePullPolicy"]) == ("registry.example.com/temper:dev", "Always")
        assert spec["serviceAccountName"] == "trainer" and spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert pods(job)[role]["metadata"]["labels"]["team"] == "vision"
    submitter = pods(job)["submitter"]["spec"]
    assert "envFrom" not in submitter["containers"][0] and "command" not in submitter["containers"][0]
    assert job["metadata"]["annotations"]["owner"] == "me@example.com"
    default = rayjob(make_spec())
    assert [e["secretRef"]["name"] for e in pods(default)["head"]["spec"]["containers"][0]["envFrom"]] == \
        ["temper-mlflow-auth", "temper-s3"]


def test_deadlines_and_retries() -> None:
    spec = rayjob(make_spec(**SPECS["deadlines"]))["spec"]
    assert (spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"], spec["backoffLimit"]) == (600, 3600, 3)
    kept = rayjob(make_spec(**SPECS["keep-cluster"]))
    assert kept["spec"]["shutdownAfterJobFinishes"] is False
    assert kept["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_every_pod_has_the_restricted_security_settings() -> None:
    for name, template in pods(rayjob(make_spec())).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        sc = spec["containers"][0]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["runAsUser"] == 1000, name
    assert pods(rayjob(make_spec()))["submitter"]["spec"]["restartPolicy"] == "Never"


def test_entrypoint_runs_the_mounted_spec_with_the_run_id() -> None:
    job = rayjob(make_spec(), run_id="feedbeef")
    command = job["spec"]["entrypoint"]
    assert command.endswith("cd /tmp/temper-job && temper run temper-job.yaml --run-id feedbeef")
    assert f"cp {km.SPEC_MOUNT}/temper-job.yaml" in command
    assert job["metadata"]["annotations"][km.ANNOTATION_RUN_ID] == "feedbeef"
    assert "--run-id" not in rayjob(make_spec(), run_id=None)["spec"]["entrypoint"]
    for role in ("head", "worker"):
        template = pods(job)[role]["spec"]
        assert template["volumes"][0]["configMap"]["name"] == f"{job['metadata']['name']}-spec"
        assert template["containers"][0]["volumeMounts"][0]["mountPath"] == km.SPEC_MOUNT


def test_the_configmap_holds_the_resolved_spec_and_its_owner() -> None:
    spec = make_spec(**SPECS["gpus"])
    cm = km.build_spec_configmap(spec, name="k8s-job-abcde", namespace="ml", owner_uid="uid-1")
    shipped = validate_spec(yaml.safe_load(cm["data"]["temper-job.yaml"]), source="cm")
    assert spec_to_dict(shipped) == spec_to_dict(spec)
    assert cm["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "k8s-job-abcde", "uid": "uid-1"}]


def test_unknown_fields_and_broken_rules_are_caught() -> None:
    """The checks can fail: each mutation below is one the real API server or operator rejects."""
    good = rayjob(make_spec())
    typo = copy.deepcopy(good)
    typo["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in p for p in schema_problems(typo))
    nested = copy.deepcopy(good)
    nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert schema_problems(nested)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["backoffLimit"] = "3"
    assert schema_problems(wrong_type)
    for path, value, words in [
        (("spec", "shutdownAfterJobFinishes"), False, None),  # fine alone
        (("spec", "ttlSecondsAfterFinished"), -1, "ttlSecondsAfterFinished must be >= 0"),
        (("spec", "activeDeadlineSeconds"), 0, "activeDeadlineSeconds must be > 0"),
        (("spec", "submissionMode"), "K8sMode", "not a KubeRay mode"),
        (("metadata", "name"), "9-starts-with-a-digit", "DNS-1035"),
    ]:
        bad = copy.deepcopy(good)
        bad[path[0]][path[1]] = value
        problems = rayjob_problems(bad)
        assert (problems == []) if words is None else any(words in p for p in problems), (path, problems)
    ttl_no_shutdown = copy.deepcopy(good)
    ttl_no_shutdown["spec"].update(shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=60)
    assert any("needs shutdownAfterJobFinishes" in p for p in rayjob_problems(ttl_no_shutdown))
    root = copy.deepcopy(good)
    del root["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["securityContext"]["capabilities"]
    root["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = "Always"
    assert len(rayjob_problems(root)) == 2
    no_cluster = copy.deepcopy(good)
    del no_cluster["spec"]["rayClusterSpec"]
    assert any("rayClusterSpec or clusterSelector" in p for p in rayjob_problems(no_cluster))


@pytest.mark.parametrize(("cluster", "words"), [
    ({"ttl_seconds_after_finished": 60, "shutdown_after_job_finishes": False},
     "set cluster.shutdown_after_job_finishes=true"),
    ({"tolerations": [{"key": "a", "operator": "Exists", "value": "x"}]}, "cluster.tolerations.0: toleration 'a'"),
    ({"tolerations": [{"value": "x"}]}, "operator Equal needs a key"),
    ({"tolerations": [{"key": "a", "effect": "NoSchedule", "toleration_seconds": 5}]}, "effect=NoExecute"),
    ({"labels": {"bad key!": "x"}}, "cluster.labels: key 'bad key!'"),
    ({"node_selector": {"zone": "has space"}}, "is not a label value"),
    ({"env_from_secrets": ["Not_A_Name"]}, "cluster.env_from_secrets: secret 'Not_A_Name'"),
    ({"head": {"memory": "8GB"}}, "cluster.head.memory: '8GB' is not a Kubernetes quantity"),
    ({"active_deadline_seconds": 0}, "cluster.active_deadline_seconds"),
    ({"backoff_limit": -1}, "cluster.backoff_limit"),
    ({"workerz": 2}, "cluster.workerz: unknown key"),
])
def test_cluster_section_errors_name_the_field_and_the_fix(cluster: dict, words: str) -> None:
    with pytest.raises(SpecError) as e:
        make_spec(cluster=cluster)
    assert words in str(e.value)


def test_worker_shapes_that_cannot_hold_the_workers_are_refused() -> None:
    with pytest.raises(TemperError, match=r"resources.workers=4; raise cluster.workers"):
        rayjob(make_spec(resources={"workers": 4, "gpus_per_worker": 1}, cluster={"workers": 2}))
    with pytest.raises(TemperError, match="not a whole number of nvidia.com/gpu per pod; set cluster.worker.gpus"):
        rayjob(make_spec(resources={"gpus_per_worker": 0.5}))
    fractional = rayjob(make_spec(resources={"workers": 2, "gpus_per_worker": 0.5},
                                  cluster={"workers": 1, "worker": {"gpus": 1, "cpu": "2"}}))
    assert fractional["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1


@pytest.mark.parametrize("name", ["k8s-job", "My_Job.v2", "7b-finetune", "x" * 100, "---"])
def test_job_names_are_dns1035_and_short_enough(name: str) -> None:
    got = km.job_name(name)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", got) and len(got) <= 47, got
    assert km.job_name(name) != got  # a fresh suffix each time


@pytest.mark.parametrize(("status", "state"), [
    ({}, "PENDING"),
    ({"jobDeploymentStatus": "Initializing"}, "PENDING"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, "PENDING"),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, "RUNNING"),
    ({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1}, "PENDING"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, "SUCCEEDED"),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, "STOPPED"),
    ({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"}, "FAILED"),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, "FAILED"),
    ({"jobDeploymentStatus": "Suspended"}, "STOPPED"),
])
def test_rayjob_states_map_onto_the_shared_states(status: dict, state: str) -> None:
    assert map_state(status)[0] == state


def test_checkpoint_dir_warning_only_for_pod_local_storage() -> None:
    assert "set checkpoint.dir=s3://" in checkpoint_warning(make_spec())
    assert "set checkpoint.dir=s3://" in checkpoint_warning(make_spec(checkpoint={"dir": "/data/ckpt"}))
    assert checkpoint_warning(make_spec(checkpoint={"dir": "s3://bucket/runs"})) is None


def test_dry_run_returns_the_yaml_and_contacts_nothing(tmp_path: Path, monkeypatch) -> None:
    config = tmp_path / "kubeconfig"  # a server nobody listens on: any request would fail
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(config))
    target = KubeRayTarget.from_address("k8s")
    spec = make_spec(tracking={"uri": "http://127.0.0.1:9"})
    sub = target.submit(spec, workdir=tmp_path, run_id=None, dry_run=True)
    rayjob_doc, configmap = yaml.safe_load_all(sub.manifest)
    assert rayjob_doc["metadata"] == {**rayjob_doc["metadata"], "name": sub.job_id, "namespace": "team-a"}
    assert configmap["kind"] == "ConfigMap" and schema_problems(rayjob_doc) == []
    assert sub.run_id is None and target._api_client is None
    assert KubeRayTarget.from_address("k8s://other").namespace == "other"


@pytest.mark.parametrize("address", ["k8s://", "k8s://Bad_NS", "k8s://-x"])
def test_bad_namespaces_in_the_address(address: str) -> None:
    with pytest.raises(TemperError, match="is not a Kubernetes namespace name"):
        KubeRayTarget.from_address(address)


def test_an_elastic_job_autoscales_its_worker_group_and_pods_get_the_grace_time() -> None:
    """resources.min_workers: minReplicas holds min_workers, maxReplicas all of them, with the
    in-tree autoscaler; every pod's terminationGracePeriodSeconds covers preemption_grace_s."""
    job = rayjob(make_spec(**SPECS["elastic-spot"]))
    cluster = job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 4, 4)
    assert cluster["enableInTreeAutoscaling"] is True
    assert all(pod["spec"]["terminationGracePeriodSeconds"] == 90 + km.TERMINATION_MARGIN_S
               for pod in pods(job).values())
    fixed = rayjob(make_spec(**SPECS["cpu"]))["spec"]["rayClusterSpec"]
    assert "enableInTreeAutoscaling" not in fixed
    assert fixed["workerGroupSpecs"][0]["minReplicas"] == fixed["workerGroupSpecs"][0]["maxReplicas"] == 2
    off = rayjob(make_spec(fault={"preemption_grace_s": 0}))
    assert all("terminationGracePeriodSeconds" not in pod["spec"] for pod in pods(off).values())
