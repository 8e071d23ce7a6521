import pytest
import torch
import torch.nn.functional as F

from plait import config as C
from plait.models import build_model, generate, num_params
from plait.models.gpt import apply_rope, rope_tables


def model_for(flavour, **kw):
    sets = [f"model.flavour={flavour}", "model.layers=2", "model.hidden=32", "model.heads=4", "model.seq_len=16"]
    sets += [f"model.{k}={v}" for k, v in kw.items()]
    cfg = C.resolve(C.load(None, sets), 1)
    torch.manual_seed(0)
    return build_model(cfg.model).double()


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_logits_shape_and_causality(flavour):
    model = model_for(flavour)
    x = torch.randint(0, 256, (3, 16))
    y = model(x)
    assert y.shape == (3, 16, 256)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256  # change the future only
    assert torch.allclose(model(x2)[:, :10], y[:, :10])
    assert not torch.allclose(model(x2)[:, 10:], y[:, 10:])


def test_gpt2_ties_embeddings_and_llama_does_not():
    g, l = model_for("gpt2"), model_for("llama")
    assert g.lm_head.weight is g.tok_emb.weight
    assert l.lm_head.weight is not l.tok_emb.weight
    assert num_params(g) < sum(p.numel() for p in g.state_dict().values())  # tied counted once


def test_grouped_query_attention_shapes():
    model = model_for("llama", kv_heads=2)
    attn = model.blocks[0].attn
    assert attn.wk.weight.shape == (2 * 8, 32) and attn.wq.weight.shape == (32, 32)
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)


def test_gqa_equals_full_attention_with_repeated_heads():
    """A 2-kv-head model equals a 4-kv-head model whose k/v heads are the 2 repeated."""
    gqa, full = model_for("llama", kv_heads=2), model_for("llama", kv_heads=4)
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            k = sd[f"blocks.{i}.attn.{w}.weight"].view(2, 8, 32)
            sd[f"blocks.{i}.attn.{w}.weight"] = k.repeat_interleave(2, dim=0).reshape(32, 32)
    full.load_state_dict(sd)
    x = torch.randint(0, 256, (2, 16))
    assert torch.allclose(gqa(x), full(x), atol=1e-12)


def test_rope_preserves_norm_and_relative_positions():
    cos, sin = rope_tables(16, 8)
    q = torch.randn(1, 1, 16, 8, dtype=torch.float64)
    rq = apply_rope(q, cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1))
    same = q[:, :, :1].expand(1, 1, 16, 8)  # one vector at every position
    r = apply_rope(same, cos, sin)[0, 0]
    assert torch.allclose(r[3] @ r[5], r[7] @ r[9])  # dot product depends on the offset only


def test_training_step_reduces_loss():
    model = model_for("gpt2")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 256, (4, 17))
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_generate_appends_tokens_and_respects_context():
    model = model_for("gpt2")
    out = generate(model, torch.tensor([1, 2, 3]), 20, 16, generator=torch.Generator().manual_seed(0), pad_to=4)
    assert out.shape == (23,) and out[:3].tolist() == [1, 2, 3]
    assert model.training
