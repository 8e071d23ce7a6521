"""Balanced pipeline stages: the head of a large vocabulary gets a lighter stage."""

import pytest

from plait import config as C
from plait.models.gpt import layer_costs
from plait.parallel.pipeline.partition import balanced_split, blocks_of_stages, stage_costs


def model(**kw) -> C.ModelConfig:
    sets = [f"model.{k}={v}" for k, v in kw.items()]
    return C.resolve(C.load(None, sets), 1).model


def test_uniform_costs_split_evenly():
    assert balanced_split(8, 4, (0.0, 1.0, 0.0)) == [2, 2, 2, 2]
    assert balanced_split(7, 3, (0.0, 1.0, 0.0)) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])


def test_heavy_head_gets_fewer_blocks_and_balance_improves():
    m = model(layers=12, hidden=128, heads=4, vocab=32768)
    tokens = 8 * 128
    embed, block, head = layer_costs(m, tokens)
    assert head > 3 * block  # the output layer alone outweighs several blocks
    costs = layer_costs(m, tokens)
    uniform = stage_costs(blocks_of_stages([6, 6]), costs)
    balanced_blocks = blocks_of_stages(balanced_split(m.layers, 2, costs))
    balanced = stage_costs(balanced_blocks, costs)
    assert max(uniform) / min(uniform) >= 1.5
    assert max(balanced) / min(balanced) < max(uniform) / min(uniform)
    assert len(balanced_blocks[-1]) < len(balanced_blocks[0])


@pytest.mark.parametrize("layers, stages", [(4, 4), (8, 3), (12, 5), (6, 2)])
def test_split_covers_every_block_once_in_order(layers, stages):
    m = model(layers=layers)
    blocks = blocks_of_stages(balanced_split(layers, stages, layer_costs(m, 1024)))
    assert [b for s in blocks for b in s] == list(range(layers))
    assert all(len(s) >= 1 for s in blocks)


def test_counts_become_contiguous_runs_of_blocks():
    assert blocks_of_stages([1, 3]) == [[0], [1, 2, 3]]
