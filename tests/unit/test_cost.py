"""The planner's cost model reproduces its formulas exactly (docs/planner.md)."""

import itertools

import pytest

from plait import config as C
from plait.models import build
from plait.models.gpt import num_params
from plait.plan import cost
from plait.plan.cost import Layout


def _model(*overrides):
    return C.resolve(C.load(None, list(overrides)), 1).model


@pytest.mark.parametrize("overrides", [
    ("model.flavour=gpt2",), ("model.flavour=llama",), ("model.flavour=llama", "model.kv_heads=2"),
    ("model.flavour=gpt2", "model.ffn_hidden=100", "model.vocab=300"), ("model.flavour=llama", "model.layers=3"),
    ("model.flavour=bert",), ("model.flavour=bert", "model.vocab=300", "model.type_vocab=3"),
])
def test_parameter_count_is_the_built_models(overrides):
    m = _model(*overrides)
    assert cost.params(m).total == num_params(build(m)[0])


def test_gpt2_parameters_are_narayanans_plus_the_final_norm():
    m = _model("model.flavour=gpt2", "model.hidden=256", "model.heads=8", "model.ffn_hidden=1024", "model.layers=6")
    assert cost.params(m).total == pytest.approx(cost.narayanan_params(m) + 2 * m.hidden, rel=1e-15)


def test_rank_parameters_add_up_to_the_model_without_tensor_parallel():
    m = _model("model.flavour=llama", "model.layers=6")
    for p in (1, 2, 3):
        layout = Layout(pp=p)
        assert sum(cost.rank_params(m, layout, s) for s in range(p)) == cost.params(m).total
    m = _model("model.flavour=gpt2", "model.layers=4")  # tied: the last stage holds a copy under pp
    two = sum(cost.rank_params(m, Layout(pp=2), s) for s in range(2))
    assert two == cost.params(m).total + m.vocab * m.hidden


@pytest.mark.parametrize("recompute", [False, True])
def test_flops_are_narayanans(recompute):
    m = _model("model.flavour=gpt2", "model.hidden=256", "model.heads=8", "model.ffn_hidden=1024", "model.layers=6",
               "model.seq_len=512", "model.vocab=1000")
    tokens = 4 * m.seq_len
    ours = tokens * cost.flops_per_token(m, "full" if recompute else "none")
    assert ours == pytest.approx(cost.narayanan_flops(m, tokens, recompute), rel=1e-12)


def test_selective_recomputation_adds_the_attention_scores_forward():
    m = _model("model.flavour=llama")
    extra = cost.flops_per_token(m, "selective") - cost.flops_per_token(m, "none")
    assert extra == m.layers * 4 * m.seq_len * m.hidden


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_zero_bytes_are_the_papers(d):
    psi = 7.5e9
    table = {0: 16 * psi, 1: 4 * psi + 12 * psi / d, 2: 2 * psi + 14 * psi / d, 3: 16 * psi / d}
    for zero, want in table.items():
        assert sum(cost.state_bytes(psi, zero, d, "mixed").values()) == pytest.approx(want, rel=1e-15)
    assert sum(cost.state_bytes(psi, 0, d).values()) == 16 * psi  # plait's fp32 AdamW
    assert sum(cost.state_bytes(psi, 3, d).values()) == pytest.approx(16 * psi / d)


def test_korthikantis_table_two():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    assert cost.korthikanti_layer_bytes(s, b, h, a) == sbh * (34 + 5 * a * s / h)
    assert cost.korthikanti_layer_bytes(s, b, h, a, t) == sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert cost.korthikanti_layer_bytes(s, b, h, a, t, sp=True) == sbh * (34 / t + 5 * a * s / (h * t))
    assert cost.korthikanti_layer_bytes(s, b, h, a, t, recompute="selective") == sbh * (10 + 24 / t)
    assert cost.korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="selective") == 34 * sbh / t
    assert cost.korthikanti_layer_bytes(s, b, h, a, t, sp=True, recompute="full") == 2 * sbh


def test_activation_elements_of_plaits_blocks():
    m = _model("model.flavour=gpt2", "model.hidden=128", "model.heads=4", "model.ffn_hidden=512")
    h, a = m.hidden, m.heads
    assert cost.layer_elements(m) == 16 * h + a + 4
    assert cost.layer_elements(m, 2) == 4 * h + 12 * h / 2 + a / 2 + 4
    assert cost.layer_elements(m, 2, sp=True) == 2 * h + 14 * h / 2 + (a + 4) / 2
    assert cost.layer_elements(m, 2, recompute="selective") == 4 * h + 12 * h / 2 + 4
    assert cost.layer_elements(m, 2, sp=True, recompute="full") == h / 2
    assert cost.layer_elements(m, recompute="full") == h


PIPES = [(p, mb, v) for p, mb, v in itertools.product((2, 3, 4, 8), (4, 8, 16, 24), (1, 2, 3)) if mb >= p]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb"])
def test_closed_forms_equal_the_schedule_simulator(schedule, monkeypatch):
    for p, m, v in PIPES:
        interleaved = schedule == "interleaved"
        if interleaved != (v > 1) or (interleaved and m % p):
            continue
        for tf, tb, tw in ((1.0, 2.0, 1.0), (1.0, 3.0, 1.5), (2.0, 3.0, 1.0)):
            if schedule == "zb" and tw != tb / 2:
                continue  # zero bubble's closed form is for I and W of equal length
            monkeypatch.setattr(cost, "SIMULATE_UP_TO", 10**9)
            sim = (cost.pipeline_time(schedule, p, m, v, tf, tb, tw), cost.inflight(schedule, p, m, v))
            monkeypatch.setattr(cost, "SIMULATE_UP_TO", 0)
            closed = (cost.pipeline_time(schedule, p, m, v, tf, tb, tw), cost.inflight(schedule, p, m, v))
            assert closed[0] == pytest.approx(sim[0], rel=1e-12), (p, m, v, tf, tb, tw)
            assert closed[1] == sim[1], (p, m, v)


def test_the_interleaved_first_stage_holds_narayanans_factor_more():
    p, v, layers = 4, 2, 16
    held = cost.inflight("interleaved", p, 16, v)[0] * layers / (p * v)
    assert held == layers * (1 + (p - 1) / (p * v))


@pytest.mark.parametrize("p,m,v", [(4, 8, 1), (4, 16, 1), (8, 32, 1), (4, 8, 2), (8, 16, 4)])
def test_bubble_fractions_are_the_papers(p, m, v):
    """GPipe and 1F1B idle (p-1)/(m+p-1) of the step; interleaved (p-1)/(v m + p - 1) (Narayanan et
    al. 2021), with t_F = 1 and t_B = 2 and free transfers."""
    ideal = m * 3.0
    for schedule in (("interleaved",) if v > 1 else ("gpipe", "1f1b")):
        span = cost.pipeline_time(schedule, p, m, v, 1.0, 2.0, 1.0)
        want = (p - 1) / (m + p - 1) if v == 1 else (p - 1) / (v * m + p - 1)
        assert 1 - ideal / span == pytest.approx(want, rel=1e-12), schedule


def test_a_taggers_output_stage_costs_by_its_labels():
    """Balancing a tagger's pipeline weighs its classifier by labels, not a vocabulary."""
    from plait.models.bert import Bert

    m = _model("model.flavour=bert", "model.vocab=30000")
    mlm, tagger = Bert(m, head="mlm").describe().costs(4096), Bert(m, head="token", labels=9).describe().costs(4096)
    assert mlm[:2] == tagger[:2] and tagger[2] == mlm[2] * 9 / 30000
    assert Bert(m, head="none").describe().costs(4096)[2] == 0
