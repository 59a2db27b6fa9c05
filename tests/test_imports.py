"""Imports point one way: serving (app, CLI, edge runner) never imports torch; export/ never imports training/;
pneunet/ imports neither training/ nor export/."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.helpers import EXAMPLES, REPO_ROOT


@pytest.mark.parametrize("front", ["app", "pneunet.cli", "edge.run"])
def test_serving_fronts_answer_without_torch(front, tmp_path):
    image = sorted(EXAMPLES.glob("*.jpeg"))[0]
    run = {"app": "import app; from pneunet.predictor import Predictor; app.AppService(Predictor.load())",
           "pneunet.cli": f"from pneunet.cli import main; assert main(['predict', {str(image)!r}, '--quiet']) == 0",
           "edge.run": f"from edge.run import main; assert main([{str(image)!r}, '--quiet']) == 0"}[front]
    code = f"import sys\n{run}\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def imported_packages(folder: str) -> dict[str, set[str]]:
    """file -> top-level packages it imports (anywhere in the file, lazily or not)."""
    found = {}
    for path in sorted((REPO_ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[path.relative_to(REPO_ROOT).as_posix()] = names
    return found


def test_export_never_imports_training_and_pneunet_imports_neither():
    for path, names in imported_packages("export").items():
        assert "training" not in names, path
    for path, names in imported_packages("pneunet").items():
        assert not names & {"training", "export", "edge", "app"}, path
