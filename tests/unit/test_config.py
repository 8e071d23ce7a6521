import pytest

from plait import config as C
from plait.errors import ConfigError


def test_defaults_resolve_to_data_parallel_over_all_processes():
    cfg = C.resolve(C.RunConfig(), nproc=2)
    assert (cfg.parallel.dp, cfg.parallel.tp, cfg.parallel.pp) == (2, 1, 1)
    assert cfg.model.kv_heads == cfg.model.heads
    assert cfg.model.ffn_hidden == 4 * cfg.model.hidden


def test_llama_ffn_default_is_rounded_swiglu_width():
    assert C.default_ffn_hidden("llama", 128) == 352  # 8/3 * 128 = 341.3 -> multiple of 32


def test_toml_file_then_set_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\nflavour = "llama"\nlayers = 3\n[train]\nlr = 0.01\n[checkpoint]\nasync = true\n')
    cfg = C.load(f, ["model.layers=5", "parallel.stage_layers=2,3", "train.dtype=float64"])
    assert cfg.model.flavour == "llama" and cfg.model.layers == 5
    assert cfg.train.lr == 0.01 and cfg.train.dtype == "float64"
    assert cfg.parallel.stage_layers == (2, 3)
    assert cfg.checkpoint.async_ is True


@pytest.mark.parametrize("text, field, fragment", [
    ("[model\nlayers = 2\n", "--config", "not valid TOML"),
    ("model = 3\n", "model", "a table of key = value"),
    ("[parallel]\nstage_layers = 3\n", "parallel.stage_layers", "a list of integers such as 2,2"),
])
def test_bad_toml_file_names_the_problem(tmp_path, text, field, fragment):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        C.load(f)
    assert e.value.field == field and fragment in str(e.value) and "\n" not in str(e.value)


def test_toml_round_trip(tmp_path):
    cfg = C.load(None, ["model.flavour=llama", "parallel.stage_layers=1,3", "data.path=x y.txt"])
    f = tmp_path / "c.toml"
    f.write_text(C.to_toml(cfg))
    assert C.load(f) == cfg


@pytest.mark.parametrize("item, field, fragment", [
    ("model.no_such_key=1", "model.no_such_key", "valid keys of [model]: flavour, layers"),
    ("nosection.x=1", "nosection", "valid sections: model, parallel"),
    ("train.steps=abc", "train.steps", "expected an integer"),
    ("train.steps=1.5", "train.steps", "expected an integer"),
    ("parallel.sequence_parallel=maybe", "parallel.sequence_parallel", "true or false"),
    ("train.lr=fast", "train.lr", "expected a number"),
    ("novalue", "--set", "section.key=value"),
    ("parallel.stage_layers=a,b", "parallel.stage_layers", "expected an integer"),
])
def test_bad_override_names_field_and_valid_values(item, field, fragment):
    with pytest.raises(ConfigError) as e:
        C.load(None, [item])
    assert e.value.field == field
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("sets, nproc, field, fragment", [
    (["parallel.dp=3"], 2, "parallel.dp", "must equal the 2 processes"),
    (["train.global_batch=7", "parallel.dp=2"], 2, "train.global_batch", "multiple of dp x micro_batch = 2 x 8"),
    (["model.hidden=100", "model.heads=3"], 1, "model.heads", "must divide model.hidden=100"),
    (["model.kv_heads=3"], 1, "model.kv_heads", "must divide model.heads=8"),
    (["train.steps=-5"], 1, "train.steps", "must be positive"),
    (["parallel.zero=7"], 2, "parallel.zero", "one of 0, 1, 2, 3"),
    (["model.flavour=bert2"], 1, "model.flavour", "gpt2, llama"),
    (["train.dtype=float16"], 1, "train.dtype", "float32, float64, bfloat16"),
    (["data.val_fraction=1.5"], 1, "data.val_fraction", "[0, 1)"),
    (["parallel.tp=4", "model.heads=6", "model.kv_heads=2", "model.hidden=96"], 4, "model.heads",
     "divisible by parallel.tp=4"),
    (["parallel.tp=4", "model.heads=4", "model.kv_heads=2"], 4, "model.kv_heads", "divisible by parallel.tp=4"),
    (["parallel.tp=2", "model.hidden=63", "model.heads=3"], 2, "model.hidden", "divisible by parallel.tp=2"),
    (["parallel.tp=2", "model.ffn_hidden=101"], 2, "model.ffn_hidden", "divisible by parallel.tp=2"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_len=33"], 2, "model.seq_len",
     "under sequence parallel"),
    (["model.vocab=100"], 1, "model.vocab", ">= 256"),
    (["parallel.pp=4", "model.layers=3"], 4, "model.layers", "at least pp x virtual_stages = 4 x 1"),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=3", "model.layers=4"], 2,
     "model.layers", "2 x 3 = 6"),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2", "train.micro_batch=4",
      "train.global_batch=12"], 2, "parallel.microbatches", "multiple of pp=2"),
    (["parallel.pp=2", "parallel.schedule=pipedream"], 2, "parallel.schedule", "gpipe, 1f1b, interleaved, zb"),
    (["parallel.pp=2", "parallel.virtual_stages=2"], 2, "parallel.virtual_stages", "only the interleaved"),
    (["parallel.pp=2", "parallel.stage_layers=1,2"], 2, "parallel.stage_layers", "summing to model.layers=4"),
    (["parallel.pp=2", "parallel.microbatches=3"], 2, "parallel.microbatches", "global_batch / (dp x micro_batch)"),
    (["parallel.zero=1", "parallel.dp=1"], 1, "parallel.zero", "needs dp > 1"),
    (["parallel.dp=-1"], 1, "parallel.dp", "or 0 for auto"),
    (["model.flavour=llama", "model.hidden=96", "model.heads=32", "model.kv_heads=32"], 1, "model.heads",
     "even head size"),
    (["model.dropout=1.5"], 1, "model.dropout", "[0, 1)"),
    (["train.warmup=-1"], 1, "train.warmup", ">= 0"),
    (["checkpoint.keep=0"], 1, "checkpoint.keep", "keep >= 1"),
    (["checkpoint.every=-2"], 1, "checkpoint.every", "every >= 0"),
])
def test_validation_errors(sets, nproc, field, fragment):
    with pytest.raises(ConfigError) as e:
        C.resolve(C.load(None, sets), nproc)
    assert e.value.field == field, str(e.value)
    assert fragment in str(e.value)


def test_explicit_dp_matching_processes_is_fine():
    assert C.resolve(C.load(None, ["parallel.dp=2"]), 2).parallel.dp == 2


def test_configs_are_frozen():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        C.RunConfig().train.steps = 3  # type: ignore[misc]


def test_stage_layers_accepts_colons_for_layout_strings():
    assert C.load(None, ["parallel.stage_layers=1:3"]).parallel.stage_layers == (1, 3)


def test_standard_verify_matrix():
    from plait.verify import layout_name, parse_layouts, runnable, standard_matrix

    layouts = parse_layouts(standard_matrix())
    names = [layout_name(lay) for lay in layouts]
    assert len(names) == 53 and names[-11] == "dp=2,tp=2,pp=2" and names[-10] == "dp=2,diloco.inner_steps=5"
    assert names[-7] == "dp=4,zero=1,diloco.replicas=2,diloco.inner_steps=5"
    assert names[-6:-3] == ["dp=2,ps.servers=1,ps.mode=sync", "dp=2,ps.servers=2", "dp=1,pp=2,ps.servers=1"]
    assert names[-3:] == ["dp=2,recompute=full", "tp=2,sequence_parallel=true,recompute=selective",
                          "pp=2,schedule=zb,recompute=full"]
    assert "dp=2,tp=1,pp=2,zero=3,schedule=zb" in names and "dp=1,tp=4,pp=1" in names
    base = C.load(None, ["train.micro_batch=2", "model.flavour=llama", "model.layers=8"])
    kept = runnable(base, layouts)
    assert len(kept) == 53  # llama with 8 layers runs every layout of the matrix
