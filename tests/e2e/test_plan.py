"""`plait plan`, `plait probe` and `plait train --layout auto` as a user runs them."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import TINY, tiny_args

pytestmark = pytest.mark.timeout(180)
PLAIT = [sys.executable, "-m", "plait"]
GPT3 = '[model]\nflavour = "gpt2"\nlayers = 96\nhidden = 12288\nheads = 96\nffn_hidden = 49152\nvocab = 51200\n' \
       'seq_len = 2048\n'
KEYS = ("dp", "tp", "pp", "zero", "micro_batch", "schedule", "virtual_stages", "sequence_parallel", "recompute",
        "fits", "mem_bytes_per_device", "step_time_s", "tflops_per_device", "mfu", "bottleneck")


def plait(*args, env=None, timeout=120):
    return subprocess.run([*PLAIT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def plan(capsys, *args) -> tuple[int, str, str]:
    """`plait plan ...` in this process (no interpreter start): (exit code, stdout, stderr)."""
    from plait.cli import main

    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """This machine measured once by `plait probe --quick`."""
    path = tmp_path_factory.mktemp("probe") / "probe.json"
    r = plait("probe", "--quick", "--out", str(path))
    assert r.returncode == 0, r.stderr
    assert f"profile: {path}" in r.stdout and "all_reduce" in r.stdout
    return path


def test_plan_a_175b_model_on_4096_a100s(tmp_path, capsys):
    model = tmp_path / "m.toml"
    model.write_text(GPT3)
    r = plait("plan", "--model", str(model), "--cluster", "dgx-a100-80gb", "--devices", "4096",
              "--global-batch", "1536", "--top", "5", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 5 and all(k in row for row in rows for k in KEYS)
    assert all(row["fits"] and row["tp"] <= 8 and row["dp"] * row["tp"] * row["pp"] == 4096 for row in rows)
    assert [row["step_time_s"] for row in rows] == sorted(row["step_time_s"] for row in rows)
    assert rows[0]["why"].startswith("winner") and "slower" in rows[1]["why"]
    code, out, err = plan(capsys, "--model", str(model), "--cluster", "dgx-h100-80gb", "--devices", "64",
                          "--global-batch", "64")
    assert code == 0 and "winner" in out and "bottleneck" in out, err


def test_a_named_layout_that_cannot_run_is_shown_with_its_reason(tmp_path, capsys):
    model = tmp_path / "m.toml"
    model.write_text(GPT3)
    code, out, _ = plan(capsys, "--model", str(model), "--cluster", "dgx-a100-80gb", "--devices", "4096",
                        "--global-batch", "1536", "--layout", "tp=16", "--json")
    row = json.loads(out)[0]
    assert code == 0 and not row["fits"] and "spans nodes" in row["reason"]
    code, out, _ = plan(capsys, "--model", str(model), "--cluster", "dgx-a100-80gb", "--devices", "4096",
                        "--global-batch", "1536", "--layout", "tp=8,pp=8")
    assert code == 0 and "winner dp=64,tp=8,pp=8" in out, out


@pytest.mark.parametrize("args,field", [
    (["--devices", "0", "--cluster", "dgx-a100-80gb"], "--devices"),
    (["--global-batch", "0", "--cluster", "dgx-a100-80gb"], "--global-batch"),
    (["--cluster", "no-such-cluster"], "--cluster"),
    (["--cluster", "dgx-a100-80gb", "--layout", "size=2"], "--layout"),
    (["--cluster", "dgx-a100-80gb", "--layout", "tp=two"], "--layout"),
    (["--cluster", "dgx-a100-80gb", "--model", "missing.toml"], "missing.toml"),
    (["--cluster", "dgx-a100-80gb", "--top", "0"], "--top"),
    (["--cluster", "dgx-a100-80gb", "--model", "BUILDER"], "model.builder"),
])
def test_bad_plan_input_is_one_line(args, field, capsys, tmp_path):
    if "BUILDER" in args:
        (tmp_path / "b.toml").write_text('[model]\nbuilder = "examples/own_model.py:build"\n')
        args = [str(tmp_path / "b.toml") if a == "BUILDER" else a for a in args]
        field = "model.builder"
    code, out, err = plan(capsys, *args)
    assert code == 2 and out == "", (out, err)
    assert err.count("\n") == 1 and field in err and "Traceback" not in err


@pytest.mark.parametrize("layout,why", [
    ("micro_batch=0", "micro_batch must be at least 1"), ("dp=1,tp=8,zero=1", "needs dp > 1"),
    ("dp=2,tp=3", "not the 8 devices"), ("pp=2,schedule=interleaved,virtual_stages=8", "stages"),
])
def test_named_layouts_are_refused_with_a_reason_not_a_traceback(layout, why, capsys):
    code, out, err = plan(capsys, "--cluster", "dgx-h100-80gb", "--devices", "8", "--global-batch", "8",
                          "--layout", layout, "--json")
    row = json.loads(out)[0]
    assert code == 0 and not row["fits"] and why in row["reason"], (row["reason"], err)


def test_bad_probe_and_auto_layout_input_is_one_line(corpus_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, field in ((["probe", "--out", str(blocker / "p.json")], "--out"),
                        (["train", *tiny_args(corpus_file), "--layout", "auto", "--tp", "2"], "--layout"),
                        (["train", *tiny_args(corpus_file), "--layout", "auto", "--dry-run"], "--layout")):
        r = plait(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and field in r.stderr, (args, r.stderr)


def test_plan_for_this_machine_and_train_with_the_winner(profile, corpus_file, tmp_path):
    r = plait("plan", "--cluster", str(profile), "--global-batch", "16", "--json")
    rows = json.loads(r.stdout)
    assert r.returncode == 0 and rows and rows[0]["fits"] and rows[0]["dp"] * rows[0]["tp"] * rows[0]["pp"] == 2
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(profile, cache / "probe.json")  # the profile --layout auto uses (made by probe on first use)
    out = tmp_path / "run"
    args = [a for s in TINY if s != "train.micro_batch=2" for a in ("--set", s)]  # --layout auto chooses it
    args += ["--data", str(corpus_file)]
    r = plait("train", *args, "--layout", "auto", "--steps", "3", "--out", str(out),
              "--no-progress", "--sample", "0", env={"PLAIT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert "plan: winner" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert all(row["predicted_step_time_s"] > 0 and row["predicted_mem_peak_bytes"] > 0 for row in steps)
    r = plait("train", *tiny_args(corpus_file), "--layout", "tp=2", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--layout" in r.stderr and r.stderr.count("\n") == 1
