"""Stopping and continuing a run as a user does: kill and --resume, --max-restarts, torchrun's
restarts, damaged checkpoints, export, and the one-line errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from plait.launch import free_port
from tests.conftest import tiny_args
from tests.e2e.test_cli import PLAIT, _children, plait

pytestmark = pytest.mark.timeout(240)
STEPS = ["--steps", "120", "--set", "checkpoint.every=20", "--set", "train.dtype=float32", "--no-progress",
         "--sample", "0"]


def _losses(out) -> dict[int, float]:
    """Step -> loss of metrics.jsonl (the file must hold each step once: one history)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step appears twice in metrics.jsonl"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _step(out) -> int:
    try:
        rows = (out / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(r).get("step", 0) for r in rows if r.strip()), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def _wait_step(out, n: int, proc, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while _step(out) < n:
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < end
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    r = plait("train", *tiny_args(corpus_file), "--nproc", "2", *STEPS, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return _losses(out)


def _start(corpus_file, out, *extra, cmd=None, env=None):
    return subprocess.Popen(cmd or [*PLAIT, "train", *tiny_args(corpus_file), "--nproc", "2", *STEPS, "--out",
                                    str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def test_killed_run_resumes_bit_identical(corpus_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = _start(corpus_file, out)
    try:
        _wait_step(out, 27, proc)
        for pid in [*_children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    r = plait("train", *tiny_args(corpus_file), "--nproc", "2", *STEPS, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and "at the same layout" in r.stderr
    assert _losses(out) == uninterrupted


def _kill_one_and_finish(proc, out, child: int) -> str:
    """SIGKILL the launcher's ``child``-th process once the run passes step 27; the run's stderr
    after it finished (by itself: it must restart)."""
    try:
        _wait_step(out, 27, proc)
        os.kill(_children(proc.pid)[child], signal.SIGKILL)
        _, err = proc.communicate(timeout=200)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    return err


def test_max_restarts_recovers_from_a_killed_rank(corpus_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    err = _kill_one_and_finish(_start(corpus_file, out, "--max-restarts", "1"), out, 1)
    assert "rank 1 was killed by signal 9" in err and "restart 1 of 1, resuming from step" in err
    assert _losses(out) == uninterrupted


@pytest.mark.slow
def test_torchrun_restarts_resume_by_themselves(corpus_file, tmp_path, uninterrupted):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--master-port", str(free_port()), "-m", "plait", "train", *tiny_args(corpus_file),
           *STEPS, "--out", str(out)]
    # torchrun's agent otherwise shares its store with the workers' process group, and a restarted
    # group may read the old group's addresses (pytorch/pytorch#135712): docs/checkpoints.md says so
    proc = _start(corpus_file, out, cmd=cmd, env={**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    err = _kill_one_and_finish(proc, out, 0)
    assert "resumed from" in err
    assert _losses(out) == uninterrupted


def test_resume_skips_a_damaged_newest_checkpoint_and_exports(corpus_file, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_args(corpus_file), "--nproc", "2", "--no-progress", "--sample", "0", "--out", str(out)]
    r = plait("train", *args, "--steps", "6", "--set", "checkpoint.every=3")
    assert r.returncode == 0, r.stderr
    newest = next((out / "checkpoints" / "step_000006").glob("*.distcp"))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    r = plait("train", *args, "--steps", "8", "--resume")
    assert r.returncode == 0, r.stderr
    assert "checkpoint step_000006 is damaged" in r.stderr and "step_000003 (step 3)" in r.stderr
    assert sorted(_losses(out)) == list(range(1, 9))
    r = plait("export", "--ckpt", str(out), "--out", str(tmp_path / "m.safetensors"))
    assert r.returncode == 0 and "step 8" in r.stdout, r.stderr
    assert json.loads((tmp_path / "m.json").read_text())["config"]["model"]["hidden"] == 32


def test_resume_at_another_layout_and_steps(corpus_file, tmp_path):
    out = tmp_path / "run"
    args = [*tiny_args(corpus_file), "--no-progress", "--sample", "0", "--out", str(out)]
    assert plait("train", *args, "--nproc", "2", "--dp", "2", "--steps", "4").returncode == 0
    r = plait("train", *args, "--nproc", "2", "--tp", "2", "--steps", "6", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resharded from dp=2, tp=1" in r.stderr
    assert sorted(_losses(out)) == list(range(1, 7))


def _bad_resume_cases(tmp_path, corpus_file):
    run = tmp_path / "run"
    base = [*tiny_args(corpus_file), "--nproc", "1", "--no-progress", "--sample", "0"]
    assert plait("train", *base, "--steps", "2", "--out", str(run)).returncode == 0
    other = tmp_path / "other"  # a run whose config no longer matches its checkpoints
    shutil.copytree(run, other)
    info = other / "checkpoints" / "step_000002" / "plait.json"  # the config saved with the tensors
    info.write_text(info.read_text().replace("hidden = 32", "hidden = 64"))
    junk = tmp_path / "junk.safetensors"  # an export cut to garbage, its config intact
    junk.write_bytes(b"not safetensors")
    (tmp_path / "junk.json").write_text(json.dumps({"config": {"model": {"hidden": 32}}, "step": 2}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.toml").write_text((run / "config.toml").read_text())
    again = ["train", "--nproc", "1", "--no-progress", "--resume", "--out"]
    return [
        ([*again, str(empty)], "no complete checkpoint"),
        ([*again, str(tmp_path / "nothing")], "holds no run"),
        ([*again, str(run), "--set", "model.hidden=64"], "model.hidden"),
        ([*again, str(other)], "'model.tok_emb.weight' is [256, 32] there but [256, 64]"),
        (["train", *base, "--out", str(tmp_path / "x"), "--max-restarts", "-1"], "--max-restarts"),
        (["export", "--ckpt", str(empty), "--out", str(tmp_path / "m.safetensors")], "is not a checkpoint"),
        (["export", "--ckpt", str(run), "--out", str(tmp_path / "m.bin")], "FILE.safetensors"),
        (["export", "--ckpt", str(run), "--out", str(run / "config.toml" / "m.safetensors")], "cannot be written"),
        (["export", "--ckpt", str(junk), "--out", str(tmp_path / "m.safetensors")], "not a readable safetensors"),
    ]


def test_max_restarts_under_torchrun_is_one_line(tmp_path):
    """torchrun restarts by its own --max-restarts; plait's is refused there, before anything runs."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}
    r = subprocess.run([*PLAIT, "train", "--out", str(tmp_path / "o"), "--max-restarts", "1"], capture_output=True,
                       text=True, timeout=60, env=env)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "torchrun's own --max-restarts" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_bad_resume_and_export_input_is_one_line(corpus_file, tmp_path):
    for args, fragment in _bad_resume_cases(tmp_path, corpus_file):
        r = plait(*args, timeout=60)
        lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and fragment in lines[0], (args, lines)
