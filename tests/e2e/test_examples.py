"""Every script in examples/ runs as a user would run it, and docs/own-model.md's commands run as written."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv's plait and python
    return env


CHECKED_ELSEWHERE = {"ner_synthetic.py"}  # tests/e2e/test_finetune.py runs it and checks its report


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")
                                          if p.name not in CHECKED_ELSEWHERE))
def test_example_runs_with_its_defaults(script):
    r = subprocess.run([sys.executable, f"examples/{script}"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-2000:]


def _doc_commands(doc: Path) -> list[str]:
    """The commands of the ```sh blocks (comments and blank lines left out, continuations joined)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


@pytest.mark.slow
def test_own_model_doc_runs_as_written(tmp_path):
    commands = _doc_commands(ROOT / "docs" / "own-model.md")
    assert len(commands) >= 3
    for command in commands:
        argv = shlex.split(command.replace("runs/own", str(tmp_path / "own")))
        r = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=540)
        assert r.returncode == 0, (command, r.stderr[-2000:])
