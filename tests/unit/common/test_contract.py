"""The contract between stages: a manifest of another format version or with missing fields is
refused with what to do, and the run layout is found where the job writes it."""

import json

import pytest
from support.jobs import stub_manifest

from jobs.common import run_layout
from jobs.common.contract import ManifestError, parse_manifest, read_manifest


def test_a_manifest_of_another_version_is_refused_with_the_fix():
    old = json.loads(stub_manifest("abc").to_json()) | {"format_version": 1}
    with pytest.raises(ManifestError, match="format_version 1; this raysft reads 2: prepare the dataset again"):
        parse_manifest(json.dumps(old))
    with pytest.raises(ManifestError, match="format_version None"):
        parse_manifest(json.dumps({"status": "succeeded"}))


def test_a_malformed_manifest_names_what_is_missing():
    broken = json.loads(stub_manifest("abc").to_json())
    del broken["tokenizer"]["sha256"], broken["counts"]
    with pytest.raises(ManifestError, match=r"tokenizer\.sha256, counts"):
        parse_manifest(json.dumps(broken))
    with pytest.raises(ManifestError, match="not JSON"):
        parse_manifest("{")


def test_read_manifest_from_a_dataset_directory(tmp_path):
    (tmp_path / "manifest.json").write_text(stub_manifest("abc").to_json())
    assert read_manifest(str(tmp_path)).tokenizer.sha256 == "abc"
    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path / "missing"))


def test_checkpoints_are_named_and_listed_by_step(tmp_path):
    run = run_layout.run_uri(str(tmp_path) + "/", "r")
    assert run == f"{tmp_path}/r"
    for step in (20, 5):
        (tmp_path / "r" / run_layout.checkpoint_dir_name(step)).mkdir(parents=True)
    (tmp_path / "r" / "export").mkdir()
    assert run_layout.checkpoints(run) == [f"{run}/{run_layout.checkpoint_dir_name(s)}" for s in (5, 20)]
    assert run_layout.checkpoint_step(run_layout.checkpoint_dir_name(20)) == 20
    assert run_layout.checkpoint_step("export") is None
    assert run_layout.checkpoints(str(tmp_path / "none")) == []


def test_registered_checkpoints_come_from_ray_trains_snapshot(tmp_path):
    run = str(tmp_path)
    assert run_layout.registered(run) == run_layout.Registered()
    names = [run_layout.checkpoint_dir_name(s) for s in (5, 10, 15)]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {"eval_loss": loss}}
                                       for n, loss in zip(names, (2.0, 1.5, 1.7), strict=True)],
                "latest_checkpoint_result": {"checkpoint_dir_name": names[2], "metrics": {}}}
    (tmp_path / run_layout.RAY_TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    registered = run_layout.registered(run)
    assert registered.latest == f"{run}/{names[2]}" and registered.latest_step == 15
    assert registered.best == f"{run}/{names[1]}" and registered.best_eval_loss == 1.5
    (tmp_path / run_layout.RAY_TRAIN_SNAPSHOT).write_text('{"checkpoint_res')  # caught mid-rewrite
    assert run_layout.registered(run) == run_layout.Registered()
