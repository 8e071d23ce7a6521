"""The names a loop of one's own uses: imported on first use, with clear errors outside a run."""

import subprocess
import sys

import pytest
import torch

import plait
from plait.errors import PlaitError


def test_import_plait_is_light():
    r = subprocess.run([sys.executable, "-c", "import sys, plait; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_public_names_resolve():
    assert plait.ParallelConfig(tp=2).tp == 2
    assert {"parallelize", "launch", "device", "ModelDescription", "TensorParallelPlan"} <= set(plait.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        plait.nope  # noqa: B018


def test_parallelize_outside_a_run_says_how_to_start_one():
    with pytest.raises(PlaitError, match="plait.launch"):
        plait.parallelize(torch.nn.Linear(2, 2), None)
