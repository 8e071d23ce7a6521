"""Checkpoints: exact resume at the same layout, resharding to any other, damaged checkpoints
skipped, async saves, export, and a folder PyTorch's own DCP tools read."""

import shutil

import pytest
import torch

from plait.checkpoint import newest_good, problem
from plait.checkpoint.export import export, load_for_inference
from plait.launch import run_local
from plait.models import build_model
from plait.train.trainer import RunOptions, train_worker
from plait.verify import layout_config, parse_layouts
from tests.conftest import layout_id, tiny_config

pytestmark = pytest.mark.timeout(300)


def _run(base, layout: str, out, *, resume=None, keep_params=False):
    """Train ``base`` at ``layout`` into ``out`` (from the checkpoint ``resume``); rank 0's result."""
    cfg, nproc = layout_config(base, parse_layouts(layout)[0] if layout else {})
    out.mkdir(parents=True, exist_ok=True)
    opts = RunOptions(out=out, progress=False, keep_params=keep_params, resume=resume)
    return run_local(train_worker, nproc, (cfg, opts), timeout_s=240)[0]


def _ckpt(out, step: int):
    return out / "checkpoints" / f"step_{step:06d}"


@pytest.mark.parametrize("layout, extra", [
    ("dp=2,tp=2", ("model.dropout=0.1",)),
    ("pp=2,dp=2,zero=1", ()),
    ("dp=2,tp=2,zero=3", ()),
], ids=lambda v: layout_id(v) if isinstance(v, str) else ("dropout" if v else "plain"))
def test_resume_is_bit_identical(corpus_file, tmp_path, layout, extra):
    """Steps 4-6 after resuming from step 3 are the uninterrupted run's, bit for bit (float32,
    dropout on in one layout: every rank's random streams are restored)."""
    base = tiny_config(corpus_file, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=3", *extra)
    whole = _run(base, layout, tmp_path / "A").losses
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    shutil.rmtree(_ckpt(tmp_path / "B", 6))
    resumed = _run(base, layout, tmp_path / "B", resume=_ckpt(tmp_path / "B", 3)).losses
    assert resumed == whole[3:]


@pytest.fixture(scope="module")
def reference(corpus_file):
    """One process, float64: the parameters after 5 steps (4 layers: room for interleaved stages; a
    vocabulary of 257: tp=2 pads it, and the padding must stay out of the checkpoint)."""
    import tempfile
    from pathlib import Path

    base = tiny_config(corpus_file, "train.dtype=float64", "model.layers=4", "train.steps=5", "checkpoint.every=4",
                       "model.vocab=257")
    with tempfile.TemporaryDirectory() as d:
        return base, _run(base, "", Path(d), keep_params=True).params


@pytest.mark.parametrize("saved, resumed", [
    ("dp=2,zero=3", "tp=2,pp=2"),
    ("tp=2,pp=2", "dp=2,zero=3"),
    ("pp=2,schedule=interleaved,virtual_stages=2,dp=2,zero=1", "tp=2,sequence_parallel=true"),
    ("tp=2,sequence_parallel=true,dp=2", "pp=2,schedule=interleaved,virtual_stages=2"),
    ("dp=2,zero=2", "dp=2,tp=2,zero=1"),
], ids=lambda v: layout_id(v))
def test_reshard_carries_model_and_optimizer(reference, tmp_path, saved, resumed):
    """Saved at one layout after 4 steps, step 5 at another gives the one-process parameters
    (float64, 1e-9): the model and Adam's moments and step count arrived in their new places."""
    base, want = reference
    _run(base, saved, tmp_path)
    shutil.rmtree(_ckpt(tmp_path, 5))
    got = _run(base, resumed, tmp_path, resume=_ckpt(tmp_path, 4), keep_params=True).params
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-9, atol=1e-9, msg=name)


def test_frozen_parameters_and_buffers_travel(corpus_file, tmp_path):
    """A frozen parameter (written whole, by one rank) and a persistent buffer (a count of training
    forwards) are saved at dp=2,zero=1 and loaded at tp=2: the count goes on from the saved one."""
    from pathlib import Path

    from plait.checkpoint.store import full_model_state

    small = Path(__file__).resolve().parents[1] / "models" / "small.py"
    base = tiny_config(corpus_file, f"model.builder={small}:frozen_and_counted", "train.steps=4", "checkpoint.every=3")
    _run(base, "dp=2,zero=1", tmp_path)
    first = full_model_state(_ckpt(tmp_path, 3))
    fresh = build_model(base.model).state_dict()
    assert torch.equal(first["layers.0.norm.weight"], fresh["layers.0.norm.weight"].float())  # frozen
    assert not torch.equal(first["layers.1.norm.weight"], fresh["layers.1.norm.weight"].float())  # trained
    assert first["layers.0.calls"].item() == 3 * 2  # 3 steps of 2 micro-batches on each dp rank
    shutil.rmtree(_ckpt(tmp_path, 4))
    _run(base, "tp=2", tmp_path, resume=_ckpt(tmp_path, 3))
    then = full_model_state(_ckpt(tmp_path, 4))
    assert then["layers.0.calls"].item() == 6 + 4  # one step of 4 micro-batches at dp=1, after the 6
    assert torch.equal(then["layers.0.norm.weight"], first["layers.0.norm.weight"])


def test_damaged_checkpoints_are_skipped(corpus_file, tmp_path):
    """A newest checkpoint cut short, or with one flipped byte, is reported and the one before used."""
    base = tiny_config(corpus_file, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=4")
    _run(base, "dp=2", tmp_path)
    root = tmp_path / "checkpoints"
    assert newest_good(root) == _ckpt(tmp_path, 4)
    cut = next(_ckpt(tmp_path, 4).glob("*.distcp"))
    cut.write_bytes(cut.read_bytes()[:-10])
    said = []
    assert newest_good(root, said.append) == _ckpt(tmp_path, 3)
    assert "step_000004" in said[0] and "bytes" in said[0]
    flip = next(_ckpt(tmp_path, 3).glob("*.distcp"))
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0x01
    flip.write_bytes(bytes(data))
    assert "corrupted" in problem(_ckpt(tmp_path, 3))
    assert newest_good(root, said.append) == _ckpt(tmp_path, 2)
    assert (_ckpt(tmp_path, 1) / "plait.json").exists() and problem(_ckpt(tmp_path, 1)) is None


def test_async_save_is_a_snapshot_even_when_the_copy_is_slow(corpus_file, tmp_path, monkeypatch):
    """The copy of an async save (0.01 s a tensor, some 0.5 s) takes longer than the next forward
    and backward of the tiny model here (some 0.02 s): the update
    after it waits (the optimizer's step pre-hook), so the checkpoint holds step 3's state and a run
    resumed from it continues exactly."""
    import time

    from plait.checkpoint.state import Pieces

    copy = Pieces.staged
    monkeypatch.setattr(Pieces, "staged", lambda self: (time.sleep(0.01), copy(self))[1])  # forked ranks see it
    base = tiny_config(corpus_file, "train.steps=5", "checkpoint.every=3", "checkpoint.async=true")
    whole = _run(base, "dp=2", tmp_path / "A").losses
    shutil.copytree(tmp_path / "A", tmp_path / "B")
    shutil.rmtree(_ckpt(tmp_path / "B", 5))
    assert _run(base, "dp=2", tmp_path / "B", resume=_ckpt(tmp_path / "B", 3)).losses == whole[3:]


def test_metadata_that_would_run_code_is_refused(corpus_file, tmp_path):
    """DCP's .metadata is a pickle: one that calls a function is refused, and nothing runs (even
    with a manifest rewritten to match, as whoever crafts such a folder would)."""
    import json
    import os
    import pickle

    from plait.checkpoint.export import read_checkpoint
    from plait.checkpoint.store import _files
    from plait.errors import ConfigError

    _run(tiny_config(corpus_file, "train.steps=1"), "", tmp_path)
    folder, marker = _ckpt(tmp_path, 1), tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))
    info = json.loads((folder / "plait.json").read_text())
    (folder / "plait.json").write_text(json.dumps({**info, "files": _files(folder)}))
    with pytest.raises(ConfigError, match="refused: its .metadata is not plain DCP metadata"):
        read_checkpoint(folder)
    assert not marker.exists()


def test_pruning_after_a_resume_keeps_the_new_history(tmp_path):
    """Resumed from step 500 because 600 was damaged, keep=1: committing 550 leaves 550 alone (not
    the damaged 600, and 500 only once 550 is complete)."""
    from plait.checkpoint.store import Checkpointer, committed

    root = tmp_path / "checkpoints"
    for step in (500, 600):
        (root / f"step_{step:06d}").mkdir(parents=True)
        (root / f"step_{step:06d}" / "plait.json").write_text("{}")
    ckpt = Checkpointer(root, 50, 1)  # (it clears stale .tmp folders first)
    tmp = root / ".step_000550.tmp"
    tmp.mkdir()
    (tmp / "data").write_bytes(b"x")
    ckpt._commit(tmp, 550, {"step": 550, "config": ""})
    assert [p.name for p in committed(root)] == ["step_000550"]


def test_async_saves_resume_exactly_and_keep_one(corpus_file, tmp_path):
    """checkpoint.async with keep=1: the last checkpoint is complete, older ones pruned, and a run
    resumed from it continues exactly."""
    base = tiny_config(corpus_file, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=1", "checkpoint.async=true")
    whole = _run(base, "dp=2,zero=2", tmp_path / "A").losses
    assert [p.name for p in (tmp_path / "A" / "checkpoints").iterdir()] == ["step_000006"]
    base4 = tiny_config(corpus_file, "train.steps=6", "checkpoint.every=4", "checkpoint.async=true")
    _run(base4, "dp=2,zero=2", tmp_path / "B")
    shutil.rmtree(_ckpt(tmp_path / "B", 6))
    assert _run(base4, "dp=2,zero=2", tmp_path / "B", resume=_ckpt(tmp_path / "B", 4)).losses == whole[4:]


def test_export_and_pytorch_tools(corpus_file, tmp_path):
    """A tp=2 checkpoint exported to safetensors gives the trained model's logits in one process,
    and DCP's own converter reads the folder into whole tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    base = tiny_config(corpus_file, "train.steps=2", "train.dtype=float64")
    trained = _run(base, "tp=2", tmp_path, keep_params=True).params
    info = export(tmp_path, tmp_path / "model.safetensors")
    assert info["step"] == 2
    _, model, _ = load_for_inference(tmp_path / "model.safetensors")
    ref = build_model(base.model).double()
    ref.load_state_dict(trained, strict=False)
    tokens = torch.randint(0, base.model.vocab, (2, base.model.seq_len))
    with torch.no_grad():
        assert torch.equal(model(tokens), ref.eval()(tokens))
    dcp_to_torch_save(str(_ckpt(tmp_path, 2)), str(tmp_path / "whole.pt"))
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert torch.equal(whole["model.tok_emb.weight"], trained["tok_emb.weight"])
    assert whole["optim.tok_emb.weight.exp_avg"].shape == trained["tok_emb.weight"].shape
