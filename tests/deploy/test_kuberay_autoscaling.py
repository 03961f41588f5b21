"""The RayCluster the chart renders, read by Ray's own KubeRay code: the autoscaler's config
derivation (`ray.autoscaler._private.kuberay.autoscaling_config`), the code that decides how many
workers of which shape KubeRay starts. No Kubernetes API server can be had here, so this is as
close as the chart gets to a running cluster: what Ray derives must be what the values asked for."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from support.deploy import CHART, render

CREATING = [None, *(p for p in sorted((CHART / "ci").glob("*.yaml")) if yaml.safe_load(p.read_text())
                    .get("ray", {}).get("create", True))]
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def merged_values(path) -> dict:
    """values.yaml overlaid with a values file, as Helm merges them (mappings merge, lists replace)."""
    def merge(base: dict, over: dict) -> dict:
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return merge(values, yaml.safe_load(path.read_text())) if path else values


def quantity_bytes(quantity: str) -> int:
    for suffix, factor in UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[:-len(suffix)]) * factor)
    return int(quantity)


@pytest.fixture(scope="module", params=CREATING, ids=lambda p: p.name if p else "defaults")
def derived(request) -> tuple[dict, dict]:
    [cluster] = [o for o in render(request.param) if o["kind"] == "RayCluster"]
    cluster["metadata"]["namespace"] = "ml"  # the API server fills it from the release's namespace
    return merged_values(request.param)["ray"], _derive_autoscaling_config_from_ray_cr(cluster)


def test_every_values_file_that_creates_a_cluster_is_checked():
    assert len(CREATING) >= 3


def test_the_head_takes_no_work_and_has_its_memory(derived):
    ray, config = derived
    head = config["available_node_types"]["headgroup"]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert head["resources"]["CPU"] == int(ray["head"]["rayStartParams"]["num-cpus"]) == 0  # no training on it
    assert head["resources"]["memory"] == quantity_bytes(ray["head"]["resources"]["limits"]["memory"])
    assert "GPU" not in head["resources"]


def test_each_worker_group_scales_and_is_sized_as_its_values_say(derived):
    ray, config = derived
    groups = {name: t for name, t in config["available_node_types"].items() if name != "headgroup"}
    assert set(groups) == {g["name"] for g in ray["workerGroups"]}
    for group in ray["workerGroups"]:
        node_type = groups[group["name"]]
        assert (node_type["min_workers"], node_type["max_workers"]) == (group["minReplicas"], group["maxReplicas"])
        limits = group["resources"]["limits"]
        assert node_type["resources"]["CPU"] == int(limits["cpu"])
        assert node_type["resources"]["memory"] == quantity_bytes(limits["memory"])
        assert node_type["resources"].get("GPU", 0) == group["gpus"]
    assert config["max_workers"] == sum(g["maxReplicas"] for g in ray["workerGroups"])


def test_the_autoscaler_runs_with_the_values_idle_timeout_and_mode(derived):
    ray, config = derived
    assert config["idle_timeout_minutes"] == ray["autoscaler"]["idleTimeoutSeconds"] / 60
    assert config["upscaling_speed"] == (1 if ray["autoscaler"]["upscalingMode"] == "Conservative" else 1000)
    assert config["provider"]["type"] == "kuberay" and config["provider"]["namespace"] == "ml"
