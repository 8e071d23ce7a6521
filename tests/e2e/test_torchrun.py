"""The multi-machine path: two torchrun agents (--nnodes 2) meet by c10d rendezvous on 127.0.0.1."""

import json
import os
import subprocess
import sys

import pytest

from plait.launch import free_port
from tests.conftest import tiny_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("layout, flags", [("dp=2", []), ("pp=2", ["--pp", "2"])])
def test_two_torchrun_agents_train_together(corpus_file, tmp_path, layout, flags):
    out = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "plait-test",
           "-m", "plait", "train", *tiny_args(corpus_file), "--out", str(out), "--steps", "4", "--no-progress",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
              for _ in range(2)]
    try:
        logs = [a.communicate(timeout=200)[0] for a in agents]
    finally:
        for a in agents:
            a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert layout in "".join(logs)  # one job over both agents: dp or pipeline stages across the two "machines"
