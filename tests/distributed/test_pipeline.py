"""Pipeline parallel against one process: every schedule, and composed with dp and tp (float64)."""

import pytest

from plait.verify import parse_layouts, run_verify
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(300)

LAYOUTS = [
    "pp=2,schedule=gpipe", "pp=2,schedule=1f1b", "pp=4,schedule=1f1b",
    "pp=2,schedule=interleaved,virtual_stages=2", "pp=2,schedule=zb",
    "pp=2,dp=2", "pp=2,tp=2",
]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_schedules_and_compositions_match_one_process(corpus_file, flavour):
    base = tiny_config(corpus_file, f"model.flavour={flavour}", "model.layers=4", "train.dtype=float64",
                       "train.steps=3")
    rows = run_verify(base, parse_layouts(";".join(LAYOUTS)), tol=1e-9, progress=False)
    assert [r["nproc"] for r in rows] == [2, 2, 4, 2, 2, 4, 4]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


@pytest.mark.parametrize("layout", [
    "pp=2,stage_layers=1:3", "pp=2,dp=2,schedule=interleaved,virtual_stages=2,micro_batch=2",
    "pp=2,tp=2,sequence_parallel=true,schedule=zb", "pp=2,micro_batch=1,schedule=interleaved,virtual_stages=2",
])
def test_more_pipeline_layouts(corpus_file, layout):
    base = tiny_config(corpus_file, "model.layers=4", "train.dtype=float64", "train.steps=3", "model.vocab=257")
    rows = run_verify(base, parse_layouts(layout), tol=1e-9, progress=False)
    assert rows[0]["ok"], rows
