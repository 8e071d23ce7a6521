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


@pytest.mark.parametrize("layout, nproc, fragment", [
    ({"tp": 3}, 2, "parallel.dp='auto': dp*tp*pp"),
    ({"zero": 1}, 2, None),
    ({"zero": 1, "tp": 2}, 2, "parallel.zero=1: shards over data parallel"),
    ({"virtual_stages": 2}, 2, "parallel.virtual_stages=2: only the interleaved schedule"),
    ({"schedule": "pipedream"}, 2, "parallel.schedule='pipedream': valid schedules"),
])
def test_a_layout_of_ones_own_is_checked_before_anything_starts(layout, nproc, fragment):
    from plait.config import resolve_layout
    from plait.errors import ConfigError

    if fragment is None:
        assert resolve_layout(plait.ParallelConfig(**layout), nproc).dp == 2
        return
    with pytest.raises(ConfigError, match=fragment.replace("*", r"\*")):
        resolve_layout(plait.ParallelConfig(**layout), nproc)
