"""plait's BERT tagger against transformers' own ``BertForTokenClassification``, one process: the
same folder's weights, the same batches of padded sentences, forward + backward + AdamW, timed
alternately step by step. (The strands around plait's BERT race PyTorch's own in ``plait bench
dp|tp|pp --set model.flavour=bert``.)

    .venv/bin/python benchmarks/bert_vs_transformers.py                  # 4 layers x 256, batch 16 x 64
    .venv/bin/python benchmarks/bert_vs_transformers.py --hidden 512 --layers 4 --threads 2

Prints one line per contender: median step time and tokens (real, not padding) per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """``n`` batches of padded sentences: (tokens, padding, labels with -100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
        padding = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        tokens = torch.randint(5, vocab, (batch, seq), generator=g) * padding
        labels = torch.randint(0, 7, (batch, seq), generator=g).masked_fill(padding == 0, -100)
        out.append((tokens, padding, labels))
    return out


def one_process(args) -> None:
    """plait.load_hf's tagger vs transformers' BertForTokenClassification, the same folder."""
    import transformers as T

    import plait

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="plait-bert-bench-"))
    cfg = T.BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                       max_position_embeddings=args.seq, num_labels=7, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    T.BertForTokenClassification(cfg).save_pretrained(folder)
    theirs = T.BertForTokenClassification.from_pretrained(folder, attn_implementation="sdpa").train()
    ours = plait.load_hf(folder).train()
    data = batches(args.steps + args.warmup, args.batch, args.seq, args.vocab)

    def step_ours(opt, b):
        tokens, padding, labels = b
        logits = ours({"tokens": tokens, "padding": padding})
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    def step_theirs(opt, b):
        tokens, padding, labels = b
        theirs(input_ids=tokens, attention_mask=padding, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    sides = {"plait": (step_ours, torch.optim.AdamW(ours.parameters(), lr=1e-4)),
             "transformers": (step_theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4))}
    times = {k: [] for k in sides}
    for i, b in enumerate(data):
        for name, (fn, opt) in sides.items():  # alternate, so both see the machine alike
            t0 = time.perf_counter()
            fn(opt, b)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    real = sum(int(b[1].sum()) for b in data[args.warmup:]) / args.steps
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"one process, BERT {args.layers}x{args.hidden}, {params:.1f}M params, batch {args.batch} x {args.seq} "
          f"(~{real:.0f} real tokens), {args.threads} thread(s), median of {args.steps} steps:")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:13s} {med * 1e3:8.1f} ms/step  {real / med:9.0f} tokens/s")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["plait"])
    print(f"  plait / transformers speed: {ratio:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    one_process(p.parse_args())


if __name__ == "__main__":
    main()
