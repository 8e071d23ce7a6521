"""A checkpoint's model for one process: ``plait export`` and loading for inference.

``export`` reads every ``model.*`` tensor of a checkpoint whole (whatever layout wrote it) and
writes them to one safetensors file, named as in the unsplit model (a tied weight once, under its
input name), with ``FILE.json`` beside it: the run's config and step. Only tensors and plain data
are read back: safetensors and JSON, never pickles.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .. import config as C
from ..errors import ConfigError
from ..models.description import ModelDescription
from .state import refuse_mismatch
from .store import full_model_state, manifest, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXPORT_FORMAT = "plait-export-1"


def _config(text: str) -> C.RunConfig:
    return C.from_dict(tomllib.loads(text))


def config_of(folder: Path) -> C.RunConfig:
    """The run config saved in the checkpoint ``folder``."""
    return _config(manifest(folder)["config"])


def read_checkpoint(path: Path) -> tuple[C.RunConfig, int, dict[str, torch.Tensor]]:
    """(config, step, whole model tensors by name) of a run folder, a checkpoint folder or an export."""
    if path.is_file() or path.suffix == ".safetensors":
        return _read_export(path)
    folder = resolve(path)
    return config_of(folder), int(manifest(folder)["step"]), full_model_state(folder)


def _read_export(path: Path) -> tuple[C.RunConfig, int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    side = path.with_suffix(".json")
    if not path.is_file() or not side.is_file():
        raise ConfigError("--ckpt", str(path), f"an export needs the .safetensors file and its {side.name} beside it")
    try:
        info = json.loads(side.read_text())
        cfg = C.from_dict(info["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError("--ckpt", str(side), f"not an export's config ({type(e).__name__}: {e})") from None
    try:
        return cfg, int(info.get("step", 0)), load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types: one line for the user
        raise ConfigError("--ckpt", str(path), f"not a readable safetensors file ({type(e).__name__}: {e})") from None


def load_into(model: nn.Module, desc: ModelDescription, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` (the unsplit model's names, a tied weight once) into ``model``; a missing or
    differently shaped tensor is refused in one line, naming it."""
    tied = {out: inp for out, inp in desc.tied}
    wanted = model.state_dict()
    for name, t in wanted.items():
        src = state.get(tied.get(name, name))
        refuse_mismatch(where, name, None if src is None else tuple(src.shape), tuple(t.shape))
    with torch.no_grad():
        for name, t in wanted.items():
            t.copy_(state[tied.get(name, name)])


def load_for_inference(path: str | Path) -> tuple[C.RunConfig, nn.Module, ModelDescription]:
    """The run's config and its whole model (CPU, in the dtype it was saved in) with its description,
    from a run folder (its newest good checkpoint), a checkpoint folder or an exported file."""
    from ..models import build

    cfg, _, state = read_checkpoint(Path(path).expanduser())
    model, desc = build(cfg.model)
    dtype = next(iter(state.values())).dtype if state else torch.float32
    model = model.to(dtype)
    load_into(model, desc, state, str(path))
    return cfg, model.eval(), desc


def export_hf(path: Path, out: Path) -> dict:
    """Write the model of the checkpoint at ``path`` as a Hugging Face folder ``out``
    (config.json and model.safetensors, float32) that ``transformers`` loads, with the run's
    tokenizer.json when it had one."""
    from ..models import build
    from ..models.hf import save_hf

    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "with --hf, name a folder (config.json and model.safetensors go in it)")
    cfg, step, state = read_checkpoint(path)
    model, desc = build(cfg.model)
    load_into(model, desc, state, str(path))
    try:
        save_hf(model, out, cfg.model)
        tokenizer = Path(cfg.data.tokenizer).expanduser() if cfg.data.tokenizer else None
        if tokenizer is not None and tokenizer.is_file():  # the run's tokenizer goes with its model
            shutil.copyfile(tokenizer, out / "tokenizer.json")
    except OSError as e:
        raise ConfigError("--out", str(out), f"cannot be written ({e.strerror or e})") from None
    return {"values": sum(v.numel() for v in state.values()), "tensors": len(state), "step": step,
            "config": str(out / "config.json")}


def export(path: Path, out: Path) -> dict:
    """Write the model of the checkpoint at ``path`` to ``out`` (safetensors) and its config to
    ``out`` with the suffix ``.json``; returns what was written."""
    from safetensors.torch import save_file

    from ..models import build

    if out.suffix != ".safetensors":
        raise ConfigError("--out", str(out), "name the file FILE.safetensors")
    cfg, step, state = read_checkpoint(path)
    model, desc = build(cfg.model)
    load_into(model, desc, state, str(path))  # checks names and shapes against the config
    side = out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata={"format": EXPORT_FORMAT})
        side.write_text(json.dumps({"format": EXPORT_FORMAT, "step": step, "config": C.to_dict(cfg)}, indent=1))
    except OSError as e:
        raise ConfigError("--out", str(out), f"cannot be written ({e.strerror or e})") from None
    return {"values": sum(v.numel() for v in state.values()), "tensors": len(state), "step": step,
            "config": str(side)}
