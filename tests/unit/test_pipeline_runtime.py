"""The pipeline runtime's memory rule, without processes: a sent stage output keeps only its graph."""

import pytest
import torch

from plait.parallel.pipeline.runtime import _drop_data
from plait.parallel.pipeline.zero_bubble import input_grad
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


def _grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("last", [False, True])
def test_zero_bubble_split_equals_one_backward(flavour, last):
    model = model_for(flavour)
    tokens = torch.randint(0, 256, (2, 16))
    params = [p for b in model.blocks for p in b.parameters()]
    params += [*model.norm.parameters(), model.lm_head.weight] if last else []
    x0 = model.embed(tokens).detach()

    def run(split):
        model.zero_grad()
        inp = x0.clone().requires_grad_()
        out = inp
        for block in model.blocks:
            out = block(out)
        if last:
            out = torch.nn.functional.cross_entropy(model.head(out).flatten(0, 1), tokens.flatten())
        grad = None if last else torch.ones_like(out)
        if not split:
            out.backward(grad)
            return inp.grad, _grads(params)
        g, weight_grad = input_grad(out, grad, inp, params)
        assert all(p.grad is None for p in params)  # I leaves the weights alone
        weight_grad()
        return g, _grads(params)

    (g_ref, ref), (g, got) = run(False), run(True)
    assert torch.equal(g, g_ref)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(got, ref))


def test_zero_bubble_split_counts_a_reused_weight_once():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    x0 = torch.randn(3, 4, dtype=torch.float64)

    def run(split):
        w.grad = b.grad = None
        inp = x0.clone().requires_grad_()
        out = torch.tanh(torch.tanh(inp @ w + b) @ w)  # w at two depths: the fallback path
        grad = torch.ones_like(out)
        if not split:
            out.backward(grad)
            return inp.grad, w.grad.clone(), b.grad.clone()
        g, weight_grad = input_grad(out, grad, inp, [w, b])
        weight_grad()
        return g, w.grad.clone(), b.grad.clone()

    for a, c in zip(run(False), run(True)):
        assert torch.allclose(a, c, rtol=0, atol=1e-14)
