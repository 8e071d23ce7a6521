"""Hugging Face folders in and out (one process): GPT-2 and Llama built by transformers from a
config give the same logits through plait.load_hf; plait.save_hf writes what transformers loads."""

import json

import pytest
import torch

import plait
from plait.errors import ConfigError

T = pytest.importorskip("transformers")

CONFIGS = {
    "gpt2": lambda: (T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64),
                     T.GPT2LMHeadModel),
    "llama": lambda: (T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                    rope_theta=500000.0), T.LlamaForCausalLM),
    "llama-tied": lambda: (T.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, vocab_size=260, max_position_embeddings=32,
                                         tie_word_embeddings=True), T.LlamaForCausalLM),
    "bert": lambda: (T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  vocab_size=300, max_position_embeddings=64), T.BertModel),
    "bert-mlm": lambda: (T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, vocab_size=300, max_position_embeddings=64),
                         T.BertForMaskedLM),
    "bert-token": lambda: (T.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, vocab_size=300, max_position_embeddings=64,
                                        num_labels=7), T.BertForTokenClassification),
}


def _out(r):
    return r.logits if hasattr(r, "logits") else r.last_hidden_state


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each reference model, saved as transformers saves it, with its logits on fixed ids."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        cfg, cls = make()
        ref = cls(cfg).eval()
        ref.save_pretrained(root / name)
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        with torch.no_grad():
            out[name] = (root / name, cls, ids, _out(ref(ids)))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_models_give_transformers_logits(folders, name):
    folder, _, ids, want = folders[name]
    model = plait.load_hf(folder).eval()
    with torch.no_grad():
        got = model(ids)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_and_reimports_identically(folders, name, tmp_path):
    folder, cls, ids, want = folders[name]
    model = plait.load_hf(folder).eval()
    plait.save_hf(model, tmp_path / "out")
    back = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (_out(back(ids)) - want).abs().max().item() <= 1e-5
    again = plait.load_hf(tmp_path / "out")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_rope_theta_and_norm_eps_come_from_the_config(folders):
    from plait.models.hf import model_config

    cfg = model_config(folders["llama"][0])
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-6 and cfg.kv_heads == 2 and cfg.ffn_hidden == 128


def test_bert_takes_a_padding_mask_and_token_types_as_transformers_does(folders):
    folder, cls, ids, _ = folders["bert"]
    ref = cls.from_pretrained(folder).eval()
    padding = torch.ones_like(ids)
    padding[0, 10:] = 0
    types = torch.zeros_like(ids)
    types[:, 8:] = 1
    model = plait.load_hf(folder).eval()
    with torch.no_grad():
        want = ref(ids, attention_mask=padding, token_type_ids=types).last_hidden_state
        got = model(ids, padding, types)
    keep = padding.bool()
    assert (got[keep] - want[keep]).abs().max().item() <= 1e-5


def test_a_tagger_export_names_its_labels(folders, tmp_path):
    model = plait.load_hf(folders["bert-token"][0])
    labels = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    plait.save_hf(model, tmp_path / "out", labels=labels)
    back = T.AutoConfig.from_pretrained(tmp_path / "out")
    assert back.id2label == dict(enumerate(labels)) and back.architectures == ["BertForTokenClassification"]


def test_a_bert_folder_without_a_head_starts_a_masked_lm_with_a_fresh_bias(folders):
    from plait.models.bert import Bert
    from plait.models.hf import load_weights, model_config

    folder = folders["bert"][0]
    cfg = model_config(folder)
    torch.manual_seed(5)
    fresh = Bert(cfg, head="mlm")
    torch.manual_seed(5)
    model = Bert(cfg, head="mlm")
    load_weights(model, cfg, folder)
    assert torch.equal(model.tok_emb.weight, plait.load_hf(folder).tok_emb.weight)
    for name in ("mlm_dense.weight", "mlm_norm.weight", "lm_head.bias"):  # the folder has no head: as built
        assert torch.equal(model.get_parameter(name), fresh.get_parameter(name)), name
    assert not torch.equal(model.blocks[0].attn.wq.weight, fresh.blocks[0].attn.wq.weight)


def test_only_plaits_own_flavours_are_exported(tmp_path):
    from plait import config as C
    from plait.models.hf import save_hf

    cfg = C.ModelConfig(builder="examples/own_model.py:build")
    with pytest.raises(ConfigError) as e:
        save_hf(torch.nn.Linear(2, 2), tmp_path / "x", cfg)
    assert "--hf" in str(e.value) and "gpt2, llama and bert" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_bad_folders_are_one_line(folders, tmp_path):
    cases = {}
    cases["empty"] = tmp_path / "empty"
    cases["empty"].mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "t5"}))
    cases["t5"] = bert
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    src = folders["gpt2"][0]
    hf = json.loads((src / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**hf, "n_embd": 32, "n_head": 4}))
    (wrong / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cases["shapes"] = wrong
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "h.1.mlp.c_fc" not in k}, str(partial / "model.safetensors"))
    cases["partial"] = partial
    nofile = tmp_path / "noweights"
    nofile.mkdir()
    (nofile / "config.json").write_text((src / "config.json").read_text())
    cases["weights"] = nofile
    expect = {"empty": "config.json", "t5": "'t5' is not supported", "shapes": "has shape",
              "weights": "model.safetensors", "partial": "hold nothing for blocks.1.mlp.up"}
    for key, folder in cases.items():
        with pytest.raises(ConfigError) as e:
            plait.load_hf(folder)
        assert expect[key] in str(e.value) and "model.init_from" in str(e.value) and "\n" not in str(e.value)


def test_masked_language_modelling_loss_is_transformers(folders):
    """plait's masked batches and loss give transformers' BertForMaskedLM loss (labels -100 left out)."""
    from plait.models.description import cross_entropy
    from plait.train.data import Masking, Sampler

    folder, cls, _, _ = folders["bert-mlm"]
    tokens = torch.randint(5, 300, (4000,)).numpy()
    x, y = Sampler(tokens, 32, 4, 0, 0, 1, Masking(mask_id=4, vocab=300)).batch(0)
    ours = plait.load_hf(folder).double().eval()
    theirs = cls.from_pretrained(folder).double().eval()
    with torch.no_grad():
        assert abs(cross_entropy(ours(x), y).item() - theirs(input_ids=x, labels=y).loss.item()) < 1e-12
