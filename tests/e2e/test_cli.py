"""The `plait` command as a user runs it: outputs, bad input, a killed worker, bench, verify."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_args

pytestmark = pytest.mark.timeout(180)
PLAIT = [sys.executable, "-m", "plait"]


def plait(*args, timeout=120, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*PLAIT, *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def test_train_writes_every_output(corpus_file, tmp_path):
    out = tmp_path / "run"
    r = plait("train", *tiny_args(corpus_file), "--nproc", "2", "--out", str(out), "--steps", "6",
              "--set", "train.eval_every=3", "--set", "checkpoint.every=3", "--sample", "20", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mem_peak_bytes", "comm_bytes",
                "comm_peak_bytes", "comm_dp_bytes"):
        assert all(key in row for row in steps), key
    sent = sum(row["comm_bytes"] for row in steps)
    assert sent > 0 and f"communication: rank 0 sent {sent / 1e6:.2f} MB in 6 steps (dp" in r.stderr
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 3, 6]
    assert (out / "config.toml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    assert "[r0 pp0 dp0 tp0] step 6/6  loss" in r.stderr  # --no-progress: a log line every log_every steps
    assert "--- sample ---" in r.stdout and str(out) in r.stdout


BAD = [
    (["--set", "model.no_such_key=1"], "model.no_such_key"),
    (["--set", "parallel.dp=3", "--nproc", "2"], "parallel.dp"),
    (["--set", "train.global_batch=7", "--set", "parallel.dp=2", "--nproc", "2"], "train.global_batch"),
    (["--data", "/nonexistent/path.txt"], "data.path"),
    (["--data", "{empty_dir}"], "data.path"),
    (["--data", "{empty_file}"], "data.path"),
    (["--set", "model.hidden=100", "--set", "model.heads=3"], "model.heads"),
    (["--set", "train.steps=-5"], "train.steps"),
    (["--set", "parallel.zero=7"], "parallel.zero"),
    (["--config", "/nonexistent.toml"], "--config"),
    (["--nproc", "0"], "--nproc"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--tp", "2", "--set", "model.heads=3", "--set", "model.hidden=96"], "model.heads"),
    (["--tp", "2", "--set", "model.kv_heads=1", "--set", "model.flavour=llama"], "model.kv_heads"),
    (["--tp", "2", "--set", "model.hidden=63", "--set", "model.heads=3"], "model.hidden"),
    (["--tp", "2", "--set", "model.ffn_hidden=99"], "model.ffn_hidden"),
    (["--tp", "2", "--set", "parallel.sequence_parallel=true", "--set", "model.seq_len=99"], "model.seq_len"),
    (["--pp", "2", "--set", "model.layers=1"], "model.layers"),
    (["--pp", "2", "--set", "parallel.schedule=interleaved", "--set", "parallel.virtual_stages=2",
      "--set", "train.micro_batch=4", "--set", "train.global_batch=12"], "parallel.microbatches"),
    (["--pp", "2", "--set", "parallel.schedule=pipedream"], "parallel.schedule"),
    (["--timeline", "3"], "--timeline"),
    # the other ps.* and diloco.* refusals are unit tests (tests/unit/test_diloco.py): one of each here
    (["--set", "diloco.inner_steps=0"], "diloco.inner_steps"),
    (["--dp", "2", "--nproc", "3", "--set", "ps.servers=2"], "ps.servers"),
    (["--dp", "2", "--set", "ps.slow_worker=5:3.0"], "ps.slow_worker"),
    (["--dp", "2", "--set", "ps.servers=1", "--dry-run"], "--dry-run"),
    (["--dp", "2", "--set", "ps.mode=async", "--max-restarts", "1"], "--max-restarts"),
    (["--pp", "2", "--steps", "2", "--timeline", "5"], "--timeline"),
]


@pytest.mark.parametrize("args, field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_line_exit_2(tmp_path, args, field):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_file").write_text("")
    args = [a.format(empty_dir=tmp_path / "empty_dir", empty_file=tmp_path / "empty_file") for a in args]
    r = plait("train", "--out", str(tmp_path / "o"), *args, timeout=60)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and field in lines[0], lines
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    r = plait("train", "--out", str(out), "--steps", "1")
    assert r.returncode == 2 and "--out" in r.stderr
    assert (out / "metrics.jsonl").read_text() == "precious\n"


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        kids += [int(c) for c in children]
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_one_worker_ends_the_run(corpus_file, tmp_path, victim):
    out = tmp_path / "run"
    proc = subprocess.Popen([*PLAIT, "train", *tiny_args(corpus_file), "--nproc", "2", "--out", str(out),
                             "--steps", "100000", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[victim], signal.SIGKILL)
        t0 = time.monotonic()
        rc = proc.wait(timeout=30)
        assert time.monotonic() - t0 < 30
        assert rc != 0
        time.sleep(0.5)
        assert not [w for w in workers if _alive(w)]
    finally:
        proc.kill()


def test_verify_json_and_exit_code(corpus_file):
    r = plait("verify", *tiny_args(corpus_file), "--steps", "3", "--layouts", "dp=2;dp=2,micro_batch=1", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["layout"] for row in rows] == ["dp=2", "dp=2,micro_batch=1"]
    assert set(rows[0]) == {"layout", "nproc", "steps", "dtype", "max_loss_rel_diff", "max_param_rel_diff", "ok"}
    assert all(row["ok"] and row["dtype"] == "float64" for row in rows)


def test_verify_bad_layout_key(corpus_file):
    r = plait("verify", *tiny_args(corpus_file), "--layouts", "dq=2")
    assert r.returncode == 2 and "unknown key 'dq'" in r.stderr and "Traceback" not in r.stderr


def test_bench_dp_reports_both_sides(corpus_file):
    r = plait("bench", "dp", *tiny_args(corpus_file), "--nproc", "2", "--iters", "5", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"] == "torch DistributedDataParallel"
    assert d["ours_tokens_per_s"] > 0 and d["torch_tokens_per_s"] > 0
    assert d["ratio"] == pytest.approx(d["ours_tokens_per_s"] / d["torch_tokens_per_s"], rel=1e-3)
    assert d["steps_measured"] == 5 and len(d["ours_step_s"]) == len(d["torch_step_s"]) == 5  # --iters 5


@pytest.mark.parametrize("sp", ["false", "true"])
def test_bench_tp_races_dtensor(corpus_file, sp):
    r = plait("bench", "tp", *tiny_args(corpus_file), "--nproc", "2", "--iters", "3", "--warmup", "1", "--json",
              "--set", "model.flavour=llama", "--set", f"parallel.sequence_parallel={sp}",
              "--set", "train.global_batch=4", "--set", "train.micro_batch=4")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"].startswith("torch DTensor") and d["steps_measured"] == 3
    assert d["layout"] == "dp=1,tp=2,pp=1" + (",sequence_parallel=true" if sp == "true" else "")


@pytest.mark.parametrize("args, field", [
    (["dp", "--zero", "2"], "parallel.zero"), (["zero", "--zero", "0"], "parallel.zero"),
    (["pp", "--set", "parallel.schedule=zb"], "parallel.schedule"), (["dp", "--iters", "0"], "--iters"),
    (["diloco", "--set", "diloco.fragments=3"], "diloco.fragments"), (["diloco", "--tp", "2"], "parallel.tp"),
    (["dp", "--set", "diloco.inner_steps=4"], "diloco.*"), (["dp", "--set", "ps.servers=1"], "ps.*"),
])
def test_bench_refuses_a_layout_it_would_mislabel(args, field):
    r = plait("bench", *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and field in r.stderr, r.stderr


def test_bench_diloco_races_torchft(corpus_file):
    pytest.importorskip("torchft", reason="plait bench diloco races torchft's DiLoCo (pip install 'plait[bench]')")
    r = plait("bench", "diloco", *tiny_args(corpus_file), "--nproc", "2", "--iters", "8", "--warmup", "0", "--json",
              "--set", "diloco.inner_steps=4", "--set", "diloco.fragments=2", "--set", "diloco.quantize=bf16",
              timeout=170)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"] == "torchft DiLoCo" and d["H"] == 4 and d["fragments"] == 2 and d["steps"] == 8
    for run in ("", "streaming_"):
        for side in ("ours", "torch"):
            assert d[f"{side}_{run}tokens_per_s"] > 0 and math.isfinite(d[f"{side}_{run}val_loss"])
            assert d[f"{side}_{run}bytes"] > 0
    assert d["ratio"] == pytest.approx(d["ours_tokens_per_s"] / d["torch_tokens_per_s"], rel=1e-3)
    assert d["streaming_ratio"] == pytest.approx(d["ours_streaming_tokens_per_s"] / d["torch_streaming_tokens_per_s"],
                                                 rel=1e-3)
    plain = d["runs"]["plain"]  # the median window's rate, and the rate over every timed window beside it
    assert plain["ours_steps_timed"] == 8 and d["ratio_overall"] == pytest.approx(
        plain["ours_tokens_per_s_overall"] / plain["torch_tokens_per_s_overall"], rel=1e-3)
    # Plain DiLoCo is the same algorithm on both sides: one fp32 all-reduce of the pseudo-gradients
    # every H steps (the same bytes), and the same model at the end.
    assert d["ours_bytes"] == d["torch_bytes"]
    assert d["ours_val_loss"] == pytest.approx(d["torch_val_loss"], rel=1e-3)


@pytest.mark.parametrize("schedule, baseline", [("gpipe", "ScheduleGPipe"), ("1f1b", "Schedule1F1B"),
                                               ("interleaved", "ScheduleInterleaved1F1B")])
def test_bench_pp_races_torchs_own_schedule(corpus_file, schedule, baseline):
    v = 2 if schedule == "interleaved" else 1
    r = plait("bench", "pp", *tiny_args(corpus_file), "--nproc", "2", "--iters", "5", "--warmup", "1", "--json",
              "--set", "model.layers=4", "--set", f"parallel.schedule={schedule}",
              "--set", f"parallel.virtual_stages={v}")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"] == f"torch.distributed.pipelining {baseline}" and d["virtual_stages"] == v
    assert d["ours_tokens_per_s"] > 0 and d["torch_tokens_per_s"] > 0


def test_config_file_beats_command_defaults_and_set_beats_file(tmp_path):
    from plait.cli import build_parser, load_config

    f = tmp_path / "v.toml"
    f.write_text('[train]\ndtype = "float32"\nsteps = 7\n')
    args = build_parser().parse_args(["verify", "--config", str(f), "--set", "train.steps=9"])
    cfg = load_config(args, {"train.dtype": "float64", "train.steps": "20"})
    assert (cfg.train.dtype, cfg.train.steps) == ("float32", 9)
    args = build_parser().parse_args(["verify", "--config", str(f), "--steps", "11", "--dtype", "bfloat16"])
    assert load_config(args).train.steps == 11 and load_config(args).train.dtype == "bfloat16"


@pytest.mark.parametrize("layout, nproc", [(["--tp", "2"], 2), (["--tp", "2", "--dp", "2"], 4),
                                           (["--tp", "2", "--set", "parallel.sequence_parallel=true"], 2)])
def test_tensor_parallel_layouts_train_end_to_end(corpus_file, tmp_path, layout, nproc):
    out = tmp_path / "run"
    r = plait("train", *tiny_args(corpus_file), *layout, "--nproc", str(nproc), "--out", str(out), "--steps", "4",
              "--set", "train.eval_every=2", "--sample", "10", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 2, 4]
    assert "--- sample ---" in r.stdout


def test_parameter_bytes_per_rank_shrink_with_tp(corpus_file, tmp_path):
    """The split matrices (all but norms, biases of row layers, positions) drop to 1/tp per rank."""
    bytes_at = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        r = plait("train", *tiny_args(corpus_file), "--tp", str(tp), "--nproc", str(tp), "--out", str(out),
                  "--steps", "1", "--sample", "0", "--no-progress")
        assert r.returncode == 0, r.stderr
        bytes_at[tp] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["mem_params_bytes"]
    assert 0.5 < bytes_at[2] / bytes_at[1] < 0.56  # 1/2 of the split part, plus the small replicated rest


@pytest.mark.parametrize("layout, nproc", [(["--pp", "2"], 2), (["--pp", "2", "--tp", "2"], 4),
                                           (["--pp", "2", "--set", "parallel.schedule=zb"], 2)])
def test_pipeline_layouts_train_end_to_end(corpus_file, tmp_path, layout, nproc):
    out = tmp_path / "run"
    r = plait("train", *tiny_args(corpus_file), "--set", "model.layers=4", *layout, "--nproc", str(nproc),
              "--out", str(out), "--steps", "4", "--set", "train.eval_every=2", "--sample", "10", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "val_loss" in row] == [0, 2, 4]
    assert "--- sample ---" in r.stdout


def test_timeline_of_a_real_pipeline_step(corpus_file, tmp_path):
    out = tmp_path / "run"
    r = plait("train", *tiny_args(corpus_file), "--set", "model.layers=4", "--pp", "2", "--nproc", "2",
              "--set", "train.micro_batch=1", "--out", str(out), "--steps", "3", "--timeline", "2", "--no-progress",
              "--sample", "0")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "timeline.json").read_text())
    assert len(report["measured"]["peak_inflight"]) == 2 and report["measured"]["peak_inflight"][0] == 2
    assert all(0 <= report[k]["bubble_fraction"] < 1 for k in ("measured", "simulated", "expected", "predicted"))
    ops, mbs = {e[1] for e in report["events"]}, {e[2] for e in report["events"]}
    assert ops == {"F", "B"} and len(report["events"]) == 2 * len(mbs) * 2  # ranks x micro-batches x (F, B)
    assert (out / "timeline.png").stat().st_size > 1000
    assert "measured bubble" in r.stdout


def test_schedule_command_json_grid_and_picture(tmp_path):
    r = plait("schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--json")
    d = json.loads(r.stdout)
    assert d["bubble_fraction"] == pytest.approx(3 / 11) and d["peak_inflight"] == [4, 3, 2, 1]
    assert d["makespan"] == 33
    png = tmp_path / "s.png"
    r = plait("schedule", "--schedule", "interleaved", "--pp", "2", "--microbatches", "4", "--virtual", "2",
              "--png", str(png))
    assert r.returncode == 0 and "rank 1 |" in r.stdout and png.stat().st_size > 1000


@pytest.mark.parametrize("args, field", [(["--schedule", "foo"], "--schedule"), (["--pp", "0"], "--pp"),
                                         (["--schedule", "interleaved", "--pp", "4", "--microbatches", "6"],
                                          "--microbatches"),
                                         (["--schedule", "1f1b", "--virtual", "2"], "--virtual")])
def test_schedule_bad_input(args, field):
    r = plait("schedule", *args)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["train"], ["schedule"], ["bench", "pp"]])
def test_an_unknown_flag_points_to_the_commands_own_help(command):
    r = plait(*command, "--no-such-flag")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert f"unrecognized arguments: --no-such-flag (see plait {command[0]} --help)" in r.stderr


@pytest.mark.parametrize("zero, baseline", [(2, "torch ZeroRedundancyOptimizer + DDP"),
                                            (3, "torch fully_shard (FSDP2)")])
def test_bench_zero_reports_speed_and_model_state_bytes(corpus_file, zero, baseline):
    r = plait("bench", "zero", *tiny_args(corpus_file), "--nproc", "2", "--iters", "5", "--warmup", "1",
              "--zero", str(zero), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["baseline"] == baseline and d["zero"] == zero
    if zero == 2:
        assert d["ours_state_bytes"] < d["torch_state_bytes"]  # ZeRO-2 also shards the gradients
    else:  # ZeRO-3 and fully_shard both hold 1/dp of parameters, gradients and moments
        assert d["ours_state_bytes"] == pytest.approx(d["torch_state_bytes"], rel=0.05)


def test_dry_run_prints_per_rank_breakdown_and_trains_nothing(tmp_path):
    out = tmp_path / "never"
    r = plait("train", "--dry-run", "--tp", "2", "--dp", "2", "--nproc", "4", "--zero", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "zero=1" in lines[0] and "params MB" in lines[1] and len(lines) == 3 + 4
    assert not out.exists()


@pytest.mark.parametrize("nproc, omp", [(1, None), (2, None), (1, "1")])
def test_each_local_process_gets_its_share_of_the_cores(corpus_file, tmp_path, nproc, omp):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | ({"OMP_NUM_THREADS": omp} if omp else {})
    r = subprocess.run([*PLAIT, "train", *tiny_args(corpus_file), "--nproc", str(nproc), "--out", str(tmp_path / "r"),
                        "--steps", "1", "--sample", "0", "--no-progress"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0))
    want = int(omp) if omp else max(1, cores // nproc)
    assert f"({want} thread{'s' if want > 1 else ''} a process)" in r.stderr, r.stderr


SMALL = Path(__file__).resolve().parents[1] / "models" / "small.py"
WRONG = [  # (builder function, layout, the one line expected)
    ("wide", "tp=2", "model description blocks[1]=(1, 16, 64): a block must map hidden (1, 16, 32) to the same shape"),
    ("unmatched", "dp=2", "model description tp.styles['layers.*.proj']='column': the pattern matches no module"),
    ("heads", "tp=2", "model description tp.divisible['heads']=3: must be divisible by parallel.tp=2"),
    ("nothing", "dp=2", "must return (nn.Module, ModelDescription)"),
    ("missing", "dp=2", "defines no function 'missing'"),
    ("half_tied", "tp=2", "model description tp.styles='emb.weight/out.weight': a tied pair must be styled"),
    ("odd", "tp=2", "model description tp style of layers.0.0='column': out_features=33 must be divisible"),
    ("wrong_kind", "tp=2", "model description tp style of layers.0.attn='column': needs an nn.Linear, not Attention"),
    ("two_vocabs", "tp=2", "model description tp.styles=[256, 257]: vocab_embedding and vocab_head must have one"),
    ("no_head", "tp=2,sequence_parallel=true", "model description tp.styles='no vocab_head': sequence parallel needs"),
    ("own_loss", "tp=2", "model description loss='<lambda>': a vocab_head makes the loss vocabulary-parallel"),
    ("build", "pp=4", "parallel.pp=4: pp x virtual_stages = 4 stages need at least 4 blocks; the model has 2"),
    ("build", "pp=2,stage_layers=3:1", "parallel.stage_layers='3,1': give 2 positive block counts summing to the "
     "model's 2 blocks"),
]


@pytest.mark.parametrize("function, layout, part", WRONG, ids=[f"{f}-{layout}" for f, layout, _ in WRONG])
def test_a_wrong_description_stops_with_one_line(corpus_file, function, layout, part):
    r = plait("verify", *tiny_args(corpus_file), "--set", f"model.builder={SMALL}:{function}",
              "--layouts", layout, "--steps", "1")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.strip() and "tokenising" not in line]
    assert len(lines) == 1 and part in lines[0] and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_a_builder_file_that_fails_to_import_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    r = plait("train", "--set", f"model.builder={tmp_path / 'broken.py'}:build", "--steps", "1", "--out",
              str(tmp_path / "run"))
    lines = [line for line in r.stderr.strip().splitlines() if line.strip() and "tokenising" not in line]
    assert r.returncode == 2 and len(lines) == 1 and "failed: RuntimeError: boom" in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("value, fragment", [("examples/own_model.py", "expected FILE.py:FUNCTION"),
                                             ("no/such/file.py:build", "no such file")])
def test_a_bad_builder_key_is_one_line(value, fragment):
    r = plait("train", "--set", f"model.builder={value}", "--steps", "1")
    assert r.returncode == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_an_async_parameter_server_run_survives_a_lost_worker(corpus_file, tmp_path):
    """SIGKILL of worker 1: the server goes on with worker 0, applies every sample of the run (no
    update lost, none beyond), and the run ends normally with its outputs."""
    out, steps = tmp_path / "run", 150
    proc = subprocess.Popen([*PLAIT, "train", *tiny_args(corpus_file), "--dp", "2", "--out", str(out), "--steps",
                             str(steps), "--set", "ps.mode=async", "--set", "ps.slow_worker=1:2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 5:
                break
            time.sleep(0.1)
        os.kill(sorted(_children(proc.pid))[1], signal.SIGKILL)  # rank 1: worker 1
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "rank 1 was killed by signal 9; the run goes on without it" in err and "the others go on" in err
    stats = json.loads((out / "ps_server0.json").read_text())
    assert stats["updates"] == {"pp0.tp0": steps * 2}
    assert list((out / "checkpoints").iterdir()) and (out / "loss.png").is_file()
