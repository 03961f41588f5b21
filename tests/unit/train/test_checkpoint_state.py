"""Checkpointed random state: every generator round-trips through the JSON a checkpoint holds."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from jobs.train.checkpoint import rng_state, set_rng_state


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
