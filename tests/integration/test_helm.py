"""The Helm chart (helm/temper), rendered by a real helm and validated object by object.

No API server runs here: core kinds are checked through the kubernetes client's models (a
round trip that must give back exactly what was rendered, so unknown fields and wrong types
fail), the RayCluster against KubeRay's CRD schema (../shared/kuberay-crds) made strict.
"""

from __future__ import annotations

import base64
import copy
import re
import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import tomllib
import yaml

from tests.fixtures.k8s_api import forbid_unknown as strict

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "temper"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CASES = {"defaults": [], **{p.stem: [p] for p in sorted((CHART / "ci").glob("*.yaml"))}}
CORE_KINDS = {"Deployment", "StatefulSet", "Service", "Secret", "ServiceAccount", "Role",
              "RoleBinding", "NetworkPolicy", "ConfigMap"}
# Distinctive fake secrets written into helm/temper/ci values: never outside a Secret's data.
FAKE_SECRETS = {"bundled-postgres-values": ["fake-pg-Pa55word-7f3c9e21"]}
SUBMITTER_RULES = {  # docs: common decision, exactly what `temper submit --to k8s` needs
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "delete"},
    ("ray.io", "rayclusters"): {"get", "list", "watch"},
    ("", "pods"): {"get", "list", "watch"}, ("", "pods/log"): {"get", "list", "watch"},
    ("", "services"): {"get", "list"}, ("", "configmaps"): {"get", "create", "delete"},
    ("", "events"): {"list"},
}


def helm(helm_bin: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_bin["helm"], *args], capture_output=True, text=True,
                          env=helm_bin["env"], timeout=120)


def template(helm_bin: dict, *args: str) -> subprocess.CompletedProcess:
    return helm(helm_bin, "template", "temper", str(CHART), "--namespace", "ml", *args)


def values_args(files: list[Path]) -> list[str]:
    return [arg for f in files for arg in ("-f", str(f))]


@pytest.fixture(scope="module")
def rendered(helm_bin) -> dict[str, list[dict]]:
    out = {}
    for name, files in CASES.items():
        proc = template(helm_bin, *values_args(files))
        assert proc.returncode == 0, f"helm template ({name}) failed: {proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


# --- validation helpers -------------------------------------------------------------------

def check_k8s_model(obj: dict, model: str) -> None:
    """Deserialize into the kubernetes client's model and back: must give `obj` unchanged."""
    from kubernetes.client import ApiClient

    client = ApiClient()
    back = client.sanitize_for_serialization(client._ApiClient__deserialize(obj, model))
    if back != obj:
        raise ValueError(f"{model} round trip changed the object (unknown field or wrong type)"
                         f": {first_difference(obj, back)}")


def first_difference(a, b, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                return first_difference(a.get(key, "<absent>"), b.get(key, "<absent>"),
                                        f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path or '.'}: rendered {a!r}, model gives {b!r}"


@cache
def raycluster_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / "ray.io_rayclusters.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))


def check_raycluster(obj: dict) -> None:
    errors = sorted(raycluster_validator().iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise ValueError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    spec = obj["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        check_k8s_model(group["template"], "V1PodTemplateSpec")


def check_object(obj: dict) -> None:
    if obj["kind"] == "RayCluster":
        assert obj["apiVersion"] == "ray.io/v1"
        check_raycluster(obj)
    else:
        assert obj["kind"] in CORE_KINDS, f"no validator for kind {obj['kind']}"
        check_k8s_model(obj, f"V1{obj['kind']}")


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    pods = {}
    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet"):
            pods[name] = d["spec"]["template"]
        elif d["kind"] == "RayCluster":
            pods[f"{name}/head"] = d["spec"]["headGroupSpec"]["template"]
            for group in d["spec"]["workerGroupSpecs"]:
                pods[f"{name}/{group['groupName']}"] = group["template"]
    return pods


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector not handled here: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- tests --------------------------------------------------------------------------------

def test_helm_is_v3_or_v4(helm_bin):
    assert re.match(r"v[34]\.\d+\.\d+", helm_bin["version"])


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(helm_bin, case):
    proc = helm(helm_bin, "lint", "--strict", str(CHART), *values_args(CASES[case]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid(rendered, case):
    docs = rendered[case]
    for obj in docs:
        check_object(obj)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "RayCluster", "ServiceAccount", "Role",
            "RoleBinding"} <= kinds
    assert ("NetworkPolicy" in kinds) == (case != "no-networkpolicy-values")


def test_validators_reject_unknown_fields_and_wrong_types(rendered):
    docs = rendered["defaults"]
    deployment = copy.deepcopy(one(docs, "Deployment", "temper-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        check_object(deployment)
    deployment = copy.deepcopy(one(docs, "Deployment", "temper-mlflow"))
    deployment["spec"]["replicas"] = "1"
    with pytest.raises(ValueError, match="replicas"):
        check_object(deployment)
    for mutate in (lambda s: s["workerGroupSpecs"][0].update(maxReplica=3),
                   lambda s: s["workerGroupSpecs"][0].update(minReplicas="0"),
                   lambda s: s["headGroupSpec"]["template"]["spec"].update(hostnetwork=True)):
        cluster = copy.deepcopy(one(docs, "RayCluster", "temper-ray"))
        mutate(cluster["spec"])
        with pytest.raises(ValueError):
            check_object(cluster)


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_pod_security_restricted(rendered, case):
    pods = pod_specs(rendered[case])
    assert len(pods) >= 3
    for name, template in pods.items():
        spec = template["spec"]
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, name
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod_ctx.get("runAsUser", 1) != 0, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        containers = spec["containers"] + spec.get("initContainers", [])
        for c in containers:
            ctx = c["securityContext"]
            where = f"{name} container {c['name']}"
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["runAsNonRoot"] is True and ctx.get("runAsUser", 1) != 0, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert not ctx.get("privileged"), where
    for cluster in of_kind(rendered[case], "RayCluster"):
        if cluster["spec"]["enableInTreeAutoscaling"]:  # KubeRay's injected autoscaler sidecar
            ctx = cluster["spec"]["autoscalerOptions"]["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["runAsNonRoot"] is True
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_auth_case_has_an_init_container(rendered):
    pods = pod_specs(rendered["external-postgres-s3-auth-values"])
    assert pods["Deployment/temper-mlflow"]["spec"]["initContainers"]  # covered above


@pytest.mark.parametrize("case", CASES)
def test_secrets_only_by_reference(rendered, case):
    docs = rendered[case]
    secrets = list(FAKE_SECRETS.get(case, []))
    for value in secrets:  # the ci file really holds it, so the check below can fail
        assert value in (CHART / "ci" / f"{case}.yaml").read_text()
    for secret in of_kind(docs, "Secret"):
        secrets += [base64.b64decode(v).decode() for v in secret.get("data", {}).values()]
        secrets += list(secret.get("stringData", {}).values())
    forms = {f for s in secrets for f in (s, base64.b64encode(s.encode()).decode())}
    for obj in docs:
        stripped = {k: v for k, v in obj.items() if obj["kind"] != "Secret"
                    or k not in ("data", "stringData")}
        text = yaml.safe_dump(stripped)
        leaked = [f for f in forms if f in text]
        assert not leaked, f"{obj['kind']}/{obj['metadata']['name']} holds a secret value"
    for name, template in pod_specs(docs).items():
        spec = template["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            for env in c.get("env", []):
                if re.search(r"PASSWORD|SECRET|ACCESS_KEY", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']}"
                if "value" in env:  # a URI with credentials would be user:password@host
                    assert not re.search(r"://[^/@]+:[^/@]+@", env["value"]), env
            assert not any("PASSWORD" in a.upper() for a in c.get("args", []) + c.get("command", []))


def test_chart_created_postgres_secret_holds_the_values_password(rendered):
    docs = rendered["bundled-postgres-values"]
    secret = one(docs, "Secret", "temper-postgres-password")
    password = base64.b64decode(secret["data"]["password"]).decode()
    assert password == FAKE_SECRETS["bundled-postgres-values"][0]
    generated = one(rendered["defaults"], "Secret", "temper-postgres-password")
    assert len(base64.b64decode(generated["data"]["password"])) == 32


@pytest.mark.parametrize(("args", "field"), [
    (["--set", "ray.gpuWorkers.replicas=-1"], "/ray/gpuWorkers/replicas"),
    (["--set", "mlflow.bogus=1"], "bogus"),
    (["--set", "mlflow.port=abc"], "/mlflow/port"),
    (["--set-string", "ray.gpuWorkers.maxReplicas=3"], "/ray/gpuWorkers/maxReplicas"),
    (["--set", "mlflow.backendStore.type=sqlite"], "/mlflow/backendStore/type"),
    (["--set", "mlflow.artifacts.destination=/data/mlruns"], "/mlflow/artifacts/destination"),
    (["--set", "ray.gpuWorkers.replicas=9"], "ray.gpuWorkers: need minReplicas <= replicas"),
])
def test_bad_values_are_rejected_naming_the_field(helm_bin, args, field):
    proc = template(helm_bin, *args)
    assert proc.returncode != 0
    assert field in proc.stderr, proc.stderr


def test_network_policies_select_the_right_pods_and_ports(rendered):
    docs = rendered["defaults"]
    pods = pod_specs(docs)
    labels = {name: t["metadata"]["labels"] for name, t in pods.items()}
    ray_pods = {n for n in pods if n.startswith("RayCluster/")}
    mlflow, postgres = "Deployment/temper-mlflow", "StatefulSet/temper-postgres"

    def policy(name):
        spec = one(docs, "NetworkPolicy", name)["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert all(rule.get("from") for rule in spec["ingress"])  # no rule open to everyone
        return spec, {n for n in pods if selects(spec["podSelector"], labels[n])}

    ray, selected = policy("temper-ray")
    assert selected == ray_pods
    assert selected and ray["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}}
    between_ray, namespace, operator = ray["ingress"]
    assert between_ray == {"from": [{"podSelector": ray["podSelector"]}]}  # any port
    assert namespace["from"] == [{"podSelector": {}}]  # same namespace only
    assert {p["port"] for p in namespace["ports"]} == {8265, 6379, 10001}
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ray-system"}}}]
    assert [p["port"] for p in operator["ports"]] == [8265]
    spec, selected = policy("temper-mlflow")
    assert selected == {mlflow}
    assert spec["ingress"] == [{"from": [{"podSelector": {}}],
                                "ports": [{"port": 5000, "protocol": "TCP"}]}]
    spec, selected = policy("temper-postgres")
    assert selected == {postgres}
    (rule,) = spec["ingress"]
    assert [p["port"] for p in rule["ports"]] == [5432]
    (peer,) = rule["from"]
    assert {n for n in pods if selects(peer["podSelector"], labels[n])} == {mlflow}
    service = one(docs, "Service", "temper-mlflow")["spec"]
    assert {n for n in pods if selects({"matchLabels": service["selector"]}, labels[n])} == {mlflow}


def test_submitter_role_has_exactly_the_agreed_rules(rendered):
    docs = rendered["defaults"]
    role = one(docs, "Role", "temper-submitter")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == SUBMITTER_RULES
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    binding = one(docs, "RoleBinding", "temper-submitter")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "temper-submitter"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "temper-submitter",
                                    "namespace": "ml"}]


def test_defaults_follow_the_shared_names_and_versions(rendered):
    docs = rendered["defaults"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == pyproject["project"]["version"]
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / ".ci/constraints.txt").read_text(), re.M)[1]
    cluster = one(docs, "RayCluster", "temper-ray")  # -> head Service temper-ray-head-svc
    assert cluster["spec"]["rayVersion"] == ray_pin
    assert one(docs, "Service", "temper-mlflow")["spec"]["ports"][0]["port"] == 5000
    for name, template in pod_specs(docs).items():
        if not name.startswith("StatefulSet/"):
            image = template["spec"]["containers"][0]["image"]
            assert image == f"ghcr.io/temper-ml/temper:{pyproject['project']['version']}"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://temper-mlflow:5000"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "temper-s3"
    args = one(docs, "Deployment", "temper-mlflow")["spec"]["template"]["spec"]
    command = args["containers"][0]["command"]
    assert "--serve-artifacts" in command and "--app-name=basic-auth" not in command


def test_external_postgres_s3_and_basic_auth(rendered):
    docs = rendered["external-postgres-s3-auth-values"]
    assert not of_kind(docs, "StatefulSet")
    pod = one(docs, "Deployment", "temper-mlflow")["spec"]["template"]["spec"]
    (mlflow,) = pod["containers"]
    assert "--artifacts-destination=s3://ml-artifacts/temper" in mlflow["command"]
    assert "--app-name=basic-auth" in mlflow["command"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in mlflow["env"] if "valueFrom" in e}
    assert refs["MLFLOW_BACKEND_STORE_URI"] == {"name": "prod-mlflow-db", "key": "uri"}
    assert refs["AWS_ACCESS_KEY_ID"]["name"] == "prod-s3"
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == {"name": "prod-mlflow-auth",
                                                  "key": "MLFLOW_TRACKING_PASSWORD"}
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"]["name"] == "temper-mlflow-flask"
    init_env = {e["name"]: e for e in pod["initContainers"][0]["env"]}
    assert init_env["AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "prod-mlflow-auth-db"
    hosts = {e["name"]: e.get("value") for e in mlflow["env"]}["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert {"temper-mlflow:5000", "mlflow.example.com"} <= set(hosts.split(","))


def test_autoscaling_gpu_workers(rendered):
    docs = rendered["autoscaling-gpu-values"]
    spec = one(docs, "RayCluster", "temper-ray")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["upscalingMode"] == "Conservative"
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (1, 2, 8)
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    assert pod["containers"][0]["image"].endswith(":0.1.0-cu124")


def test_dockerfile_references_what_the_repo_has():
    """No docker on CI: check the recipe's promises and that what it copies exists."""
    dockerfile = (ROOT / "helm/image/Dockerfile").read_text()
    lines = [ln for ln in dockerfile.splitlines() if ln and not ln.startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repo lacks"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "-c .ci/constraints.txt '.[s3,k8s]'" in dockerfile
    assert "--uid 1000" in dockerfile and "USER 1000:1000" in lines
    assert "WORKDIR /home/temper" in lines and not any("ENTRYPOINT" in ln for ln in lines)
    ignore = (ROOT / "helm/image/Dockerfile.dockerignore").read_text().splitlines()
    for sources in copies:
        for src in sources:
            assert f"!{src.rstrip('/')}" in ignore or f"!{src}/" in ignore, src
