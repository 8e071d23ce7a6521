"""Run configuration: frozen dataclasses, TOML files, ``--set section.key=value`` overrides.

The section and key names are a contract (docs/architecture.md): tests, benchmarks and users' files
use them. Everything is validated once, in :func:`validate`, before any process starts; a bad value
raises :class:`~plait.errors.ConfigError`, whose message names the field, the value and what
would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .errors import ConfigError
from .schedules import SCHEDULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

FLAVOURS = ("gpt2", "llama", "bert")  # bert is an encoder: train and verify teach it masked-language modelling
DTYPES = ("auto", "float32", "float64", "bfloat16")
QUANTIZE = ("none", "bf16", "fp8")
MOMENTUM_RAMPS = ("nesterov", "none")  # DiLoCo's outer momentum over the first syncs
PS_MODES = ("sync", "async", "ssp")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelConfig:
    flavour: str = "gpt2"
    layers: int = 4
    hidden: int = 192
    heads: int = 8
    kv_heads: int = 0  # 0: same as heads (no grouped-query attention)
    ffn_hidden: int = 0  # 0: 4*hidden for gpt2, SwiGLU's 8/3*hidden rounded to 32 for llama
    vocab: int = 256
    seq_len: int = 128
    dropout: float = 0.0
    builder: str = ""  # "FILE.py:FUNCTION": a user's model and its description (flavour is then unused)
    norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # llama: base of the rotary frequencies
    init_from: str = ""  # a Hugging Face folder (config.json + safetensors): its shape and weights
    type_vocab: int = 2  # bert: token types (segments)


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 0  # 0: auto, the processes left after tp and pp
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatches: int = 0  # 0: auto
    stage_layers: tuple[int, ...] = ()  # empty: balanced split


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    global_batch: int = 16  # sequences per optimizer step, over all dp ranks
    micro_batch: int = 8  # sequences per forward/backward on one rank
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 autocast on CUDA
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    recompute: str = "none"  # selective: attention cores; full: whole blocks (parallel/recompute.py)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # empty: the embedded corpus (the standard library's .py files)
    val_fraction: float = 0.05
    tokenizer: str = ""  # a tokenizer.json read with the `tokenizers` library; empty: bytes, or init_from's own


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps between saves; 0: only at the end
    keep: int = 2
    async_: bool = False  # key "async" in files and --set


@dataclass(frozen=True)
class DilocoConfig:
    """DiLoCo (Douillard et al. 2023) in place of synchronous data parallel: given at all, it is on."""

    inner_steps: int = 0  # H, local steps between syncs; must be given (>= 1)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # Nesterov; outer_lr=1, momentum=0 is local SGD (model averaging)
    momentum_ramp: str = "nesterov"  # the momentum of sync t: min(outer_momentum, (t-1)/(t+2)); none: constant
    fragments: int = 1  # streaming DiLoCo: the parameters in F fragments synchronised in turn
    quantize: str = "none"  # what the pseudo-gradients travel as: none (their dtype), bf16, fp8
    replicas: int = 0  # 0: every dp rank a replica; R < dp: R replicas of dp/R ranks with ZeRO inside


@dataclass(frozen=True)
class PsConfig:
    """A parameter server in place of synchronous data parallel: given at all, it is on."""

    servers: int = 1  # server ranks beside the dp x tp x pp workers
    mode: str = "sync"  # sync (one update from the mean), async (each gradient as it comes), ssp
    staleness: int = 2  # ssp: no worker more than this many pushes ahead of the slowest
    staleness_lr: bool = False  # async / ssp: divide a gradient's learning rate by its staleness
    lookahead: bool = True  # async / ssp: send the parameters moved on by the worker's staleness x the last update
    slow_worker: str = ""  # "W:F": worker (dp rank) W takes F times as long a step (tests, demos)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ps: PsConfig | None = None  # optional sections: None unless a key of theirs is given
    diloco: DilocoConfig | None = None


def _key(f: dataclasses.Field) -> str:
    return f.name.rstrip("_")


def section_keys(section: str) -> dict[str, dataclasses.Field]:
    """Key name -> dataclass field of one section."""
    cls = _SECTIONS[section]
    return {_key(f): f for f in fields(cls)}


_SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "ps": PsConfig,
    "diloco": DilocoConfig,
}
OPTIONAL_SECTIONS = ("ps", "diloco")  # giving any key of one switches its strand on


def _field_type(section: str, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(_SECTIONS[section])
    return hints[f.name]


def _coerce(name: str, value: object, typ: object) -> object:
    """Convert a TOML value or a ``--set`` string into the field's type."""
    if typing.get_origin(typ) is tuple:
        return _coerce_tuple(name, value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(name, value, "expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(name, value, "expected an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, "expected an integer") from None
        if not as_float.is_integer():
            raise ConfigError(name, value, "expected an integer")
        return int(as_float)
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, value, "expected a number") from None
    return str(value)


def _coerce_tuple(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, str):  # "2,2", "[2, 2]", or "2:2" (inside verify's comma-separated layouts)
        text = value.strip().strip("[]()").replace(":", ",")
        value = [v for v in text.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(name, value, "expected a list of integers such as 2,2 (or 2:2)")
    return tuple(_coerce(name, v, int) for v in value)


def from_dict(data: dict, base: RunConfig | None = None) -> RunConfig:
    """Build a config from nested ``{section: {key: value}}``; unknown names are errors."""
    cfg = base or RunConfig()
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(section, "", f"unknown section; valid sections: {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(section, values, "expected a table of key = value")
        current = getattr(cfg, section) or _SECTIONS[section]()
        cfg = replace(cfg, **{section: _update_section(section, current, values)})
    return cfg


def _update_section(section: str, current: object, values: dict) -> object:
    keys = section_keys(section)
    changes = {}
    for key, value in values.items():
        name = f"{section}.{key}"
        if key not in keys:
            raise ConfigError(name, value, f"unknown key; valid keys of [{section}]: {', '.join(keys)}")
        f = keys[key]
        changes[f.name] = _coerce(name, value, _field_type(section, f))
    return replace(current, **changes)


def parse_overrides(items: list[str]) -> dict:
    """``["train.steps=5", ...]`` -> ``{"train": {"steps": "5"}}`` (strings, coerced later)."""
    out: dict[str, dict] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError("--set", item, "expected section.key=value, e.g. train.steps=50")
        path, value = item.split("=", 1)
        section, key = path.strip().split(".", 1)
        out.setdefault(section, {})[key] = value.strip()
    return out


def load(
    path: str | Path | None = None, overrides: list[str] | None = None, base: RunConfig | None = None
) -> RunConfig:
    """``base`` (default: the defaults), then the TOML file (if any), then ``--set`` overrides."""
    cfg = base or RunConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", str(path), "no such file; give a TOML file")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", str(path), f"not valid TOML ({e})") from None
        cfg = from_dict(data, cfg)
    return from_dict(parse_overrides(overrides or []), cfg)


def to_dict(cfg: RunConfig) -> dict:
    """``{section: {key: value}}``; an optional section that is off is left out."""
    return {
        s: {_key(f): getattr(getattr(cfg, s), f.name) for f in fields(_SECTIONS[s])}
        for s in _SECTIONS if getattr(cfg, s) is not None
    }


def to_toml(cfg: RunConfig) -> str:
    """Serialise (the small subset of TOML these dataclasses need)."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


# --------------------------------------------------------------------------- resolution


def resolve(cfg: RunConfig, nproc: int) -> RunConfig:
    """Fill the automatic values (dp, kv_heads, ffn_hidden; the model's shape from ``init_from``)
    for ``nproc`` processes, then validate."""
    m, p = cfg.model, cfg.parallel
    if m.init_from:
        m = replace(m, **hf_model_keys(m.init_from))
        own = Path(m.init_from).expanduser() / "tokenizer.json"
        if not cfg.data.tokenizer and own.is_file():  # the folder's tokenizer, unless one is given
            cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(own)))
    workers = nproc - servers(cfg)
    if p.dp == 0 and p.tp > 0 and p.pp > 0 and workers > 0 and workers % (p.tp * p.pp) == 0:
        p = replace(p, dp=workers // (p.tp * p.pp))
    kv = m.kv_heads or m.heads
    ffn = m.ffn_hidden or default_ffn_hidden(m.flavour, m.hidden)
    cfg = replace(cfg, model=replace(m, kv_heads=kv, ffn_hidden=ffn), parallel=p)
    validate(cfg, nproc)
    return cfg


HF_TYPES = ("gpt2", "llama", "bert")  # model_type values of config.json that plait maps


def hf_model_keys(folder: str) -> dict:
    """The ``model`` keys of a Hugging Face folder's config.json (GPT-2 or Llama)."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise ConfigError("model.init_from", folder, "has no config.json (a Hugging Face model folder: "
                          "config.json and model.safetensors)")
    try:
        hf = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError("model.init_from", folder, f"config.json is not JSON ({e})") from None
    kind = hf.get("model_type")
    if kind not in HF_TYPES:
        raise ConfigError("model.init_from", folder, f"model_type {kind!r} is not supported; supported: "
                          f"{', '.join(HF_TYPES)}")
    try:
        return {"gpt2": _gpt2_keys, "llama": _llama_keys, "bert": _bert_keys}[kind](hf)
    except (KeyError, TypeError) as e:
        raise ConfigError("model.init_from", folder, f"config.json lacks {e} for model_type {kind}") from None


def _gpt2_keys(hf: dict) -> dict:
    h = hf["n_embd"]
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise KeyError("a tanh-approximated GELU (activation_function gelu_new)")
    return {"flavour": "gpt2", "layers": hf["n_layer"], "hidden": h, "heads": hf["n_head"], "kv_heads": hf["n_head"],
            "ffn_hidden": hf.get("n_inner") or 4 * h, "vocab": hf["vocab_size"], "seq_len": hf["n_positions"],
            "dropout": float(hf.get("resid_pdrop", 0.0)), "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5))}


def _llama_keys(hf: dict) -> dict:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise KeyError("no biases (attention_bias and mlp_bias false)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise KeyError("the default rotary embedding (no rope scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    return {"flavour": "llama", "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"], "heads": heads,
            "kv_heads": hf.get("num_key_value_heads") or heads, "ffn_hidden": hf["intermediate_size"],
            "vocab": hf["vocab_size"], "seq_len": hf["max_position_embeddings"],
            "dropout": float(hf.get("attention_dropout", 0.0)), "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(theta)}


def _bert_keys(hf: dict) -> dict:
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise KeyError("exact GELU (hidden_act gelu) and absolute position embeddings")
    heads = hf["num_attention_heads"]
    return {"flavour": "bert", "layers": hf["num_hidden_layers"], "hidden": hf["hidden_size"], "heads": heads,
            "kv_heads": heads, "ffn_hidden": hf["intermediate_size"], "vocab": hf["vocab_size"],
            "seq_len": hf["max_position_embeddings"], "dropout": float(hf.get("hidden_dropout_prob", 0.0)),
            "norm_eps": float(hf.get("layer_norm_eps", 1e-12)), "type_vocab": int(hf.get("type_vocab_size", 2))}


def resolve_model(m: ModelConfig, byte_tokens: bool = True) -> ModelConfig:
    """The model section alone: defaults filled in (kv_heads, ffn_hidden), then its rules checked
    (``byte_tokens``: for byte-level text, which needs a vocabulary of 256)."""
    m = replace(m, kv_heads=m.kv_heads or m.heads, ffn_hidden=m.ffn_hidden or default_ffn_hidden(m.flavour, m.hidden))
    _validate_model(m, byte_tokens)
    return m


def servers(cfg: RunConfig) -> int:
    """Server ranks beside the workers (a parameter server's), else 0."""
    return cfg.ps.servers if cfg.ps is not None else 0


def default_ffn_hidden(flavour: str, hidden: int) -> int:
    if flavour == "llama":
        return 32 * ((8 * hidden // 3 + 31) // 32)
    return 4 * hidden


def _positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(name, value, "must be positive")


def validate(cfg: RunConfig, nproc: int) -> None:
    """Check every rule once; raise ConfigError naming the first broken one."""
    _validate_model(cfg.model, byte_tokens=not cfg.data.tokenizer)
    if cfg.ps is not None:
        _validate_ps(cfg, nproc)
    _validate_parallel(cfg.parallel, nproc - servers(cfg), servers(cfg))
    _validate_tensor_parallel(cfg.model, cfg.parallel)
    _validate_pipeline(cfg)
    _validate_train(cfg.train, cfg.parallel)
    if cfg.diloco is not None:
        _validate_diloco(cfg.diloco, cfg.parallel)
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError("data.val_fraction", cfg.data.val_fraction, "must be in [0, 1)")
    if cfg.data.tokenizer:
        _validate_tokenizer(cfg.data.tokenizer, cfg.model.vocab)
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        bad = ("every", cfg.checkpoint.every) if cfg.checkpoint.every < 0 else ("keep", cfg.checkpoint.keep)
        raise ConfigError(f"checkpoint.{bad[0]}", bad[1], "every >= 0 and keep >= 1")


def microbatches(cfg: RunConfig) -> int:
    """Micro-batches per step on each dp rank: global_batch / (dp x micro_batch)."""
    return cfg.train.global_batch // (max(cfg.parallel.dp, 1) * cfg.train.micro_batch)


def step_tokens(cfg: RunConfig) -> int:
    """Tokens each dp rank trains on in one step (what balancing pipeline stages weighs)."""
    return microbatches(cfg) * cfg.train.micro_batch * cfg.model.seq_len


def _validate_tokenizer(path: str, vocab: int) -> None:
    """The model's vocabulary must hold every id of ``data.tokenizer`` (read lazily: bytes need no
    ``tokenizers``)."""
    from .tokenizer import load_tokenizer, vocab_size

    size = vocab_size(load_tokenizer(path))
    if vocab < size:
        raise ConfigError("model.vocab", vocab, f"must be at least the {size} tokens of data.tokenizer={path}")


def _validate_model(m: ModelConfig, byte_tokens: bool = True) -> None:
    """``byte_tokens``: the text is bytes (no ``data.tokenizer``), so the vocabulary needs 256."""
    if m.builder:
        return _validate_builder(m)
    if m.flavour not in FLAVOURS:
        raise ConfigError("model.flavour", m.flavour, f"valid flavours: {', '.join(FLAVOURS)}")
    for key in ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"):
        _positive(f"model.{key}", getattr(m, key))
    if byte_tokens and m.vocab < 256:
        raise ConfigError("model.vocab", m.vocab, "byte-level tokens need vocab >= 256")
    if m.hidden % m.heads:
        raise ConfigError("model.heads", m.heads, f"must divide model.hidden={m.hidden}")
    if (m.hidden // m.heads) % 2 and m.flavour == "llama":
        raise ConfigError("model.heads", m.heads, "llama's RoPE needs an even head size hidden/heads")
    if m.heads % m.kv_heads:
        raise ConfigError("model.kv_heads", m.kv_heads, f"must divide model.heads={m.heads}")
    if not 0 <= m.dropout < 1:
        raise ConfigError("model.dropout", m.dropout, "must be in [0, 1)")
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.type_vocab", m.type_vocab)


def builder_parts(spec: str) -> tuple[Path, str]:
    """``model.builder``'s file and function name; one-line errors for a malformed value or a
    missing file."""
    path, _, name = spec.rpartition(":")
    if not path or not name.isidentifier():
        raise ConfigError("model.builder", spec, "expected FILE.py:FUNCTION, e.g. examples/own_model.py:build")
    if not Path(path).expanduser().is_file():
        raise ConfigError("model.builder", spec, f"no such file {path}; give a Python file and a function in it")
    return Path(path).expanduser(), name


def _validate_builder(m: ModelConfig) -> None:
    """A user's model: its sizes are its own (the description is checked when it is built);
    the data still needs the vocabulary and sequence length."""
    builder_parts(m.builder)
    for key in ("vocab", "seq_len"):
        _positive(f"model.{key}", getattr(m, key))


def resolve_layout(p: ParallelConfig, nproc: int) -> ParallelConfig:
    """A layout on its own (a user's training loop): dp filled in for ``nproc`` processes, then
    every rule that does not depend on the model checked."""
    if p.dp == 0 and p.tp > 0 and p.pp > 0 and nproc % (p.tp * p.pp) == 0:
        p = replace(p, dp=nproc // (p.tp * p.pp))
    _validate_parallel(p, nproc)
    return p


def _validate_parallel(p: ParallelConfig, nproc: int, servers: int = 0) -> None:
    """``nproc``: the worker processes (those left beside ``servers`` server ranks)."""
    for key in ("tp", "pp", "virtual_stages"):
        _positive(f"parallel.{key}", getattr(p, key))
    if p.dp < 0:
        raise ConfigError("parallel.dp", p.dp, "must be positive (or 0 for auto)")
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError("parallel.zero", p.zero, "must be one of 0, 1, 2, 3")
    if p.schedule not in SCHEDULES:
        raise ConfigError("parallel.schedule", p.schedule, f"valid schedules: {', '.join(SCHEDULES)}")
    if p.dp * p.tp * p.pp != nproc:
        dp = p.dp or "auto"
        left = f" left beside {servers} server rank{'s' if servers > 1 else ''}" if servers else ""
        raise ConfigError(
            "parallel.dp", dp, f"dp*tp*pp = {dp}*{p.tp}*{p.pp} must equal the {nproc} processes{left} "
            f"(--nproc); e.g. dp={nproc // (p.tp * p.pp) or 1} or --nproc {max(p.dp, 1) * p.tp * p.pp + servers}",
        )
    if p.zero and p.dp == 1:
        raise ConfigError("parallel.zero", p.zero, "shards over data parallel: needs dp > 1 (dp is 1); use zero=0")
    if p.virtual_stages > 1 and not SCHEDULES[p.schedule].interleaved:
        raise ConfigError("parallel.virtual_stages", p.virtual_stages,
                          f"only the interleaved schedule uses virtual stages (schedule is {p.schedule}); use 1")


def _validate_tensor_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """Every split dimension must divide by tp (the vocabulary is padded instead). A user's model
    states its own sizes in its description, checked when tensor parallel is applied."""
    if p.sequence_parallel and m.seq_len % p.tp:
        raise ConfigError("model.seq_len", m.seq_len,
                          f"must be divisible by parallel.tp={p.tp} under sequence parallel")
    if m.builder:
        return
    for key in ("hidden", "ffn_hidden", "heads", "kv_heads"):
        value = getattr(m, key)
        if value % p.tp:
            raise ConfigError(f"model.{key}", value, f"must be divisible by parallel.tp={p.tp}")


def _validate_pipeline(cfg: RunConfig) -> None:
    m, p = cfg.model, cfg.parallel
    stages = p.pp * p.virtual_stages
    if m.layers < stages and not m.builder:  # a user's model: its blocks are counted when it is split
        raise ConfigError("model.layers", m.layers, f"must be at least pp x virtual_stages = {p.pp} x "
                          f"{p.virtual_stages} = {stages} (one block per stage)")
    micro = microbatches(cfg)
    if p.microbatches and p.microbatches != micro:
        raise ConfigError("parallel.microbatches", p.microbatches,
                          f"must equal global_batch / (dp x micro_batch) = {micro} (or 0 for that)")
    if p.pp > 1 and SCHEDULES[p.schedule].interleaved and micro % p.pp:
        raise ConfigError("parallel.microbatches", micro, f"the interleaved schedule needs a multiple of pp={p.pp} "
                          "micro-batches per step (global_batch / (dp x micro_batch))")
    if p.stage_layers and (len(p.stage_layers) != stages or min(p.stage_layers) < 1
                           or (sum(p.stage_layers) != m.layers and not m.builder)):
        raise ConfigError("parallel.stage_layers", ",".join(map(str, p.stage_layers)),
                          f"give {stages} positive block counts summing to model.layers={m.layers}")


def _validate_ps(cfg: RunConfig, nproc: int) -> None:
    s, p = cfg.ps, cfg.parallel
    if s.mode not in PS_MODES:
        raise ConfigError("ps.mode", s.mode, f"valid modes: {', '.join(PS_MODES)}")
    if s.servers < 1:
        raise ConfigError("ps.servers", s.servers, f"ps.mode={s.mode} needs at least one server rank")
    workers = p.tp * p.pp * max(p.dp, 1)
    if s.servers > nproc - workers:
        raise ConfigError("ps.servers", s.servers, f"{nproc} processes leave at most {max(nproc - workers, 0)} "
                          f"server ranks beside dp x tp x pp = {workers} workers; use --nproc {workers + s.servers}")
    if s.staleness < 0:
        raise ConfigError("ps.staleness", s.staleness, "must be >= 0 (0: every worker waits for the slowest)")
    if p.zero:
        raise ConfigError("parallel.zero", p.zero, "the parameter server holds the optimizer states itself; "
                          "use zero=0 with ps.*")
    if cfg.diloco is not None:
        raise ConfigError("ps.mode", s.mode, "a parameter server and DiLoCo are two data-parallel strands: "
                          "give ps.* or diloco.*, not both")
    if cfg.checkpoint.async_:
        raise ConfigError("checkpoint.async", True, "not with a parameter server; use checkpoint.async=false")
    if s.mode != "sync" and p.tp * p.pp > 1:
        raise ConfigError("ps.mode", s.mode, f"asynchronous workers are single ranks (tp=pp=1, not tp={p.tp} "
                          f"pp={p.pp}); ps.mode=sync takes tp and pp workers")
    slow_worker(s.slow_worker, p.dp)


def slow_worker(spec: str, dp: int) -> tuple[int, float] | None:
    """``ps.slow_worker`` "W:F" as (worker, factor), None when empty; one-line errors otherwise."""
    if not spec:
        return None
    worker, _, factor = spec.partition(":")
    try:
        w, f = int(worker), float(factor)
    except ValueError:
        raise ConfigError("ps.slow_worker", spec, "expected WORKER:FACTOR, e.g. 1:3.0 (worker 1 three times "
                          "slower)") from None
    if not 0 <= w < max(dp, 1):
        raise ConfigError("ps.slow_worker", spec, f"names worker {w}; the workers are dp ranks 0..{max(dp, 1) - 1}")
    if f < 1:
        raise ConfigError("ps.slow_worker", spec, "the factor must be >= 1 (1: as fast as the others)")
    return w, f


def _validate_diloco(d: DilocoConfig, p: ParallelConfig) -> None:
    if d.inner_steps < 1:
        raise ConfigError("diloco.inner_steps", d.inner_steps, "DiLoCo needs the local steps between syncs: an "
                          "integer >= 1, e.g. diloco.inner_steps=10")
    if d.outer_lr <= 0:
        raise ConfigError("diloco.outer_lr", d.outer_lr, "must be positive (0.7 is DiLoCo's; 1.0 with "
                          "outer_momentum=0 averages the models)")
    if not 0 <= d.outer_momentum < 1:
        raise ConfigError("diloco.outer_momentum", d.outer_momentum, "must be in [0, 1)")
    if d.momentum_ramp not in MOMENTUM_RAMPS:
        raise ConfigError("diloco.momentum_ramp", d.momentum_ramp, f"valid ramps: {', '.join(MOMENTUM_RAMPS)} "
                          "(nesterov: the outer momentum rises as (t-1)/(t+2) over the first syncs; none: constant)")
    if not 1 <= d.fragments <= d.inner_steps:
        raise ConfigError("diloco.fragments", d.fragments, f"must be between 1 and inner_steps={d.inner_steps} "
                          "(each fragment syncs once every inner_steps, staggered)")
    if d.quantize not in QUANTIZE:
        raise ConfigError("diloco.quantize", d.quantize, f"valid formats: {', '.join(QUANTIZE)}")
    if d.replicas < 0 or (d.replicas and p.dp % d.replicas):
        raise ConfigError("diloco.replicas", d.replicas, f"must divide parallel.dp={p.dp} (0: every dp rank a "
                          "replica)")
    if p.zero and diloco_shards(d, p) == 1:
        raise ConfigError("parallel.zero", p.zero, "ZeRO shards within a DiLoCo replica, and each dp rank is one: "
                          f"give diloco.replicas < dp={p.dp} (e.g. {max(p.dp // 2, 1)}), or zero=0")
    if not p.zero and diloco_shards(d, p) > 1:
        raise ConfigError("diloco.replicas", d.replicas, f"replicas of {diloco_shards(d, p)} dp ranks shard their "
                          "state with ZeRO: give parallel.zero 1, 2 or 3 (each rank then exchanges its own slices)")


def diloco_shards(d: DilocoConfig | None, p: ParallelConfig) -> int:
    """dp ranks in one DiLoCo replica (1 without DiLoCo, or with every dp rank a replica)."""
    return p.dp // d.replicas if d is not None and d.replicas else 1


def _validate_train(t: TrainConfig, p: ParallelConfig) -> None:
    for key in ("steps", "global_batch", "micro_batch", "lr", "eval_batches", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("min_lr", "warmup", "weight_decay", "grad_clip", "eval_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}", getattr(t, key), "must be >= 0")
    if t.dtype not in DTYPES:
        raise ConfigError("train.dtype", t.dtype, f"valid dtypes: {', '.join(DTYPES)}")
    if t.recompute not in RECOMPUTE:
        raise ConfigError("train.recompute", t.recompute, f"valid: {', '.join(RECOMPUTE)} (none keeps every "
                          "activation; selective recomputes attention cores, full whole blocks)")
    per_step = p.dp * t.micro_batch
    if t.global_batch % per_step:
        raise ConfigError(
            "train.global_batch", t.global_batch,
            f"must be a multiple of dp x micro_batch = {p.dp} x {t.micro_batch} = {per_step}",
        )
