"""``plait finetune --task token-classification``: a BERT tagger trained on CoNLL files, any layout.

The data is read and encoded once, before the processes start (``conll.py``). A step takes
``train.global_batch`` sentences (a fresh order every epoch), each dp rank its share in
micro-batches, and runs the parallel model's own training step: the same strands and schedules
as ``plait train`` (no checkpoints: a fine-tuning run is short; the tagger is saved at the end).
Targets sit on each word's first sub-token; the loss is the mean over every labelled word of the
step, whatever the layout and micro-batches (``ParallelModel.share``; vocabulary-parallel over the
labels under tp).

Evaluation (dev every ``train.eval_every`` steps, test at the end): each dp rank tags its share of
the sentences (forward only: tp's collectives, activations over pp, the labels' logits gathered
over tp and broadcast over pp), the predictions are gathered over dp, and rank 0 scores entities
with ``seqeval`` (CoNLL's rule: an entity counts when its type and both ends are right) and prints
the per-label table with micro, macro and weighted averages; it is also written to the run folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .. import comm
from ..config import RunConfig
from ..errors import ConfigError
from ..models.bert import Bert
from ..parallel.hybrid import ParallelModel, parallelize
from ..seeds import seed_for
from ..topology import Topology, build_groups, setup_logging
from ..train.metrics import MetricsWriter
from ..train.optim import build_optimizer, lr_at, set_lr
from ..train.trainer import autocast_context, autocast_dtype, fresh_model
from .conll import Encoded, Sentence, step_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaggingData:
    """What every rank needs: the label names, the sequence length, the splits' sentences and
    their model inputs."""

    labels: list[str]
    length: int
    splits: dict[str, list[Sentence]]
    encoded: dict[str, Encoded]


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    reports: dict[str, dict] = field(default_factory=dict)  # split (dev@step / test) -> seqeval's report
    params: dict[str, torch.Tensor] | None = None


def build_tagger(cfg: RunConfig, labels: list[str], device: torch.device) -> Bert:
    """The encoder with a token-classification head (``fresh_model``: the same on every rank, the
    encoder's weights from ``model.init_from``). The classifier starts fresh, unless the folder is
    a tagger for exactly these labels in this order (fine-tuning goes on)."""
    def make():
        model = Bert(cfg.model, head="token", labels=len(labels))
        return model, model.describe()

    same = bool(cfg.model.init_from) and _folder_labels(cfg.model.init_from) == labels
    return fresh_model(cfg, device, make, skip=() if same else ("classifier.",))[0]


def _folder_labels(folder: str) -> list[str]:
    names = json.loads((Path(folder).expanduser() / "config.json").read_text()).get("id2label") or {}
    return [names.get(str(i)) for i in range(len(names))]


class Tagger:
    """One rank's model, optimizer and data for fine-tuning; ``step()`` is one optimizer step."""

    def __init__(self, cfg: RunConfig, data: TaggingData, device: torch.device, groups):
        self.cfg, self.data, self.device, self.groups = cfg, data, device, groups
        self.coord = groups.coord
        self.encoded = data.encoded
        model = build_tagger(cfg, data.labels, device)
        sample = {"tokens": torch.zeros((1, data.length), dtype=torch.long, device=device)}
        self.pm: ParallelModel = parallelize(model, model.describe(), groups, cfg.parallel, seed=cfg.train.seed,
                                             tokens_per_step=cfg.train.global_batch // cfg.parallel.dp * data.length,
                                             sample=sample, recompute=cfg.train.recompute)
        self.optimizer = build_optimizer(self.pm.param_groups(cfg.train.weight_decay), cfg.train)
        torch.manual_seed(seed_for(cfg.train.seed, "dropout", dp_rank=self.coord.dp_rank, pp_rank=self.coord.pp_rank))
        self.amp = autocast_dtype(cfg, device)

    def _autocast(self):
        return autocast_context(self.device, self.amp)

    def _micro(self, enc: Encoded, rows) -> list:
        mb = self.cfg.train.micro_batch
        return [({k: v.to(self.device) for k, v in enc.inputs(rows[i:i + mb]).items()},
                 enc.targets[rows[i:i + mb]].to(self.device)) for i in range(0, len(rows), mb)]

    def step(self, step: int) -> dict:
        """One optimizer step over the step's sentences (this dp rank's share); the metrics row.
        Collective over every rank (the parallel model's step, the loss's mean over dp)."""
        t0 = time.perf_counter()
        t, p = self.cfg.train, self.cfg.parallel
        lr = lr_at(step, t)
        set_lr(self.optimizer, lr)
        train = self.encoded["train"]
        rows = step_rows(len(train), t.global_batch, step, seed_for(t.seed, "data"))
        share = t.global_batch // p.dp
        mine = rows[self.coord.dp_rank * share:(self.coord.dp_rank + 1) * share]
        targets = (int(train.labelled[rows].sum()), int(train.labelled[mine].sum()))  # every word weighs alike
        loss, norm = self.pm.train_step(self._micro(train, mine), self.optimizer, t.grad_clip, self._autocast,
                                        targets=targets)
        dt = time.perf_counter() - t0
        return {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens_per_s": int(train.padding[rows].sum()) / dt, "step_time_s": dt}

    @torch.no_grad()
    def predict(self, split: str) -> list[list[str]] | None:
        """The tag of every word of ``split`` (rank 0; None elsewhere). Collective over every rank:
        forward only (tp's collectives, activations over pp, logits gathered over tp and broadcast
        over pp, ZeRO-3's gathers over dp), then the predictions gathered over dp."""
        enc, mb, dp = self.encoded[split], self.cfg.train.micro_batch, self.cfg.parallel.dp
        mine = list(range(self.coord.dp_rank, len(enc), dp))
        per_rank = -(-len(enc) // dp)
        batches = -(-per_rank // mb)  # the same count on every dp rank (ZeRO-3 gathers over dp)
        self.pm.module.eval()
        found: dict[int, list[int]] = {}
        for b in range(batches):
            real = mine[b * mb:(b + 1) * mb]
            inputs = {k: v.to(self.device) for k, v in enc.inputs(real or [0]).items()}  # out of sentences: a
            with self._autocast():                                                    # forward it throws away
                logits = self.pm.full_logits(inputs)[..., :len(self.data.labels)]
            best = logits.argmax(-1).cpu()
            for i, r in enumerate(real):
                found[r] = [int(best[i, pos]) if pos >= 0 else 0 for pos in enc.firsts[r]]
        self.pm.module.train()
        parts: list = [None] * self.cfg.parallel.dp
        dist.all_gather_object(parts, found, group=self.groups.dp)
        if self.groups.rank != 0:
            return None
        merged = {k: v for part in parts for k, v in part.items()}
        return [[self.data.labels[i] for i in merged[r]] for r in range(len(enc))]


def evaluate(tagger: Tagger, split: str) -> dict | None:
    """seqeval's entity-level report of ``split`` on rank 0 (with its text table), else None.
    Collective over every rank (``Tagger.predict``)."""
    predicted = tagger.predict(split)
    if predicted is None:
        return None
    from seqeval.metrics import classification_report

    truth = [list(s.tags) for s in tagger.data.splits[split]]
    report = classification_report(truth, predicted, digits=4, output_dict=True, zero_division=0)
    table = classification_report(truth, predicted, digits=4, zero_division=0)
    return {"report": {k: {m: float(v) for m, v in d.items()} for k, d in report.items()}, "table": table}


def finetune_worker(cfg: RunConfig, data: TaggingData, out: Path | None, progress: bool = True,
                    keep_params: bool = False) -> FinetuneResult | None:
    """Everything one rank does for ``plait finetune``; rank 0 returns the result (and writes
    the metrics and ``ner_report.json`` into ``out``). Every step and evaluation is collective."""
    device = comm.pick_device()
    groups = build_groups(Topology.of(cfg.parallel), device.type)
    setup_logging(groups.prefix)
    tagger = Tagger(cfg, data, device, groups)
    lead = groups.rank == 0
    t = cfg.train
    writer = MetricsWriter(out, t.steps, progress, t.log_every) if lead and out else None
    result = FinetuneResult()
    for step in range(t.steps):
        row = tagger.step(step)
        result.losses.append(row["loss"])
        done = step + 1
        if "dev" in data.splits and t.eval_every > 0 and (done % t.eval_every == 0 or done == t.steps):
            _record(tagger, "dev", done, row, writer, result)
        elif writer:
            writer.write(row)
    if "test" in data.splits:
        _record(tagger, "test", t.steps, None, writer, result)
    if keep_params:
        result.params = tagger.pm.full_params()
    if writer:
        writer.close()
        (out / "ner_report.json").write_text(json.dumps(
            {"labels": data.labels, **result.reports}, indent=1))
    return result if lead else None


def _record(tagger: Tagger, split: str, step: int, row: dict | None, writer, result: FinetuneResult) -> None:
    scores = evaluate(tagger, split)
    if scores is None:
        return
    key = "test" if split == "test" else f"dev@{step}"
    result.reports[key] = scores["report"]
    f1 = scores["report"]["micro avg"]["f1-score"]
    if writer:
        if row is not None:
            writer.write({**row, f"{split}_f1": f1})
        writer.say(f"{split} at step {step}: entity F1 {f1:.4f}\n{scores['table']}")
    else:
        log.info("%s at step %d: entity F1 %.4f\n%s", split, step, f1, scores["table"])


def check(cfg: RunConfig) -> None:
    """What fine-tuning needs beyond a valid run config, each as one line."""
    if cfg.model.builder or cfg.model.flavour != "bert":
        raise ConfigError("model.flavour", cfg.model.builder or cfg.model.flavour, "token classification "
                          "fine-tunes an encoder: give model.init_from=<a BERT folder> (or model.flavour=bert)")
    if cfg.ps is not None or cfg.diloco is not None:
        raise ConfigError("ps.*" if cfg.ps is not None else "diloco.*", "set", "fine-tuning runs synchronous "
                          "data parallel (with any zero, tp, pp); leave the ps and diloco sections out")
    if cfg.model.init_from and not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer", "", f"{cfg.model.init_from} has no tokenizer.json: give the "
                          "checkpoint's own (data.tokenizer=FILE), whose sub-words the model knows")
    try:
        import seqeval  # noqa: F401 - scored on rank 0 after training: missing, say so before it starts
    except ModuleNotFoundError:
        raise ConfigError("--task", "token-classification", "scores entities with seqeval: "
                          "pip install 'plait[hf]'") from None
