"""Hugging Face folders in and out: ``config.json`` and safetensors weights <-> plait's models.

``load_hf(folder)`` builds the plait model of a GPT-2, Llama or BERT folder (its shape from
config.json, ``config.hf_model_keys``) and loads its weights; ``save_hf(model, folder)`` writes a
folder that ``transformers`` loads (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``BertModel`` or
``BertForMaskedLM``). Nothing is downloaded.

Names and layouts mapped:

- GPT-2 keeps its linear layers as ``Conv1D`` (weights stored in x out) and the query, key and
  value in one ``c_attn``: split and transposed into ``wq``, ``wk``, ``wv``; the output layer is
  tied to the token embedding in both.
- Llama's rotary embedding pairs dimension i with i + d/2 of each head (``rotate_half``), plait's
  with its neighbour (2i, 2i+1): the rows of ``q_proj`` and ``k_proj`` are permuted per head on
  the way in (and back on the way out), which leaves every attention score as it was. A tied
  output layer (``tie_word_embeddings``) is loaded as a copy of the embedding.
- BERT: names only (``encoder.layer.i.attention.self.query`` -> ``blocks.i.attn.wq``); the
  masked-language-modelling head's output layer is tied to the word embedding, with its own bias;
  the pooler is not part of plait's encoder and is left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, hf_model_keys, resolve_model
from ..errors import ConfigError

WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def model_config(folder: str | Path) -> ModelConfig:
    """The plait model config of a Hugging Face folder (validated)."""
    return resolve_model(ModelConfig(**hf_model_keys(str(folder))), byte_tokens=False)  # its own tokenizer


def load_hf(folder: str | Path) -> nn.Module:
    """The plain plait model of a local GPT-2, Llama or BERT folder, with its weights (float32): a
    decoder gives logits; a BERT gives the last hidden states, vocabulary logits when the folder
    holds a masked-language-modelling head (``BertForMaskedLM``), label logits for a tagger
    (``BertForTokenClassification``)."""
    from . import build

    cfg = model_config(folder)
    if cfg.flavour == "bert":
        from .bert import Bert

        model = Bert(cfg, **_bert_head(folder))
    else:
        model = build(cfg)[0]
    load_weights(model, cfg, folder)
    return model


def _bert_head(folder: str | Path) -> dict:
    """The head of a BERT folder as ``Bert``'s arguments: its architecture says which."""
    config = json.loads((Path(folder).expanduser() / "config.json").read_text())
    kinds = config.get("architectures") or []
    if "BertForTokenClassification" in kinds:
        return {"head": "token", "labels": len(config.get("id2label") or {}) or int(config.get("num_labels", 2))}
    return {"head": "mlm" if "BertForMaskedLM" in kinds else "none"}


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s) (one file, or shards with an index)."""
    from safetensors.torch import load_file

    root = Path(folder).expanduser()
    if (root / WEIGHTS).is_file():
        return load_file(str(root / WEIGHTS))
    if (root / INDEX).is_file():
        files = sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in load_file(str(root / f)).items()}
    raise ConfigError("model.init_from", str(folder), f"has no {WEIGHTS} (nor {INDEX}): save the model with "
                      "save_pretrained(..., safe_serialization=True)")


def load_weights(model: nn.Module, cfg: ModelConfig, folder: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the folder's weights into ``model`` (plait's names and layouts), checking every shape.
    Parameters whose names start with one of ``skip`` keep their initial values; so do those of a
    head the folder may lack (``HEADS_MAY_START_FRESH``) when it has none for them."""
    hf = read_tensors(folder)
    mine = dict(model.named_parameters())
    fresh = HEADS_MAY_START_FRESH.get(cfg.flavour, ())
    mapped = {"gpt2": _from_gpt2, "llama": _from_llama, "bert": _from_bert}[cfg.flavour](hf, cfg)
    with torch.no_grad():
        for name, param in mine.items():
            if (skip and name.startswith(skip)) or (fresh and name.startswith(fresh) and name not in mapped):
                continue
            if name not in mapped:
                if cfg.flavour in ("gpt2", "bert") and name == "lm_head.weight":
                    continue  # tied to tok_emb
                raise ConfigError("model.init_from", str(folder),
                                  f"the weights hold nothing for {name} (a {cfg.flavour} model's)")
            value = mapped[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError("model.init_from", str(folder), f"the weight for {name} has shape "
                                  f"{tuple(value.shape)}; its config.json gives {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


HEADS_MAY_START_FRESH = {"bert": ("mlm_dense.", "mlm_norm.", "lm_head.bias")}  # a BertModel folder, trained by MLM


def _rope_rows(w: torch.Tensor, heads: int, to_plait: bool) -> torch.Tensor:
    """Permute the rows of q_proj / k_proj per head between HF's half split and plait's pairs."""
    out, d_in = w.shape
    hd = out // heads
    if to_plait:  # row j of half h in HF -> row 2j + h in plait
        return w.view(heads, 2, hd // 2, d_in).transpose(1, 2).reshape(out, d_in)
    return w.view(heads, hd // 2, 2, d_in).transpose(1, 2).reshape(out, d_in)


def _from_gpt2(hf: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = {k.removeprefix("transformer."): v for k, v in hf.items()}
    h = cfg.hidden
    out = {"tok_emb.weight": t.get("wte.weight"), "pos_emb.weight": t.get("wpe.weight"),
           "norm.weight": t.get("ln_f.weight"), "norm.bias": t.get("ln_f.bias")}
    for i in range(cfg.layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        w, b = t.get(p + "attn.c_attn.weight"), t.get(p + "attn.c_attn.bias")
        for j, name in enumerate(("wq", "wk", "wv")):
            out[q + f"attn.{name}.weight"] = None if w is None else w[:, j * h:(j + 1) * h].t()
            out[q + f"attn.{name}.bias"] = None if b is None else b[j * h:(j + 1) * h]
        for mine, theirs, conv in _GPT2_LAYER:
            for kind in ("weight", "bias"):
                v = t.get(f"{p}{theirs}.{kind}")
                out[f"{q}{mine}.{kind}"] = v.t() if conv and kind == "weight" and v is not None else v
    return {k: v for k, v in out.items() if v is not None}


_GPT2_LAYER = (("attn.wo", "attn.c_proj", True), ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True),
               ("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False))  # (plait, HF, a Conv1D weight)


_LLAMA_LAYER = (("attn.wv", "self_attn.v_proj"), ("attn.wo", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj"), ("attn_norm", "input_layernorm"),
                ("mlp_norm", "post_attention_layernorm"))


def _from_llama(hf: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = {k.removeprefix("model."): v for k, v in hf.items()}
    out = {"tok_emb.weight": t.get("embed_tokens.weight"), "norm.weight": t.get("norm.weight"),
           "lm_head.weight": hf.get("lm_head.weight", t.get("embed_tokens.weight"))}
    for i in range(cfg.layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        if p + "self_attn.q_proj.weight" not in t:
            continue
        out[q + "attn.wq.weight"] = _rope_rows(t[p + "self_attn.q_proj.weight"], cfg.heads, True)
        out[q + "attn.wk.weight"] = _rope_rows(t[p + "self_attn.k_proj.weight"], cfg.kv_heads, True)
        for mine, theirs in _LLAMA_LAYER:
            out[q + mine + ".weight"] = t.get(p + theirs + ".weight")
    return {k: v for k, v in out.items() if v is not None}


_BERT_LAYER = (("attn.wq", "attention.self.query"), ("attn.wk", "attention.self.key"),
               ("attn.wv", "attention.self.value"), ("attn.wo", "attention.output.dense"),
               ("attn_norm", "attention.output.LayerNorm"), ("mlp.up", "intermediate.dense"),
               ("mlp.down", "output.dense"), ("mlp_norm", "output.LayerNorm"))
_BERT_EMBED = (("tok_emb", "embeddings.word_embeddings"), ("pos_emb", "embeddings.position_embeddings"),
               ("type_emb", "embeddings.token_type_embeddings"), ("emb_norm", "embeddings.LayerNorm"))
_BERT_HEAD = (("mlm_dense", "cls.predictions.transform.dense"), ("mlm_norm", "cls.predictions.transform.LayerNorm"))


def _bert_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(plait name, HF name without the ``bert.`` prefix) of every weight and bias."""
    pairs = [(f"{m}.{p}", f"{h}.{p}") for m, h in _BERT_EMBED for p in ("weight", "bias") if m == "emb_norm"]
    pairs += [(f"{m}.weight", f"{h}.weight") for m, h in _BERT_EMBED if m != "emb_norm"]
    for i in range(cfg.layers):
        pairs += [(f"blocks.{i}.{m}.{p}", f"encoder.layer.{i}.{h}.{p}")
                  for m, h in _BERT_LAYER for p in ("weight", "bias")]
    return pairs


def _from_bert(hf: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = {k.removeprefix("bert."): v for k, v in hf.items()}
    out = {mine: t.get(theirs) for mine, theirs in _bert_pairs(cfg)}
    for mine, theirs in _BERT_HEAD:
        out[f"{mine}.weight"], out[f"{mine}.bias"] = hf.get(f"{theirs}.weight"), hf.get(f"{theirs}.bias")
    out["lm_head.bias"] = hf.get("cls.predictions.bias", hf.get("cls.predictions.decoder.bias"))
    out["classifier.weight"], out["classifier.bias"] = hf.get("classifier.weight"), hf.get("classifier.bias")
    return {k: v for k, v in out.items() if v is not None}


def _to_bert(s: dict, cfg: ModelConfig, labels: list[str] | None = None) -> tuple[dict, dict]:
    mlm, tagger = "lm_head.bias" in s, "classifier.weight" in s
    prefix = "bert." if mlm or tagger else ""
    out = {prefix + theirs: s[mine] for mine, theirs in _bert_pairs(cfg)}
    if mlm:
        for mine, theirs in _BERT_HEAD:
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = s[f"{mine}.weight"], s[f"{mine}.bias"]
        out["cls.predictions.bias"] = s["lm_head.bias"]
    extra = {}
    if tagger:
        out["classifier.weight"], out["classifier.bias"] = s["classifier.weight"], s["classifier.bias"]
        names = labels or [f"LABEL_{i}" for i in range(len(s["classifier.bias"]))]
        extra = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    kind = "BertForMaskedLM" if mlm else "BertForTokenClassification" if tagger else "BertModel"
    config = {"model_type": "bert", "architectures": [kind], **extra,
              "num_hidden_layers": cfg.layers, "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads,
              "intermediate_size": cfg.ffn_hidden, "vocab_size": cfg.vocab, "max_position_embeddings": cfg.seq_len,
              "type_vocab_size": cfg.type_vocab, "layer_norm_eps": cfg.norm_eps, "hidden_act": "gelu",
              "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
              "position_embedding_type": "absolute", "tie_word_embeddings": True}
    return out, config


def save_hf(model: nn.Module, folder: str | Path, cfg: ModelConfig | None = None,
            labels: list[str] | None = None) -> Path:
    """Write ``model`` (a plain plait gpt2, llama or bert) as a Hugging Face folder: config.json
    and model.safetensors (float32), which ``transformers`` loads (a BERT tagger as
    ``BertForTokenClassification``, with ``labels`` as its id2label)."""
    from safetensors.torch import save_file

    cfg = cfg or getattr(model, "cfg", None)
    if cfg is None or cfg.builder or cfg.flavour not in ("gpt2", "llama", "bert"):
        raise ConfigError("--hf", getattr(cfg, "builder", None) or "model", "Hugging Face export covers plait's "
                          "gpt2, llama and bert models")
    root = Path(folder).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    if cfg.flavour == "bert":
        tensors, config = _to_bert(state, cfg, labels)
    else:
        tensors, config = {"gpt2": _to_gpt2, "llama": _to_llama}[cfg.flavour](state, cfg)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / WEIGHTS), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def _to_gpt2(s: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    out = {"transformer.wte.weight": s["tok_emb.weight"], "transformer.wpe.weight": s["pos_emb.weight"],
           "transformer.ln_f.weight": s["norm.weight"], "transformer.ln_f.bias": s["norm.bias"]}
    for i in range(cfg.layers):
        p, q = f"transformer.h.{i}.", f"blocks.{i}."
        out[p + "attn.c_attn.weight"] = torch.cat([s[q + f"attn.{n}.weight"].t() for n in ("wq", "wk", "wv")], 1)
        out[p + "attn.c_attn.bias"] = torch.cat([s[q + f"attn.{n}.bias"] for n in ("wq", "wk", "wv")])
        for mine, theirs, conv in _GPT2_LAYER:
            weight = s[q + mine + ".weight"]
            out[p + theirs + ".weight"] = weight.t() if conv else weight
            out[p + theirs + ".bias"] = s[q + mine + ".bias"]
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": cfg.layers,
              "n_embd": cfg.hidden, "n_head": cfg.heads, "n_inner": cfg.ffn_hidden, "vocab_size": cfg.vocab,
              "n_positions": cfg.seq_len, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
              "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
              "tie_word_embeddings": True}
    return out, config


def _to_llama(s: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    out = {"model.embed_tokens.weight": s["tok_emb.weight"], "model.norm.weight": s["norm.weight"],
           "lm_head.weight": s["lm_head.weight"]}
    for i in range(cfg.layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "self_attn.q_proj.weight"] = _rope_rows(s[q + "attn.wq.weight"], cfg.heads, False)
        out[p + "self_attn.k_proj.weight"] = _rope_rows(s[q + "attn.wk.weight"], cfg.kv_heads, False)
        for mine, theirs in _LLAMA_LAYER:
            out[p + theirs + ".weight"] = s[q + mine + ".weight"]
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": cfg.layers,
              "hidden_size": cfg.hidden, "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
              "intermediate_size": cfg.ffn_hidden, "vocab_size": cfg.vocab, "max_position_embeddings": cfg.seq_len,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
              "attention_dropout": cfg.dropout}
    return out, config

