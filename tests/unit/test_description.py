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


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_plaits_own_models_describe_themselves(flavour):
    cfg = C.resolve(C.load(None, [f"model.flavour={flavour}", "model.layers=2", "model.hidden=32",
                                  "model.heads=4", "model.seq_len=16"]), 1)
    model, desc = build(cfg.model)
    tokens = torch.randint(0, 256, (2, 16))
    check(desc, model, tokens)
    assert torch.equal(compose(desc, model, tokens), model(tokens))  # the description is the model's forward
    assert bool(desc.tied) == (flavour == "gpt2")
