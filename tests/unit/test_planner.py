"""The planner's search and hardware profiles (no processes): what can run, what is recommended."""

import json

import pytest

from plait import config as C
from plait.errors import ConfigError
from plait.plan import cost, hardware, search
from plait.plan.cost import Job, Layout

GPT3 = C.ModelConfig(flavour="gpt2", layers=96, hidden=12288, heads=96, kv_heads=96, ffn_hidden=49152, vocab=51200,
                     seq_len=2048)
SMALL = C.ModelConfig(flavour="llama", layers=8, hidden=1024, heads=16, kv_heads=4, ffn_hidden=2816, vocab=32000,
                      seq_len=1024)
A100 = hardware.PRESETS["dgx-a100-80gb"]


def test_collective_times_are_the_ring_formulas():
    link = A100.link("all_reduce", 8)
    s = 1e9
    assert A100.collective("all_reduce", s, 8) == pytest.approx(link.latency_s + 2 * 7 / 8 * s / link.busbw)
    link = A100.link("all_gather", 8)
    assert A100.collective("all_gather", s, 8) == pytest.approx(link.latency_s + 7 / 8 * s / link.busbw)
    assert A100.collective("all_reduce", s, 1) == 0.0
    inter = A100.link("all_reduce", 16, across_nodes=True)
    assert inter.busbw < link.busbw


def test_a_profile_survives_json_and_rates_interpolate():
    again = hardware.Hardware.from_json(A100.to_json())
    assert again == A100
    lo, hi = A100.matmul["bf16"][0], A100.matmul["bf16"][1]
    mid = A100.rate("bf16", (lo[0] * hi[0]) ** 0.5)
    assert lo[1] < mid < hi[1] and mid == pytest.approx((lo[1] * hi[1]) ** 0.5)
    assert A100.rate("bf16", 1.0) == lo[1] and A100.rate("bf16", 1e20) == A100.matmul["bf16"][-1][1]


def test_a_profile_without_collectives_says_so():
    one = hardware.Hardware(**{**A100.__dict__, "intra": {}, "inter": {}, "name": "one-gpu"})
    with pytest.raises(ConfigError) as e:
        one.collective("all_reduce", 1e6, 2)
    assert "--cluster" in str(e.value) and "no all_reduce measurements" in str(e.value)
    assert one.collective("all_reduce", 1e6, 1) == 0.0  # one device needs none


def test_bad_profile_and_unknown_cluster_are_one_line(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"name": "x"}))
    for spec in (str(bad), "no-such-cluster"):
        with pytest.raises(ConfigError) as e:
            hardware.load(spec)
        assert "--cluster" in str(e.value) and "\n" not in str(e.value)


def test_never_recommends_what_cannot_run():
    job = Job(SMALL, 64, act="bf16", matmul="bf16")
    ranked = search.search(job, 16, A100)
    assert ranked
    for e in ranked:
        l = e.layout
        assert e.fits and e.mem_bytes <= A100.memory_bytes
        assert l.tp <= A100.devices_per_node and SMALL.heads % l.tp == 0 and SMALL.kv_heads % l.tp == 0
        assert 64 % (l.dp * l.micro_batch) == 0 and l.dp * l.tp * l.pp == 16
    times = [e.step_time_s for e in ranked]
    assert times == sorted(times)


def test_named_layouts_that_cannot_run_come_back_with_the_reason():
    job = Job(GPT3, 1536, act="bf16", matmul="bf16")
    cases = {
        Layout(dp=256, tp=16): "spans nodes",
        Layout(dp=4096): "not a multiple of dp x micro_batch",
        Layout(dp=1, tp=8, pp=512): "need as many layers",
        Layout(dp=512, tp=8, micro_batch=2): "not a multiple",
        Layout(dp=2, tp=8): "not the 4096 devices",
    }
    for layout, why in cases.items():
        e = search.evaluate(job, layout, 4096, A100)
        assert not e.fits and why in e.reason, (layout, e.reason)
    e = search.evaluate(job, Layout(dp=512, tp=8, micro_batch=1), 4096, A100)  # 175B with plain dp: too big
    assert not e.fits and "GiB per device" in e.reason and e.mem_bytes > A100.memory_bytes


def test_keys_left_out_are_chosen_by_the_planner():
    job = Job(SMALL, 64, act="bf16", matmul="bf16")
    e = search.complete({"tp": 2, "zero": 1}, job, 16, A100)
    assert e.fits and e.layout.tp == 2 and e.layout.zero == 1
    best = search.search(job, 16, A100)
    assert e.step_time_s >= best[0].step_time_s


def test_the_winner_is_explained_and_runners_up_say_why_they_lose():
    job = Job(SMALL, 64, act="bf16", matmul="bf16")
    ranked = search.search(job, 8, A100)
    lines = search.explain(ranked, 4)
    assert lines[0].startswith(f"winner {search.name(ranked[0].layout)}") and "bound by" in lines[0]
    assert len(lines) == 4 and all("slower, mostly" in line for line in lines[1:])


def test_more_memory_pressure_moves_the_plan_to_sharding():
    """With 8 GB devices the small model's plain replicas no longer fit; the winner shards or splits."""
    small = hardware.Hardware(**{**A100.__dict__, "memory_bytes": 2 * 2**30, "name": "tiny"})
    job = Job(SMALL, 64, act="bf16", matmul="bf16")
    plain = search.evaluate(job, Layout(dp=8, micro_batch=8), 8, small)
    assert not plain.fits
    best = search.search(job, 8, small)[0]
    assert best.fits and (best.layout.zero or best.layout.tp > 1 or best.layout.pp > 1
                          or best.layout.recompute != "none" or best.layout.micro_batch < 8)


def test_a_175b_model_over_4096_devices_plans_and_fits():
    job = Job(GPT3, 1536, act="bf16", matmul="bf16")
    best = search.search(job, 4096, A100)[0]
    assert best.fits and best.layout.tp <= 8 and best.layout.pp > 1
    assert 0 < best.mfu < 1


def test_memory_terms_add_up():
    job = Job(SMALL, 64)
    layout = Layout(dp=4, zero=3, micro_batch=4)
    m = cost.memory(job, layout, 0)
    psi = cost.rank_params(SMALL, layout, 0)
    assert m["params"] == psi * 4 / 4 and m["grads"] == psi * 4 / 4 and m["optimizer"] == psi * 8 / 4
    assert m["activations"] == cost.activation_bytes(SMALL, layout, 0, 4, "fp32", 64 // 4 * SMALL.seq_len)
