"""Named-entity recognition from start to end, on data and a model made here (nothing downloaded).

It writes what a user brings (docs/finetune.md walks through the same steps with your own files):

- a CoNLL folder (train.txt, dev.txt, test.txt): a word and its BIO tag per line, blank lines
  between sentences; people, places and organisations among filler words, some of them split by
  the tokenizer into several sub-words;
- a Hugging Face BERT folder: a WordPiece ``tokenizer.json`` and a small, randomly initialised
  ``BertForMaskedLM`` saved by ``transformers`` (your own would be a pre-trained checkpoint);

then runs ``plait finetune`` on them over local processes, as you would on the command line, and
prints the entity-level report of the test set. A tagger this small learns the task in a minute
on a laptop's CPU; the script fails if its test F1 stays below 0.9.

    python examples/ner_synthetic.py                       # 2 processes, tensor parallel
    python examples/ner_synthetic.py --layout pp=2 --out runs/ner
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

PEOPLE = ["alice", "bob", "carol", "dmitri", "eunice", "farouk", "gwendolyn", "hiroshi"]
SURNAMES = ["smith", "okafor", "lindqvist", "tanaka"]
PLACES = ["paris", "berlin", "lagos", "osaka", "quito", "reykjavik"]
ORGS = [("acme", "corp"), ("globex",), ("initech", "labs"), ("umbrella", "group")]
FILLER = ["the", "a", "met", "visited", "from", "with", "and", "said", "today", "in", "at", "works", "for",
          "moved", "to", "yesterday", "later", "left", "joined", "near"]
SPLIT_UP = ["gwen", "##dolyn", "hiro", "##shi", "reyk", "##javik", "init", "##ech", "dmi", "##tri", "lind",
            "##qvist"]  # these pieces make some names several sub-words
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: random.Random) -> list[tuple[str, str]]:
    """A few filler words around one to three entities, each tagged B-TYPE then I-TYPE."""
    out: list[tuple[str, str]] = []
    for _ in range(rng.randint(1, 3)):
        out += [(rng.choice(FILLER), "O") for _ in range(rng.randint(1, 4))]
        kind = rng.choice(["PER", "LOC", "ORG"])
        if kind == "PER":
            words = [rng.choice(PEOPLE)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        else:
            words = [rng.choice(PLACES)] if kind == "LOC" else list(rng.choice(ORGS))
        out += [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]
    return out + [(rng.choice(FILLER), "O") for _ in range(rng.randint(0, 2))]


def write_data(folder: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        lines = ["-DOCSTART- O", ""]
        for _ in range(n):
            lines += [f"{w} {t}" for w, t in sentence(rng)] + [""]
        (folder / f"{split}.txt").write_text("\n".join(lines))
    return folder


def write_bert(folder: Path, hidden: int = 64, layers: int = 2, heads: int = 4, positions: int = 64) -> Path:
    """A WordPiece tokenizer over this task's words and a random BERT of that vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForMaskedLM

    words = sorted({*PEOPLE, *SURNAMES, *PLACES, *(w for o in ORGS for w in o), *FILLER} - {"gwendolyn", "hiroshi",
                                                                                         "reykjavik", "initech",
                                                                                         "dmitri", "lindqvist"})
    vocab = {t: i for i, t in enumerate(SPECIAL + words + SPLIT_UP)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=positions,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForMaskedLM(config).save_pretrained(str(folder))
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="run folder (default: a new temporary folder)")
    p.add_argument("--layout", default="tp=2", help='parallel keys, e.g. "tp=2", "pp=2", "dp=2,zero=1"')
    p.add_argument("--steps", type=int, default=150)
    args = p.parse_args()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="plait-ner-"))
    data = write_data(work / "data", {"train": 400, "dev": 60, "test": 100})
    bert = write_bert(work / "bert")
    layout = [f"--set=parallel.{kv.strip()}" for kv in args.layout.split(",") if kv.strip()]
    nproc = 1
    for kv in args.layout.split(","):
        if kv.split("=")[0].strip() in ("dp", "tp", "pp"):
            nproc *= int(kv.split("=")[1])
    command = [sys.executable, "-m", "plait", "finetune", "--task", "token-classification", "--data", str(data),
               "--out", str(work / "run"),
               "--nproc", str(nproc), "--set", f"model.init_from={bert}", *layout, "--steps", str(args.steps),
               "--set", "train.lr=2e-3", "--set", "train.global_batch=16", "--set", "train.micro_batch=8",
               "--set", "train.eval_every=50", "--no-progress"]
    print("$ plait " + " ".join(command[3:]), flush=True)
    if subprocess.run(command).returncode:
        return 1
    f1 = json.loads((work / "run" / "ner_report.json").read_text())["test"]["micro avg"]["f1-score"]
    print(f"test entity F1 {f1:.4f}; the fine-tuned model, loadable by transformers: {work / 'run' / 'model'}")
    return 0 if f1 > 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
