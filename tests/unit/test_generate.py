"""Generation on one process: the KV cache gives the uncached sampler's tokens, batches give each
prompt's own tokens, the window rule, top-k / top-p, and ``plait generate``'s bad input."""

import pytest
import torch

from plait import cli
from plait import config as C
from plait.models import build, generate
from plait.models.gpt import Decoding
from plait.models.sampling import (
    LocalRunner,
    Rows,
    SampleOptions,
    choose,
    filter_logits,
    full_mask,
    sample,
    sample_local,
    window_start,
)

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[1, 2, 3], list(range(40, 61)), [7], list(range(100, 140))]  # the last one longer than seq_len


def tiny(flavour: str = "gpt2", kv_heads: int = 0, dtype=torch.float64, **extra):
    """A 2-layer model of 16 positions, seeded; llama with kv_heads < heads is grouped-query."""
    sets = [f"model.flavour={flavour}", "model.layers=2", "model.hidden=32", "model.heads=4",
            f"model.kv_heads={kv_heads}", "model.seq_len=16", *(f"model.{k}={v}" for k, v in extra.items())]
    cfg = C.resolve(C.load(None, sets), 1)
    torch.manual_seed(0)
    model, desc = build(cfg.model)
    return model.to(dtype).eval(), desc


class Counting(LocalRunner):
    """A one-process runner that records what kind of forward each step ran."""

    def __init__(self, model, opts):
        super().__init__(model, opts)
        self.kinds = []

    def forward(self, tokens, decoding):
        c = decoding.cache
        kind = "uncached" if c is None else "refill" if decoding.rows is not None else \
            "prefill" if decoding.start == 0 else "decode"
        self.kinds.append(kind)
        return super().forward(tokens, decoding)


GREEDY = SampleOptions(max_tokens=40, temperature=0.0)


@pytest.mark.parametrize("flavour, kv_heads", [("gpt2", 0), ("llama", 2)])
def test_kv_cache_gives_the_uncached_tokens_batched_and_across_window_restarts(flavour, kv_heads):
    model, _ = tiny(flavour, kv_heads)
    runner = Counting(model, GREEDY)
    cached = sample(runner, PROMPTS, GREEDY, 16, cached=True)
    uncached = sample_local(model, PROMPTS, GREEDY, cached=False)
    assert cached == uncached
    assert [len(r) for r in cached] == [len(p) + 40 for p in PROMPTS]
    # 40 new tokens at 16 positions: windows restart (refills) and the 32 slots run out (a second prefill)
    assert runner.kinds.count("prefill") >= 2 and "refill" in runner.kinds and "decode" in runner.kinds
    alone = [sample_local(model, [p], GREEDY)[0] for p in PROMPTS]
    assert alone == cached
    assert len({tuple(r[-40:]) for r in cached}) == len(PROMPTS)  # the rows differ: a real test


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_the_generation_forward_equals_the_training_forward(flavour):
    model, _ = tiny(flavour, 2 if flavour == "llama" else 0)
    x = torch.randint(0, 256, (3, 16))
    valid = torch.ones_like(x, dtype=torch.bool)
    out = model.decode(x, Decoding(torch.arange(16).expand(3, 16), full_mask(valid)))
    torch.testing.assert_close(out, model(x)[:, -1], rtol=0, atol=1e-12)


def test_left_padding_changes_nothing_for_a_shorter_row():
    model, _ = tiny("llama", 2)
    rows = Rows([[5, 6, 7], [1, 2, 3, 4, 5, 6]], 16)
    tokens, positions, valid = rows.pack()
    assert tokens[0].tolist() == [0, 0, 0, 5, 6, 7] and positions[0].tolist() == [0, 0, 0, 0, 1, 2]
    batched = model.decode(tokens, Decoding(positions, full_mask(valid)))
    alone = model(torch.tensor([[5, 6, 7]]))[:, -1]
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-12)


def test_window_rule_restarts_from_the_last_half():
    assert window_start(16, 0, 16) == 0  # 16 tokens fit 16 positions
    assert window_start(17, 0, 16) == 9  # 17 would not: the last 8 stay
    assert window_start(20, 9, 16) == 9
    assert window_start(26, 9, 16) == 18
    assert window_start(40, 0, 16) == 32  # a long prompt starts from its last half window
    assert window_start(3, 0, 1) == 2  # seq_len 1: a window of one token


def test_seeded_sampling_is_reproducible_and_cache_independent():
    model, _ = tiny()
    opts = SampleOptions(max_tokens=30, temperature=1.0, top_k=20, top_p=0.9)
    a = sample_local(model, PROMPTS, opts, seed=7)
    assert a == sample_local(model, PROMPTS, opts, seed=7, cached=False)
    assert a != sample_local(model, PROMPTS, opts, seed=8)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    assert torch.isfinite(filter_logits(logits, top_k=2)).nonzero()[:, 1].tolist() == [1, 3]
    probs = torch.softmax(logits, -1)[0]  # 0.64, 0.23, 0.09, ... for tokens 1, 3, 2
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).nonzero()[:, 1].tolist() == [1]
    assert torch.isfinite(filter_logits(logits, top_p=float(probs[1] + 0.01))).nonzero()[:, 1].tolist() == [1, 3]
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.999)).sum() == 3
    assert torch.equal(filter_logits(logits), logits)
    gen = torch.Generator().manual_seed(0)
    many = logits.expand(4000, 5)
    drawn = choose(many, SampleOptions(temperature=1.0, top_k=2), gen)
    assert set(drawn.tolist()) == {1, 3}
    share = (drawn == 1).double().mean()
    assert abs(share - probs[1] / (probs[1] + probs[3])) < 0.03  # renormalised over the kept two
    assert choose(many[:3], SampleOptions(temperature=0.0)).tolist() == [1, 1, 1]
    assert set(choose(many, SampleOptions(temperature=1.0, top_p=0.5), gen).tolist()) == {1}  # after temperature


def test_the_old_generate_keeps_working():
    model, _ = tiny(dtype=torch.float32)
    model.train()
    out = generate(model, torch.tensor([1, 2, 3]), 40, 16, generator=torch.Generator().manual_seed(0), pad_to=4)
    assert out.shape == (43,) and out[:3].tolist() == [1, 2, 3] and model.training
    greedy = generate(model.double(), torch.tensor([1, 2, 3]), 40, 16, temperature=0.0)
    assert greedy.tolist() == sample_local(model, [[1, 2, 3]], GREEDY)[0]


@pytest.mark.parametrize("opts, field", [
    (SampleOptions(max_tokens=0), "--max-tokens"), (SampleOptions(temperature=-1), "--temperature"),
    (SampleOptions(top_k=-1), "--top-k"), (SampleOptions(top_p=0), "--top-p"),
])
def test_bad_options_are_one_line(opts, field):
    with pytest.raises(C.ConfigError, match=field):
        opts.check()


# ------------------------------------------------------------------------- the command, model loading stubbed


@pytest.fixture
def fake_ckpt(monkeypatch, tmp_path):
    """``--ckpt`` of a fresh tiny float32 model (no checkpoint is read)."""
    import plait.generate as G

    model, desc = tiny(dtype=torch.float32, vocab=257)
    monkeypatch.setattr(G, "load_model", lambda path: (None, model, desc))
    return str(tmp_path)


def test_generate_streams_one_prompt_and_separates_a_batch(fake_ckpt, tmp_path, capsys):
    args = ["generate", "--ckpt", fake_ckpt, "--max-tokens", "20", "--temperature", "0", "--dtype", "float64"]
    assert cli.main([*args, "--prompt", "def f("]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f(") and "20 new tokens" in err and "KV cache" in err
    assert cli.main([*args, "--prompt", "def f(", "--no-cache"]) == 0
    assert capsys.readouterr().out == out
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\n\nimport os\n")
    assert cli.main([*args, "--prompts", str(prompts)]) == 0
    out2 = capsys.readouterr().out
    assert "=== 1/2 ===\ndef f(" in out2 and "=== 2/2 ===\nimport os" in out2


@pytest.mark.parametrize("extra, field", [
    (["--prompt", ""], "--prompt"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
    (["--prompt", "x", "--tp", "3"], "--tp"),
    (["--prompt", "x", "--pp", "3"], "--pp"),
    (["--prompt", "x", "--tp", "2", "--nproc", "3"], "--nproc"),
])
def test_bad_input_is_one_line_exit_2(fake_ckpt, capsys, extra, field):
    assert cli.main(["generate", "--ckpt", fake_ckpt, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"plait: error: {field}=" in err, err


def test_a_missing_checkpoint_is_one_line(capsys):
    assert cli.main(["generate", "--ckpt", "/nonexistent/run", "--prompt", "x"]) == 2
    assert "plait: error: --ckpt='/nonexistent/run'" in capsys.readouterr().err
