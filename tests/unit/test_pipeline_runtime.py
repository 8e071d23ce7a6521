"""The pipeline runtime's memory rule, without processes: a sent stage output keeps only its graph."""

import pytest
import torch

from plait.parallel.pipeline.runtime import _drop_data
from tests.unit.test_model import model_for


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("first", [True, False])
def test_a_sent_stage_output_frees_its_data_and_backward_is_unchanged(flavour, first):
    model = model_for(flavour)
    tokens = torch.randint(0, 256, (2, 16))

    def stage_output():
        model.zero_grad()
        inp = model.embed(tokens).detach().requires_grad_()
        x = model.embed(tokens) if first else inp
        return inp, model.blocks[0](x)

    grad = torch.randn(2, 16, 32, dtype=torch.float64)
    inp, out = stage_output()
    out.backward(grad)
    want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    want_inp = None if first else inp.grad.clone()

    inp, out = stage_output()
    _drop_data(out)
    assert out.shape == (2, 16, 32) and out.untyped_storage().nbytes() == 8  # one float64 left
    out.backward(grad)
    got = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert first or torch.equal(inp.grad, want_inp)


def test_an_output_whose_backward_needs_it_is_kept():
    x = torch.randn(4, requires_grad=True)
    out = torch.exp(x)  # exp's backward multiplies by its own output
    _drop_data(out)
    assert out.untyped_storage().nbytes() == 4 * 4
