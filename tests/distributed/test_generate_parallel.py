"""Generation split by tensor and pipeline parallel gives one process's tokens, cached or not,
greedy or seeded; and ``plait generate`` end to end on a trained checkpoint."""

import os
import subprocess
import sys

import pytest
import torch

from plait.generate import Layout, generate_tokens
from plait.models.sampling import SampleOptions, sample_local
from tests.conftest import tiny_args
from tests.unit.test_generate import PROMPTS, tiny

pytestmark = pytest.mark.timeout(120)

LAYOUTS = {"tp2": Layout(tp=2), "pp2": Layout(pp=2), "tp2-pp2": Layout(tp=2, pp=2)}
GREEDY = SampleOptions(max_tokens=40, temperature=0.0)  # 40 new tokens at 16 positions: windows restart


def _run(model, desc, opts, layout, **kw):
    return generate_tokens(model, desc, PROMPTS, opts, layout, timeout_s=60, threads=1, **kw).tokens


@pytest.mark.parametrize("flavour, kv_heads, vocab", [("gpt2", 0, 257), ("llama", 2, 256)])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_greedy_tokens_of_every_layout_equal_one_process(flavour, kv_heads, vocab, layout):
    """float64: the KV cache split over tp ranks (their own heads) and pp stages (their own blocks)."""
    model, desc = tiny(flavour, kv_heads, vocab=vocab)
    want = sample_local(model, PROMPTS, GREEDY)
    assert _run(model, desc, GREEDY, LAYOUTS[layout]) == want
    assert _run(model, desc, GREEDY, LAYOUTS[layout], cached=False) == want


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_seeded_sampling_gives_the_same_text_at_every_layout(layout):
    model, desc = tiny("llama", 2)
    opts = SampleOptions(max_tokens=30, temperature=1.0, top_k=50, top_p=0.95)
    want = sample_local(model, PROMPTS, opts, seed=11)
    assert _run(model, desc, opts, LAYOUTS[layout], seed=11) == want
    assert _run(model, desc, opts, LAYOUTS[layout], seed=12) != want


def test_bfloat16_runs_split():
    model, desc = tiny("gpt2", dtype=torch.bfloat16)
    rows = _run(model, desc, SampleOptions(max_tokens=20, temperature=0.0), Layout(tp=2, pp=2))
    assert [len(r) for r in rows] == [len(p) + 20 for p in PROMPTS] and all(0 <= t < 256 for r in rows for t in r)


def test_generate_command_on_a_tp2_checkpoint(corpus_file, tmp_path):
    """A checkpoint saved at tp=2 samples the same text (seeded, temperature 0.8) on one process,
    at tp=2 x pp=2, and from its export."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def plait(*args):
        r = subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        return r

    run = tmp_path / "run"
    plait("train", *tiny_args(corpus_file), "--set", "model.flavour=llama", "--set", "model.kv_heads=2", "--nproc",
          "2", "--tp", "2", "--steps", "3", "--sample", "0", "--out", str(run), "--no-progress")
    base = ["generate", "--prompt", "def ", "--max-tokens", "24", "--seed", "3", "--dtype", "float64"]
    one = plait(*base, "--ckpt", str(run))
    assert one.stdout.startswith("def ") and len(one.stdout) > 5 and "1 x 24 new tokens" in one.stderr
    assert plait(*base, "--ckpt", str(run), "--tp", "2", "--pp", "2").stdout == one.stdout
    plait("export", "--ckpt", str(run), "--out", str(tmp_path / "model.safetensors"))
    assert plait(*base, "--ckpt", str(tmp_path / "model.safetensors")).stdout == one.stdout


def test_bench_generate_reports_both_samplers(capsys):
    from plait import cli

    small = ["--set", "model.layers=2", "--set", "model.hidden=32", "--set", "model.heads=4", "--set",
             "model.seq_len=16"]
    assert cli.main(["bench", "generate", *small, "--iters", "1", "--warmup", "0"]) == 0
    table = capsys.readouterr().out
    assert "| 1 | 256 |" in table and "| 8 | 256 |" in table and "speedup" in table
    assert cli.main(["bench", "generate", *small, "--tp", "2"]) == 2
    assert "parallel.tp=2: plait bench generate needs 1" in capsys.readouterr().err
