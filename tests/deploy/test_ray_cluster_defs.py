"""`ray_cluster/`: each definition parses, has the kinds, apiVersions and fields its tool needs
(Kubernetes' schemas for pod templates, Ray's own schema for the cluster launcher), and runs the
chart's image with token auth. The local head starts, refuses requests without its token, and
stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from support.deploy import REPO, arg_default, chart_image, dockerfile_commands

from jobs.train.preflight import check_environment
from jobs.train.spec import load_training_spec

DEFS = REPO / "ray_cluster"
KUBERNETES = "1.30"


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((DEFS / name).read_text()) if doc]


def ray_cluster_specs() -> dict[str, dict]:
    (cluster,) = documents("kuberay/raycluster.yaml")
    (_, job) = documents("kuberay/rayjob.yaml")
    return {"raycluster.yaml": cluster["spec"], "rayjob.yaml": job["spec"]["rayClusterSpec"]}


def groups(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_clusters_run_the_chart_image_with_token_auth_and_restricted_pods(name):
    spec = ray_cluster_specs()[name]
    assert spec["rayVersion"] == arg_default(dockerfile_commands(), "RAY_VERSION")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for worker in spec["workerGroupSpecs"]:
        assert worker["groupName"] and worker["minReplicas"] <= worker["replicas"] <= worker["maxReplicas"]
    for group in groups(spec):
        template = group["template"]
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, KUBERNETES, strict=True)
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for container in pod["containers"]:
            assert container["image"] == chart_image()
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert {mounts["/tmp"], mounts["/tmp/ray"], mounts["/dev/shm"]} <= empty_dirs


def test_rayjob_runs_jobs_train_from_the_image_and_cleans_up():
    config_map, job = documents("kuberay/rayjob.yaml")
    assert (config_map["apiVersion"], config_map["kind"]) == ("v1", "ConfigMap")
    kubernetes_validate.validate(config_map, KUBERNETES, strict=True)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m jobs.train --spec /etc/raysft/training.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
    assert "runtimeEnvYAML" not in spec  # the image holds everything; nothing installs at run time
    # The spec is the real contract: valid, resuming (a retried RayJob continues), and it fits the
    # cluster the RayJob asks for.
    training = load_training_spec(yaml.safe_load(config_map["data"]["training.yaml"]))
    assert training.checkpoint.resume == "latest"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    cluster_gpus = sum(w["replicas"] * w["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
                       for w in workers)
    check_environment(training, cluster_gpus=cluster_gpus, installed=lambda module: True)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounted = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["volumes"]}
    assert volumes[mounted["/etc/raysft"]]["configMap"]["name"] == config_map["metadata"]["name"]


def test_vm_cluster_launcher_config_passes_rays_schema():
    config = yaml.safe_load((DEFS / "vm/aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == chart_image()
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_workers = [t for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_workers and all(t["max_workers"] >= t["min_workers"] for t in gpu_workers)
    assert "--gpus all" in config["docker"]["worker_run_options"]
    # Token auth everywhere, the token copied from the operator's machine, the job API not opened.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "ray start" in c)


def test_local_script_starts_the_embedded_defaults_head():
    script = (DEFS / "local.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEFS / "local.sh")]).returncode == 0
    assert "raysft ray-head --env-file" in script
    assert os.access(DEFS / "local.sh", os.X_OK)


@pytest.mark.integration
def test_local_head_uses_token_auth_on_loopback_and_stops_on_sigterm(tmp_path):
    env_file = tmp_path / "ray.env"
    raysft = str(Path(sys.executable).with_name("raysft"))
    process = subprocess.Popen([raysft, "ray-head", "--env-file", str(env_file), "--num-cpus", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (env_file.exists() and env_file.read_text()) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert oct(env_file.stat().st_mode & 0o777) == "0o600"
        assert settings["RAY_ADDRESS"].startswith("http://127.0.0.1:") and settings["RAY_AUTH_MODE"] == "token"
        version = f"{settings['RAY_ADDRESS']}/api/version"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(version, timeout=10)
        assert refused.value.code in (401, 403)
        authorized = urllib.request.Request(version, headers={"Authorization": f"Bearer {settings['RAY_AUTH_TOKEN']}"})
        assert json.loads(urllib.request.urlopen(authorized, timeout=10).read())["ray_version"] == ray.__version__
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert not env_file.exists()  # the token does not outlive the head
    with pytest.raises(OSError):
        urllib.request.urlopen(version, timeout=5)
