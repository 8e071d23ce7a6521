"""Checkpoint folders: written under a temporary name, committed when complete, checked when read.

``checkpoints/step_NNNNNN/`` is a DCP checkpoint (``state.py``) plus ``plait.json``: the step (also the
data position), the layout, the run's config, and the size and SHA-256 of every file. Rank 0 writes
``plait.json`` after DCP has gathered every rank's writes, then renames ``.step_NNNNNN.tmp`` to
``step_NNNNNN``; a folder without it was never committed and is not looked at, and one with a file
of another size or hash (cut short, a flipped byte) is skipped, with a log line, in favour of the
one before. Pruning to ``checkpoint.keep`` runs after a commit, so the newest complete checkpoint
is never removed before a newer one is complete; checkpoints newer than the one just committed
belong to a history that a resumed run replaced (damaged ones), and go too.

DCP's ``.metadata`` is a pickle: it is read with an unpickler that builds only DCP's metadata
classes, sizes, dtypes and paths (``SafeReader``), and the tensors with ``weights_only``, so
nothing in a checkpoint runs.

With ``checkpoint.async = true`` a background thread copies the state (to the CPU) while the next
step's forward and backward run, which only read it; the optimizer's next update waits for that
copy (a step pre-hook). The thread then writes and commits the copy (its collectives on a process
group of its own) while training goes on; the next save, and the end of the run, wait for it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import threading
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from ..errors import ConfigError
from .state import (
    PieceLoadPlanner,
    Pieces,
    PieceSavePlanner,
    check_shapes,
    prepare_optimizer,
    rng_state,
    set_rng_state,
    training_state,
)

log = logging.getLogger(__name__)
MANIFEST = "plait.json"
FORMAT = 1  # of plait.json and the names in a checkpoint


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def step_of(folder: Path) -> int:
    """The step a checkpoint folder is named after (-1 for another name)."""
    digits = folder.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: its dataclasses, ``torch.Size``, dtypes, layouts, paths."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
               ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's metadata")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, reading ``.metadata`` without running anything (``_MetadataUnpickler``)."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, ValueError) as e:
                raise ConfigError("--ckpt", str(self.path),
                                  f"refused: its .metadata is not plain DCP metadata ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, dict]:
    return {f.name: {"bytes": f.stat().st_size, "sha256": _hash(f)}
            for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete, intact checkpoint, or None if it is."""
    try:
        info = json.loads((folder / MANIFEST).read_text())
        files = {str(name): (int(want["bytes"]), str(want["sha256"])) for name, want in info["files"].items()}
        int(info["step"]), str(info["config"])
        if info.get("format") != FORMAT:
            return f"{MANIFEST} is of format {info.get('format')!r}; this plait reads format {FORMAT}"
    except FileNotFoundError:
        return f"no {MANIFEST} (never committed)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for name, (size, digest) in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} holds {f.stat().st_size} bytes, {size} were written"
        if _hash(f) != digest:
            return f"{name} is corrupted (its SHA-256 differs from the one written)"
    return None


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def committed(root: Path) -> list[Path]:
    """Committed checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) >= 0 and (p / MANIFEST).exists()]
    return sorted(found, key=step_of)


def newest_good(root: Path, say=log.warning) -> Path | None:
    """The newest intact checkpoint under ``root`` (checked file by file); each damaged one newer
    than it is reported through ``say`` and skipped."""
    for folder in reversed(committed(root)):
        why = problem(folder)
        if why is None:
            return folder
        say(f"checkpoint {folder.name} is damaged: {why}; trying the one before")
    return None


def resolve(path: Path) -> Path:
    """A checkpoint folder from a run folder (its newest intact checkpoint), a ``checkpoints``
    folder, or one checkpoint; a one-line error otherwise."""
    if (path / MANIFEST).exists():
        why = problem(path)
        if why:
            raise ConfigError("--ckpt", str(path), f"this checkpoint is damaged: {why}")
        return path
    for root in (path / "checkpoints", path):
        found = newest_good(root) if root.is_dir() else None
        if found is not None:
            return found
    raise ConfigError("--ckpt", str(path), "is not a checkpoint: give a run folder (holding checkpoints/step_*), "
                      "a checkpoint folder (holding plait.json), or an exported .safetensors file")


class Checkpointer:
    """Saves every ``every`` steps (and at the end) under ``root``, keeps the newest ``keep``.

    Collective: every rank constructs it and calls ``save`` at the same steps. ``info``: plain
    data written into every checkpoint's ``plait.json`` (the layout, the config)."""

    def __init__(self, root: Path | None, every: int, keep: int, async_save: bool = False, info: dict | None = None,
                 world=None, alone: bool = False):
        """``world``: the group of every rank that saves (None: the default group; the workers'
        group beside a parameter server's ranks). ``alone``: rank 0 saves by itself, without a
        collective (an asynchronous parameter server's single-rank workers, which hold the same
        parameters at the end and may have lost one of them)."""
        self.root, self.every, self.keep, self.async_save = root, every, keep, async_save
        self.world, self.alone = world, alone
        self.info = info or {}
        self.lead = not dist.is_initialized() or dist.get_rank() == 0
        self._thread: threading.Thread | None = None
        self._staged = threading.Event()
        self._staged.set()
        self._hooked: set[int] = set()
        self._error: BaseException | None = None
        self.group = None
        if root is None:
            return
        if self.lead:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step_*.tmp"):  # left by a run that was stopped while saving
                shutil.rmtree(stale, ignore_errors=True)
        if dist.is_initialized():
            if async_save:  # a group of its own: the save's collectives run beside training's
                from ..topology import side_group

                self.group = side_group()
            dist.barrier(group=world)  # stale folders are gone before anyone writes

    def due(self, step: int, last: int) -> bool:
        return self.root is not None and (step == last or (self.every > 0 and step % self.every == 0))

    def save(self, step: int, pm, optimizer, extra: dict) -> Path:
        """Write the state of ``pm`` and ``optimizer`` after ``step`` steps (collective)."""
        self.wait()
        if self.alone and not self.lead:
            return step_dir(self.root, step)
        state = {**training_state(pm, optimizer, saving=True), **rng_state(pm)}
        info = {"format": FORMAT, "step": step, **self.info, **extra}
        if not self.async_save:
            self._write(state, step, info)
            return step_dir(self.root, step)
        if optimizer is not None and id(optimizer) not in self._hooked:
            optimizer.register_step_pre_hook(self._before_update)
            self._hooked.add(id(optimizer))
        self._staged.clear()
        self._thread = threading.Thread(target=self._background, args=(state, step, info), daemon=True,
                                        name=f"plait-checkpoint-{step}")
        self._thread.start()
        return step_dir(self.root, step)

    def _before_update(self, *_) -> None:
        """The optimizer's step pre-hook: no update while the last save's copy is being taken (and
        a save that failed stops training here, not only at the next save)."""
        self._staged.wait()
        if self._error is not None:
            self.wait()

    def _background(self, state: dict, step: int, info: dict) -> None:
        try:
            try:  # the copy runs beside the next forward and backward, which only read the state
                state = {k: v.staged() if isinstance(v, Pieces) else v.detach().to("cpu", copy=True)
                         for k, v in state.items()}
            finally:
                self._staged.set()
            self._write(state, step, info)
        except BaseException as e:  # noqa: BLE001 - raised again in the training thread by wait()
            self._error = e

    def _write(self, state: dict, step: int, info: dict) -> None:
        tmp = self.root / f".step_{step:06d}.tmp"
        with warnings.catch_warnings():  # alone, DCP says it assumes one process: that is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), planner=PieceSavePlanner(),
                     process_group=self.group or self.world, no_dist=self.alone)
        if self.lead:  # DCP's coordinator wrote .metadata after every rank's files: the folder is complete
            self._commit(tmp, step, info)

    def _commit(self, tmp: Path, step: int, info: dict) -> None:
        info = {**info, "files": _files(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(info, indent=1))
        final = step_dir(self.root, step)
        if final.exists():  # an older save of this step (a run resumed from before it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        saved = committed(self.root)
        older = [c for c in saved if step_of(c) <= step]
        newer = [c for c in saved if step_of(c) > step]  # a replaced history: damaged ones a resume skipped
        for old in older[:-self.keep] + newer:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self) -> None:
        """Block until the save in flight is written and committed; raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def restore(path: Path, pm, optimizer, *, same_layout: bool) -> dict:
    """Load the checkpoint at ``path`` into ``pm`` and ``optimizer`` at whatever layout they run
    (collective over every rank); this rank's random streams too when ``same_layout``. Returns
    its ``plait.json``."""
    info = manifest(path)
    reader = SafeReader(str(path))
    md = reader.read_metadata()
    saved = {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if k.startswith("optim.") and hasattr(v, "size")}
    if optimizer is not None:
        prepare_optimizer(pm, optimizer, saved)
    state = training_state(pm, optimizer, saving=False)
    rng = rng_state(pm) if same_layout else {}
    check_shapes(state, md, str(path))
    dcp.load({**state, **{k: v for k, v in rng.items() if k in md.state_dict_metadata}}, storage_reader=reader,
             planner=PieceLoadPlanner(), process_group=pm.groups.world)
    pm.data.loaded(int(info["step"]))  # ZeRO-1/2: every rank's parameters from the loaded slices
    set_rng_state(pm, {k: v for k, v in rng.items() if k in md.state_dict_metadata})
    return info


def full_model_state(path: Path) -> dict[str, torch.Tensor]:
    """Every ``model.*`` tensor of the checkpoint at ``path``, whole, read by this one process."""
    reader = SafeReader(str(path))
    md = reader.read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, planner=PieceLoadPlanner(), no_dist=True)
    return {k.removeprefix("model."): v for k, v in state.items()}
