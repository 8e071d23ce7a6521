"""A model description that does not fit its model stops with one line naming the part and why."""

import pytest
import torch
from torch import nn

from plait import config as C
from plait.errors import DescriptionError
from plait.models import build, check, compose
from plait.models.description import ModelDescription, TensorParallelPlan


class Toy(nn.Module):
    def __init__(self, widths=(8, 8)):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(nn.Linear(8, w) for w in widths)
        self.out = nn.Linear(widths[-1], 16)

    def embed(self, tokens):
        return self.emb(tokens)

    def head(self, h):
        return self.out(h)

    def forward(self, tokens):
        return compose(describe(), self, tokens)


def describe(**kw) -> ModelDescription:
    fields = {"embed": Toy.embed, "blocks": "layers", "head": Toy.head, "hidden": 8, "input_modules": ("emb",),
              "output_modules": ("out",)}
    return ModelDescription(**{**fields, **kw})


SAMPLE = torch.zeros(2, 5, dtype=torch.long)


def test_a_fitting_description_passes_and_composes_the_forward():
    model = Toy()
    check(describe(), model, SAMPLE)
    assert compose(describe(), model, SAMPLE).shape == (2, 5, 16)


@pytest.mark.parametrize("model, desc, part", [
    (Toy((8, 12)), describe(), r"blocks\[1\]=\(2, 5, 12\): a block must map hidden \(2, 5, 8\)"),
    (Toy(), describe(hidden=6), r"embed=\(2, 5, 8\): the input stage must give"),
    (Toy(), describe(blocks="stack"), r"blocks='stack': must name a non-empty nn.ModuleList"),
    (Toy(), describe(output_modules=()), r"parameters='out.weight': belongs to no piece"),
    (Toy(), describe(input_modules=("emb", "pos")), r"input_modules='pos': names no submodule"),
    (Toy(), describe(tp=TensorParallelPlan({"layers.*.proj": "column"})),
     r"tp.styles\['layers.\*.proj'\]='column': the pattern matches no module"),
    (Toy(), describe(tp=TensorParallelPlan({"layers.*": "diagonal"})), r"valid styles: column, row"),
    (Toy(), describe(tied=(("out.weight", "emb.bias"),)), r"tied='out.weight=emb.bias': both names"),
])
def test_a_wrong_description_names_the_part_and_the_reason(model, desc, part):
    with pytest.raises(DescriptionError, match=part) as e:
        check(desc, model, SAMPLE)
    assert str(e.value).startswith("model description ") and "\n" not in str(e.value)


class Shared(Toy):
    """The output layer reuses the embedding's weight; a bare parameter hangs on the model itself."""

    def __init__(self, bare: bool = False):
        super().__init__()
        self.out = nn.Linear(8, 16, bias=False)
        self.out.weight = self.emb.weight
        if bare:
            self.scale = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize("model, desc, part", [
    (Shared(), describe(), r"tied='emb.weight=out.weight': these names are one parameter: declare the pair"),
    (Shared(), describe(tied=(("out.weight", "emb.weight"), ("out.weight", "emb.weight"))),
     r"plait shares at most one parameter"),
    (Toy(), describe(output_modules=("out", "emb")), r"output_modules='emb': is in input_modules too"),
    (Shared(bare=True), describe(tied=(("out.weight", "emb.weight"),)),
     r"parameters='scale': belongs to no piece: hold it in a submodule"),
])
def test_sharing_and_ownership_are_stated(model, desc, part):
    with pytest.raises(DescriptionError, match=part):
        check(desc, model, SAMPLE)


def test_a_declared_tie_passes():
    check(describe(tied=(("out.weight", "emb.weight"),)), Shared(), SAMPLE)


def test_optimizer_zero_grad_is_caught_before_a_silent_wrong_step():
    from plait.parallel.data import DataParallel

    model = Toy()
    strand = DataParallel(model, None)  # no process group: dp = 1
    model(SAMPLE).sum().backward()
    strand.finish()
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()  # set_to_none: detaches the bucket views
    model(SAMPLE).sum().backward()
    with pytest.raises(RuntimeError, match="zero them with the parallel model's zero_grad"):
        strand.finish()


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_plaits_own_models_describe_themselves(flavour):
    cfg = C.resolve(C.load(None, [f"model.flavour={flavour}", "model.layers=2", "model.hidden=32",
                                  "model.heads=4", "model.seq_len=16"]), 1)
    model, desc = build(cfg.model)
    tokens = torch.randint(0, 256, (2, 16))
    check(desc, model, tokens)
    assert torch.equal(compose(desc, model, tokens), model(tokens))  # the description is the model's forward
    assert bool(desc.tied) == (flavour == "gpt2")
