"""`temper submit --to k8s` end to end through the kubernetes client, against the stand-in API
server of tests/fixtures/k8s_api.py (no real API server can run here; the stand-in checks
the token, the content type, the RayJob against the KubeRay CRD and the operator's rules) and
a real MLflow server. The test plays the operator: it sets .status and adds pods."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from temper.errors import TemperError
from temper.launch.submit import kuberay_manifest as km
from temper.launch.submit.kuberay import KubeRayTarget
from temper.spec import spec_to_dict, validate_spec
from tests.fixtures.k8s_api import FakeKubeAPI

JOB = {"name": "k8s-e2e", "model": {"kind": "gpt", "flavor": "tiny"}, "resources": {"workers": 2},
       "checkpoint": {"dir": "s3://temper-ckpt/runs"}}


def make_spec(**sections):
    return validate_spec({**JOB, **sections}, source="job.yaml")


@pytest.fixture
def target(k8s_api: FakeKubeAPI, tmp_path: Path, monkeypatch) -> KubeRayTarget:
    """The CLI's path: `--to k8s`, namespace and credentials from $KUBECONFIG's context."""
    monkeypatch.setenv("KUBECONFIG", str(k8s_api.write_kubeconfig(tmp_path / "kubeconfig", namespace="ml")))
    return KubeRayTarget.from_address("k8s")


def submit(target: KubeRayTarget, tmp_path: Path, **sections):
    return target.submit(make_spec(tracking={"enabled": False}, **sections), workdir=tmp_path, run_id=None)


def test_submit_creates_the_rayjob_its_configmap_and_the_mlflow_run(
        target, k8s_api, mlflow_server, tmp_path, capsys) -> None:
    from mlflow import MlflowClient

    spec = make_spec(tracking={"uri": mlflow_server.uri, "experiment": "k8s-submit"})
    sub = target.submit(spec, workdir=tmp_path, run_id=None)
    assert k8s_api.rejections == []
    assert [(r.method, r.path) for r in k8s_api.requests] == [
        ("GET", "/apis/ray.io/v1"), ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs"),
        ("POST", "/api/v1/namespaces/ml/configmaps")]
    rayjob = k8s_api.objects[("rayjobs", "ml", sub.job_id)]
    assert rayjob["spec"]["entrypoint"].endswith(f"temper run temper-job.yaml --run-id {sub.run_id}")
    configmap = k8s_api.objects[("configmaps", "ml", f"{sub.job_id}-spec")]
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == rayjob["metadata"]["uid"]
    shipped = validate_spec(yaml.safe_load(configmap["data"]["temper-job.yaml"]), source="configmap")
    assert spec_to_dict(shipped) == spec_to_dict(spec)
    run = MlflowClient(tracking_uri=mlflow_server.uri).get_run(sub.run_id)
    assert run.info.run_name == "k8s-e2e" and sub.run_url and sub.run_id in sub.run_url
    assert "warning" not in capsys.readouterr().err  # s3:// checkpoints, reachable tracking
    assert target.status(sub.job_id).extra["run_id"] == sub.run_id


def test_unreachable_tracking_server_submits_without_a_run_id(target, k8s_api, tmp_path, capsys) -> None:
    from tests.fixtures.mlflow_server import free_port

    spec = make_spec(tracking={"uri": f"http://127.0.0.1:{free_port()}"}, checkpoint={"dir": "/ckpt"})
    sub = target.submit(spec, workdir=tmp_path, run_id=None)
    assert sub.run_id is None
    assert "--run-id" not in k8s_api.objects[("rayjobs", "ml", sub.job_id)]["spec"]["entrypoint"]
    err = " ".join(capsys.readouterr().err.split())
    assert "is not reachable from here" in err and "set checkpoint.dir=s3://" in err


def test_status_follows_the_operator(target, k8s_api, tmp_path) -> None:
    sub = submit(target, tmp_path)
    assert target.status(sub.job_id).state == "PENDING"
    k8s_api.set_status("ml", sub.job_id, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING",
                                          "rayClusterName": f"{sub.job_id}-x7k2p",
                                          "startTime": "2026-01-02T03:04:05Z"})
    running = target.status(sub.job_id)
    assert (running.state, running.extra["rayClusterName"]) == ("RUNNING", f"{sub.job_id}-x7k2p")
    assert running.start_time == 1767323045.0
    k8s_api.set_status("ml", sub.job_id, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                          "reason": "DeadlineExceeded", "message": "past 3600 s"})
    failed = target.status(sub.job_id)
    assert (failed.state, failed.message) == ("FAILED", "DeadlineExceeded past 3600 s")
    with pytest.raises(TemperError, match="RayJob nope-12345 not found in namespace ml"):
        target.status("nope-12345")


def test_logs_follow_the_submitter_pod_until_it_ends(target, k8s_api, tmp_path) -> None:
    sub = submit(target, tmp_path)
    with pytest.raises(TemperError, match="has no pod to read logs from yet"):
        target.logs(sub.job_id)
    labels = {km.LABEL_INSTANCE: sub.job_id, km.LABEL_MANAGED_BY: "temper"}
    k8s_api.add_pod("ml", f"{sub.job_id}-head-abc", labels={**labels, km.LABEL_COMPONENT: "head"},
                    lines=["head says hi"])
    assert list(target.logs(sub.job_id)) == ["head says hi"]
    pod = k8s_api.add_pod("ml", f"{sub.job_id}-q8r2w", labels={**labels, km.LABEL_COMPONENT: "submitter"},
                          lines=["step 1/2 loss 5.5"])
    lines = target.logs(sub.job_id, follow=True)
    assert next(lines) == "step 1/2 loss 5.5"  # arrives while the pod still runs

    def finish() -> None:
        k8s_api.log(pod, "step 2/2 loss 5.1")
        k8s_api.log(pod, "job succeeded")
        k8s_api.finish_pod(pod)

    threading.Thread(target=finish).start()
    assert list(lines) == ["step 2/2 loss 5.1", "job succeeded"]  # ends with the pod
    log_request = k8s_api.requests_to("GET", f"/pods/{sub.job_id}-q8r2w/log")[-1]
    assert log_request.query["follow"] == ["true"]


def test_stop_deletes_the_rayjob_and_its_configmap(target, k8s_api, tmp_path) -> None:
    sub = submit(target, tmp_path)
    k8s_api.set_status("ml", sub.job_id, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    stopped = target.stop(sub.job_id)
    assert stopped.state == "STOPPED" and "deleted" in stopped.message
    assert not any(name.startswith(sub.job_id) for _, _, name in k8s_api.objects)
    done = submit(target, tmp_path)
    k8s_api.set_status("ml", done.job_id, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    assert target.stop(done.job_id).state == "SUCCEEDED"  # finished: left as it is
    assert ("rayjobs", "ml", done.job_id) in k8s_api.objects


def test_list_shows_only_temper_rayjobs(target, k8s_api, tmp_path) -> None:
    first, second = submit(target, tmp_path), submit(target, tmp_path, name="other-job")
    k8s_api.objects[("rayjobs", "ml", "not-ours")] = {"metadata": {"name": "not-ours", "labels": {}}}
    k8s_api.set_status("ml", second.job_id, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    listed = {s.job_id: s.state for s in target.list()}
    assert listed == {first.job_id: "PENDING", second.job_id: "SUCCEEDED"}
    assert k8s_api.requests_to("GET", "/rayjobs")[-1].query["labelSelector"] == ["app.kubernetes.io/managed-by=temper"]


def test_wrong_token_is_a_clear_error(k8s_api, tmp_path) -> None:
    config = k8s_api.write_kubeconfig(tmp_path / "kubeconfig", token="stale")
    target = KubeRayTarget(address="k8s", kubeconfig=str(config))
    with pytest.raises(TemperError, match=r"refused the credentials \(401 Unauthorized\)"):
        submit(target, tmp_path)
    assert k8s_api.objects == {}


def test_missing_kuberay_operator_is_a_clear_error(tmp_path) -> None:
    api = FakeKubeAPI(serve_rayjobs=False).start()
    try:
        target = KubeRayTarget(address="k8s", kubeconfig=str(api.write_kubeconfig(tmp_path / "kc")))
        with pytest.raises(TemperError, match="install the KubeRay operator first"):
            submit(target, tmp_path)
        with pytest.raises(TemperError, match="install the KubeRay operator first"):
            target.list()
    finally:
        api.stop()


def test_forbidden_configmap_removes_the_rayjob_and_names_the_role(target, k8s_api, tmp_path) -> None:
    k8s_api.forbidden.add(("POST", "configmaps"))
    with pytest.raises(TemperError, match="needs the temper-submitter Role"):
        submit(target, tmp_path)
    assert k8s_api.objects == {}  # the RayJob that could never start was deleted again


def test_missing_namespace_and_unreachable_api(k8s_api, tmp_path) -> None:
    from tests.fixtures.mlflow_server import free_port

    config = k8s_api.write_kubeconfig(tmp_path / "kubeconfig")
    with pytest.raises(TemperError, match="namespace nowhere does not exist"):
        submit(KubeRayTarget(namespace="nowhere", kubeconfig=str(config)), tmp_path)
    closed = tmp_path / "closed"
    closed.write_text(config.read_text().replace(k8s_api.url, f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(TemperError, match="cannot reach the Kubernetes API at http://127.0.0.1"):
        KubeRayTarget(namespace="ml", kubeconfig=str(closed)).list()


def test_dry_run_contacts_nothing(target, k8s_api, tmp_path) -> None:
    sub = target.submit(make_spec(), workdir=tmp_path, run_id=None, dry_run=True)
    assert k8s_api.requests == [] and sub.run_id is None
    assert [doc["kind"] for doc in yaml.safe_load_all(sub.manifest)] == ["RayJob", "ConfigMap"]
