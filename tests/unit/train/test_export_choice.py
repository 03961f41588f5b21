"""`export.checkpoint`: the final checkpoint, or the registered one with the lowest eval loss."""

import json

import pytest

from jobs.common import run_layout
from jobs.train.loop import export_checkpoint
from jobs.train.spec import load_training_spec

MINIMAL = {"name": "run", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
           "checkpoint": {"storage": "ckpt"}}


@pytest.fixture
def run(tmp_path):
    names = [run_layout.checkpoint_dir_name(s) for s in (5, 10, 15)]
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": n, "metrics": {"eval_loss": loss}}
                                       for n, loss in zip(names, (2.0, 1.5, 1.7), strict=True)],
                "latest_checkpoint_result": {"checkpoint_dir_name": names[2], "metrics": {}}}
    (tmp_path / run_layout.RAY_TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    return str(tmp_path)


def spec(choice: str):
    return load_training_spec(MINIMAL | {"export": {"checkpoint": choice}})


def test_best_exports_the_registered_checkpoint_with_the_lowest_eval_loss(run):
    chosen = export_checkpoint(spec("best"), run, final="final", final_eval_loss=1.7)
    assert chosen.path.endswith(run_layout.checkpoint_dir_name(10))


@pytest.mark.parametrize("choice, final_loss", [("best", 1.2), ("best", None), ("latest", 1.7)])
def test_the_final_checkpoint_when_it_is_best_unevaluated_or_asked_for(run, choice, final_loss):
    assert export_checkpoint(spec(choice), run, final="final", final_eval_loss=final_loss) == "final"
