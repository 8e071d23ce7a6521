"""``plait finetune``: its arguments, its defaults, and the run from data folder to report."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from .. import config as C
from ..errors import ConfigError

log = logging.getLogger(__name__)

TASKS = ("token-classification",)
DEFAULTS = {  # fine-tuning's own defaults (BERT's paper, §A.3), below --config and --set
    "train.steps": 300, "train.lr": 5e-5, "train.min_lr": 0.0, "train.warmup": 30, "train.weight_decay": 0.01,
    "train.global_batch": 32, "train.micro_batch": 16, "train.eval_every": 100, "train.log_every": 20,
}


def add_parser(sub, config_args) -> None:
    p = sub.add_parser("finetune", help="fine-tune an encoder (a Hugging Face BERT) for a task, any layout")
    p.add_argument("--task", required=True, choices=TASKS, help="token-classification: BIO tagging (NER) from "
                   "CoNLL files, scored per entity with seqeval")
    p.add_argument("--data", required=True, metavar="DIR", dest="task_data", help="a folder with train.txt (and "
                   "dev.txt, test.txt): a token and its BIO tag per line, blank lines between sentences")
    config_args(p, data=False)
    p.add_argument("--out", help="output folder (default: runs/<date-time>); must not hold a run")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def prepare(cfg: C.RunConfig, folder: str):
    """Read, label and encode the data (once: the processes inherit it), padded to one length."""
    from .conll import WordTokenizer, encode, label_names, multiple_for, padded_length, read_splits
    from .ner import TaggingData, check

    check(cfg)
    splits = read_splits(folder)
    words = WordTokenizer(cfg.data.tokenizer)
    pieces = {k: words.split(v) for k, v in splits.items()}
    tokens = {k: max(len(ids) for ids, _ in v) for k, v in pieces.items()}
    length = padded_length(max(tokens.values()), cfg.model.seq_len, multiple_for(cfg.parallel.tp))
    if length <= 0:
        raise ConfigError("model.seq_len", cfg.model.seq_len, f"must be at least {multiple_for(cfg.parallel.tp)}")
    longer = {k: n for k, n in tokens.items() if n > length}
    if longer:
        log.warning("sentences longer than %d tokens (model.seq_len) are cut; the longest: %s", length,
                    ", ".join(f"{k} {n}" for k, n in longer.items()))
    labels = label_names(splits)
    encoded = {k: encode(splits[k], pieces[k], labels, length, words.pad_id) for k in splits}
    return TaggingData(labels, length, splits, encoded)


def run(cfg: C.RunConfig, folder: str, nproc: int, out: Path, progress: bool = True):
    """Fine-tune on ``nproc`` local processes; write the report, config and model into ``out``."""
    from ..launch import run_local
    from .ner import finetune_worker

    data = prepare(cfg, folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(C.to_toml(cfg))
    (out / "labels.json").write_text(json.dumps(data.labels))
    log.info("token classification: %d labels (%s), %s sentences, padded to %d tokens; layout dp=%d tp=%d pp=%d",
             len(data.labels), " ".join(data.labels), ", ".join(f"{k} {len(v)}" for k, v in data.splits.items()),
             data.length, cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp)
    result = run_local(finetune_worker, nproc, (cfg, data, out, progress, True))[0]
    save_model(cfg, data.labels, result.params, out / "model")
    log.info("fine-tuned model (transformers' BertForTokenClassification): %s; report: %s", out / "model",
             out / "ner_report.json")
    return result


def save_model(cfg: C.RunConfig, labels: list[str], params: dict, folder: Path) -> None:
    """The tagger as a Hugging Face folder, with the tokenizer it was trained with."""
    import torch

    from ..models.bert import Bert
    from ..models.hf import save_hf

    with torch.device("meta"):
        model = Bert(cfg.model, head="token", labels=len(labels))
    model.load_state_dict(params, assign=True)
    try:
        save_hf(model, folder, cfg.model, labels)
        if cfg.data.tokenizer:
            shutil.copyfile(Path(cfg.data.tokenizer).expanduser(), folder / "tokenizer.json")
    except OSError as e:
        raise ConfigError("--out", str(folder.parent), f"the tagger cannot be written ({e.strerror or e}); "
                          f"its report is in {folder.parent / 'ner_report.json'}") from None


def cmd_finetune(args: argparse.Namespace, load_config, nproc_for, out_dir) -> int:
    from ..launch import under_torchrun

    if under_torchrun():
        raise ConfigError("finetune", "torchrun", "runs its own local processes (--nproc); start it once, "
                          "without torchrun")
    cfg = load_config(args, DEFAULTS)
    nproc = nproc_for(args, cfg)
    cfg = C.resolve(cfg, nproc)
    out = out_dir(args.out)
    run(cfg, args.task_data, nproc, out, progress=not args.no_progress)
    return 0
