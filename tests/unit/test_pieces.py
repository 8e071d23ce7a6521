"""Checkpoint pieces: a flat range of a tensor as rectangles, and a rank's part as pieces of the whole."""

import random

import pytest
import torch

from plait.checkpoint.pieces import Place, boxes_of, flat_boxes


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 3), (1,), (5, 6), ()])
def test_flat_boxes_cover_a_range_in_order(shape):
    n = torch.Size(shape).numel()
    whole = torch.arange(n).view(shape)
    rng = random.Random(0)
    for _ in range(60):
        a = rng.randrange(n)
        b = rng.randrange(a, n + 1)
        boxes = list(flat_boxes(shape, a, b))
        assert len(boxes) <= 2 * max(len(shape) - 1, 0) + 1
        seen = a
        for off, size, lo, hi in boxes:
            assert lo == seen
            seen = hi
            piece = whole[tuple(slice(o, o + s) for o, s in zip(off, size))]
            assert torch.equal(piece.reshape(-1), torch.arange(lo, hi))
        assert seen == b or a == b


def test_a_zero_slice_of_a_vocab_shard_lands_in_the_whole_tensor_without_padding():
    """tp rank 1 of 2 holds rows 4..7 of a vocabulary of 7 padded to 8; a ZeRO slice of its shard
    from element 5 to the end is the last element of whole row 5 and row 6 (the padding row dropped)."""
    whole = torch.arange(7 * 3.0).view(7, 3)
    shard = torch.cat([whole[4:], torch.zeros(1, 3)])  # rows 4, 5, 6 and one row of padding
    seg = shard.reshape(-1)[5:]
    place = Place("w", seg, 5, (4, 3), (0, 7, 1), True)
    got = torch.full((7, 3), -1.0)
    for box in boxes_of(place):
        got[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes))] = box.view(seg)
    assert torch.equal(got[6], whole[6]) and got[5, 2] == whole[5, 2]
    assert (got[:5] == -1).all() and (got[5, :2] == -1).all()
    assert all(b.offsets[0] + b.sizes[0] <= 7 for b in boxes_of(place))
