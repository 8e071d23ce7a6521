"""The layout keeps its promises: strands know models only by their description, imports run
downwards, models hold no distributed code, and docs cite only what the repository holds."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "plait"


def _imports(path: Path) -> set[str]:
    """Every plait module a file imports, as a dotted name."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            found.add(f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m}


def test_no_import_runs_from_the_strands_up_into_training():
    bad = [(str(p.relative_to(ROOT)), m) for p in (SRC / "parallel").rglob("*.py") for m in _imports(p)
           if m.startswith(("plait.train", "plait.verify", "plait.bench", "plait.cli", "plait.api"))]
    assert not bad, bad


def test_checkpoints_import_no_trainer_at_module_level():
    """Checkpoints sit beside the trainer: the trainer imports them, not the other way round (the
    bench worker imports what it drives inside its function)."""
    above = ("plait.train", "plait.verify", "plait.bench", "plait.cli", "plait.api", "plait.generate")
    bad = []
    for p in (SRC / "checkpoint").rglob("*.py"):
        package = "plait.checkpoint"
        for node in ast.parse(p.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names = [f"{base}.{node.module}" if node.module else base] if node.level else [node.module]
                names += [f"{names[0]}.{a.name}" for a in node.names]  # "from .. import train"
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad += [(str(p.relative_to(ROOT)), n) for n in names if n.startswith(above)]
    assert not bad, bad


def test_models_hold_no_distributed_code():
    bad = [(str(p.relative_to(ROOT)), m) for p in (SRC / "models").rglob("*.py") for m in _imports(p)
           if m.startswith(("torch.distributed", "plait.parallel", "plait.comm"))]
    assert not bad, bad


def test_strands_name_no_attribute_of_plaits_gpt():
    gpt = re.compile(r"\b(tok_emb|pos_emb|lm_head|attn_norm|mlp_norm|wq|wk|wv|wo|swiglu)\b"
                     r"|\b(model|module|block|b)\.(blocks|norm|attn|mlp|drop|cfg|gate|up|down)\b|\"blocks\.")
    hits = [f"{p.relative_to(ROOT)}:{i}" for d in ("parallel", "checkpoint") for p in (SRC / d).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if gpt.search(line) and not line.lstrip().startswith("#")]
    assert not hits, hits


def test_code_and_docs_cite_only_files_in_the_repository():
    texts = [*SRC.rglob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md", *(ROOT / "examples").glob("*")]
    cited = {(t, m) for t in texts for m in re.findall(r"\b((?:docs|examples|benchmarks)/[\w./-]+\.(?:md|py|sh))",
                                                         t.read_text())}
    missing = [(str(t.relative_to(ROOT)), m) for t, m in cited if not (ROOT / m).exists()]
    outside = [str(t.relative_to(ROOT)) for t in texts
               if re.search(r"\b(DESIGN|REFERENCE|STYLE)\.md|\.\./shared/", t.read_text())]
    assert not missing and not outside, (missing, outside)
